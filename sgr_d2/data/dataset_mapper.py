"""Training mapper for semantic segmentation with SGR's connected components (docs/method.md#supervision-from-connected-components, docs/method.md#training-and-evaluation-recipe)."""
from __future__ import annotations

import copy
import logging
from typing import List, Optional, Tuple

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances

from ..sgr import component_label_map
from .augmentation import PhotometricDistortion
from .labels import read_sem_seg_checked

__all__ = ["MAPPER_NAMES", "SemSegDatasetMapper", "build_train_augmentations", "read_image_checked",
           "mapper_class_masks"]

logger = logging.getLogger(__name__)


def read_image_checked(path: str, image_format: str) -> np.ndarray:
    """``detection_utils.read_image`` with an error that names the file."""
    try:
        return utils.read_image(path, format=image_format)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e


# The values of INPUT.DATASET_MAPPER_NAME, each with whether its training mapper emits the
# per-class ``instances`` that MaskFormer / Mask2Former train on (the components: both).
MAPPER_NAMES = {"sgr_sem_seg": False, "sgr_mask_former_semantic": True}


def mapper_class_masks(name: str) -> bool:
    """Whether the mapper ``name`` (``INPUT.DATASET_MAPPER_NAME``) emits per-class ``instances``;
    an unknown name is a ValueError naming the key and the known names."""
    if name not in MAPPER_NAMES:
        raise ValueError(
            f"INPUT.DATASET_MAPPER_NAME is {name!r}; expected 'sgr_sem_seg' (per-pixel heads) or "
            "'sgr_mask_former_semantic' (MaskFormer / Mask2Former: also one mask per class)"
        )
    return MAPPER_NAMES[name]


def build_train_augmentations(cfg) -> List[T.Augmentation]:
    """Random scale (shortest edge), crop, colour jitter and horizontal flip (docs/method.md#training-and-evaluation-recipe); the
    colour jitter is MaskFormer's (:class:`~sgr_d2.data.augmentation.PhotometricDistortion`:
    brightness, contrast, saturation, hue), which the paper follows."""
    augs: List[T.Augmentation] = [
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                             cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)
    ]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop_CategoryAreaConstraint(
            cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE, cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
            cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE))
    if cfg.INPUT.COLOR_AUG:
        augs.append(PhotometricDistortion(cfg.INPUT.FORMAT))
    augs.append(T.RandomFlip())
    return augs


class SemSegDatasetMapper:
    """Reads an image and its label map, augments them, pads them to the crop size (the image with
    ``image_pad_value``, ``INPUT.IMAGE_PAD_VALUE``; the labels with the ignore label), and emits
    the connected components of the augmented label map.

    Output keys: ``image`` (C, H, W) uint8 tensor, ``sem_seg`` (H, W) int64 tensor,
    ``components`` = ``{"labels": (H, W) int32 component ids (-1 = none), "classes": (N,) int64}``
    (the compact form of ``connected_components``' masks: mask j is ``labels == j``) and, with
    ``class_masks=True`` (MaskFormer / Mask2Former: ``INPUT.DATASET_MAPPER_NAME``
    "sgr_mask_former_semantic"), ``instances`` with one mask per class (``gt_classes``, ``gt_masks``).

    With ``is_train=False`` (the evaluation loader, ``Trainer.build_test_loader``) it resizes as
    detectron2's test mapper does and emits only ``image`` and ``sem_seg``, with the same checked
    reads: a bad image or label file is an error naming it, not a crash or a wrong mIoU.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, augmentations: List[T.Augmentation], image_format: str,
                 ignore_label: int, num_classes: Optional[int], pad_size: Optional[Tuple[int, int]],
                 components: bool = True, class_masks: bool = False, image_pad_value: int = 0):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_label = ignore_label
        self.num_classes = num_classes
        self.pad_size = pad_size
        if not 0 <= image_pad_value <= 255:
            raise ValueError(f"INPUT.IMAGE_PAD_VALUE is {image_pad_value}; expected a pixel value in 0..255")
        self.image_pad_value = image_pad_value
        self.components = components
        self.class_masks = class_masks
        logger.info(f"[SemSegDatasetMapper] augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_name: Optional[str] = None):
        # the ignore label of ``dataset_name`` (default: the first dataset of the split)
        names = [dataset_name] if dataset_name else (cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST)
        ignore = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        if names:
            meta = MetadataCatalog.get(names[0])
            ignore = meta.get("ignore_label", ignore)
        class_masks = mapper_class_masks(cfg.INPUT.DATASET_MAPPER_NAME)  # checks the name
        common = dict(is_train=is_train, image_format=cfg.INPUT.FORMAT, ignore_label=ignore,
                      num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        if not is_train:
            # Evaluation: detectron2's test-time resize (what its DatasetMapper does), the same
            # checked reads as training, no padding and no training targets.
            return dict(common, augmentations=utils.build_augmentation(cfg, False), pad_size=None,
                        components=False, class_masks=False)
        pad = None
        if cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute":
            pad = tuple(cfg.INPUT.CROP.SIZE)
        return dict(
            common,
            augmentations=build_train_augmentations(cfg),
            pad_size=pad,
            components=True,
            class_masks=class_masks,
            image_pad_value=cfg.INPUT.IMAGE_PAD_VALUE,
        )

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_checked(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)  # sets "height"/"width" when absent
        if "sem_seg_file_name" not in dataset_dict:
            if not self.is_train:  # evaluation without ground truth (e.g. a test split)
                return self._image_only(dataset_dict, image)
            raise KeyError(
                f"dataset dict of {dataset_dict['file_name']} has no 'sem_seg_file_name'; "
                "semantic segmentation training needs a label map per image"
            )
        sem = read_sem_seg_checked(dataset_dict.pop("sem_seg_file_name"), image.shape, self.num_classes,
                                   self.ignore_label)
        aug_input = T.AugInput(image, sem_seg=sem)
        self.augmentations(aug_input)
        image, sem = aug_input.image, aug_input.sem_seg
        if self.pad_size is not None:
            image, sem = self._pad(image, sem)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        sem = sem.astype(np.int64)
        dataset_dict["sem_seg"] = torch.as_tensor(sem)
        if self.components:
            labels, classes = component_label_map(sem, self.ignore_label)
            dataset_dict["components"] = {"labels": torch.from_numpy(labels),
                                          "classes": torch.from_numpy(classes)}
        if self.class_masks:
            dataset_dict["instances"] = self._class_instances(sem)
        return dataset_dict

    def _image_only(self, dataset_dict, image):
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        return dataset_dict

    def _pad(self, image, sem):
        ph, pw = self.pad_size
        h, w = sem.shape
        if h >= ph and w >= pw:
            return image, sem
        ph, pw = max(ph, h), max(pw, w)
        out_img = np.full((ph, pw, image.shape[2]), self.image_pad_value, dtype=image.dtype)
        out_img[:h, :w] = image
        out_sem = np.full((ph, pw), self.ignore_label, dtype=sem.dtype)
        out_sem[:h, :w] = sem
        return out_img, out_sem

    def _class_instances(self, sem):
        classes = np.unique(sem)
        classes = classes[classes != self.ignore_label]
        inst = Instances(sem.shape)
        inst.gt_classes = torch.as_tensor(classes, dtype=torch.int64)
        masks = torch.from_numpy(sem[None] == classes.reshape(-1, 1, 1))
        inst.gt_masks = masks if len(classes) else torch.zeros((0, *sem.shape), dtype=torch.bool)
        return inst
