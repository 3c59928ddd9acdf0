"""Training mapper for semantic segmentation with SGR's connected components (SGR_SPEC §2, §4)."""
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

__all__ = ["SemSegDatasetMapper", "build_train_augmentations", "read_image_checked",
           "read_id_map", "check_label_values", "read_sem_seg_checked"]

logger = logging.getLogger(__name__)


def read_image_checked(path: str, image_format: str) -> np.ndarray:
    """``detection_utils.read_image`` with an error that names the file."""
    try:
        return utils.read_image(path, format=image_format)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e


def read_id_map(path: str, kind: str = "label") -> np.ndarray:
    """A single-channel PNG of ids (``kind``: "label" for class ids, "instance" for instance
    ids) as an (H, W) array of its stored dtype; every error names the file."""
    try:
        ids = utils.read_image(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{kind} file {path} does not exist") from None
    except Exception as e:
        raise ValueError(f"cannot read {kind} file {path}: {type(e).__name__}: {e}") from e
    if ids.ndim == 3:
        if ids.shape[2] != 1:
            raise ValueError(
                f"{kind} file {path} has {ids.shape[2]} channels; expected a single-channel PNG of {kind} ids"
            )
        ids = ids[:, :, 0]
    return ids


def check_label_values(sem: np.ndarray, path: str, num_classes: int, ignore_label: int) -> None:
    """Every value of a label map is a class id (0..num_classes-1) or the ignore label."""
    bad = np.unique(sem[((sem >= num_classes) & (sem != ignore_label)) | (sem < 0)])
    if bad.size:
        raise ValueError(
            f"label file {path} holds values {bad[:10].tolist()} outside the class range "
            f"0..{num_classes - 1} (ignore label {ignore_label}); was the dataset prepared "
            "with its datasets/prepare_*.py script?"
        )


def read_sem_seg_checked(path: str, image_shape: Tuple[int, int], num_classes: Optional[int],
                         ignore_label: int) -> np.ndarray:
    """Read a label PNG and check its size against the image and its values against the classes."""
    sem = read_id_map(path, "label")
    if tuple(sem.shape[:2]) != tuple(image_shape[:2]):
        raise ValueError(
            f"label file {path} is {sem.shape[1]}x{sem.shape[0]} (WxH) but its image is "
            f"{image_shape[1]}x{image_shape[0]}; a label map must have its image's size"
        )
    if num_classes is not None:
        check_label_values(sem, path, num_classes, ignore_label)
    # uint8 maps go through PIL in detectron2's transforms; others through torch, as doubles.
    return sem if sem.dtype == np.uint8 else sem.astype(np.float64)


def build_train_augmentations(cfg) -> List[T.Augmentation]:
    """Random scale (shortest edge), crop, colour jitter and horizontal flip (SGR_SPEC §4); the
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
    ``class_masks=True`` (MaskFormer-style heads), ``instances`` with one mask per class
    (``gt_classes``, ``gt_masks``).

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
        heads_with_class_masks = ("MaskFormer", "Mask2Former")
        return dict(
            common,
            augmentations=build_train_augmentations(cfg),
            pad_size=pad,
            components=True,
            class_masks=any(h in cfg.MODEL.META_ARCHITECTURE for h in heads_with_class_masks),
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
