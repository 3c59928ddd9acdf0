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

from ..sgr import COMPONENT_MODES, instance_component_map
from .augmentation import PhotometricDistortion
from .datasets.layout import instance_map_path
from .labels import read_instance_map, read_sem_seg_checked

__all__ = ["CLASS_MASK_MAPPERS", "SemSegDatasetMapper", "build_train_augmentations", "read_image_checked",
           "pad_bottom_right", "component_targets", "compact_ids"]

logger = logging.getLogger(__name__)


def read_image_checked(path: str, image_format: str) -> np.ndarray:
    """``detection_utils.read_image`` with an error that names the file."""
    try:
        return utils.read_image(path, format=image_format)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e


# The semantic values of INPUT.DATASET_MAPPER_NAME (the panoptic and instance ones are in
# sgr_d2/data/mappers.py): those whose training mapper also emits one mask per class
# (``instances``, what MaskFormer / Mask2Former train on). "mask_former_semantic" is the
# official name of "sgr_mask_former_semantic".
CLASS_MASK_MAPPERS = ("sgr_mask_former_semantic", "mask_former_semantic")


def pad_bottom_right(array: np.ndarray, size: Tuple[int, int], value) -> np.ndarray:
    """``array`` (H, W[, C]) padded at the bottom and right with ``value`` to at least ``size``
    (h, w); returned as is when it is already that large."""
    h, w = array.shape[:2]
    ph, pw = max(size[0], h), max(size[1], w)
    if (ph, pw) == (h, w):
        return array
    out = np.full((ph, pw) + array.shape[2:], value, dtype=array.dtype)
    out[:h, :w] = array
    return out


def component_targets(labels: np.ndarray, ignore_label: int,
                      instances: Optional[np.ndarray] = None) -> dict:
    """The ``components`` entry of a training dict, in the compact form the SGR criterion takes:
    ``{"labels": (H, W) int32 component ids (-1 = none), "classes": (N,) int64}``. Without
    ``instances`` the components are the 8-connected regions of each class of ``labels``
    (``MODEL.SGR.COMPONENTS "connected"``); with an instance map (> 0 = instance id) each
    instance is one component and the other pixels keep their connected components
    (``"instances"``, :func:`~sgr_d2.sgr.components.instance_component_map`)."""
    ids, classes = instance_component_map(labels, instances, ignore_label)
    return {"labels": torch.from_numpy(ids), "classes": torch.from_numpy(classes)}


def compact_ids(ids: np.ndarray) -> np.ndarray:
    """Renumber an id map (0 = none) to 0..n, keeping 0 as none: uint8 when n < 256 (so that it
    goes through detectron2's transforms as a uint8 label map does: the same PIL resampling),
    float64 otherwise."""
    uniq, inverse = np.unique(ids, return_inverse=True)
    inverse = inverse.reshape(ids.shape) + (0 if uniq.size and uniq[0] == 0 else 1)
    return inverse.astype(np.uint8 if inverse.max(initial=0) < 256 else np.float64)


def build_train_augmentations(cfg, category_area_crop: bool = True) -> List[T.Augmentation]:
    """Random scale (shortest edge), crop, colour jitter and horizontal flip (docs/method.md#training-and-evaluation-recipe); the
    colour jitter is MaskFormer's (:class:`~sgr_d2.data.augmentation.PhotometricDistortion`:
    brightness, contrast, saturation, hue), which the paper follows. The crop limits the area
    of one category (``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA``, it reads the label map) or, with
    ``category_area_crop=False`` (MaskFormer's instance mapper, which has no label map), is
    detectron2's plain ``RandomCrop``."""
    augs: List[T.Augmentation] = [
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                             cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)
    ]
    if cfg.INPUT.CROP.ENABLED and category_area_crop:
        augs.append(T.RandomCrop_CategoryAreaConstraint(
            cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE, cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
            cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE))
    elif cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
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

    With ``component_mode="instances"`` (``MODEL.SGR.COMPONENTS``) each image's instance map
    (:func:`~sgr_d2.data.datasets.layout.instance_map_path`: Cityscapes' ``*_instanceIds.png``,
    the toy datasets' instance maps) goes through the same augmentation and every instance is
    its own component; the other pixels keep their connected components.

    With ``is_train=False`` (the evaluation loader, ``Trainer.build_test_loader``) it resizes as
    detectron2's test mapper does and emits only ``image`` and ``sem_seg``, with the same checked
    reads: a bad image or label file is an error naming it, not a crash or a wrong mIoU.

    The panoptic and instance mappers (:mod:`sgr_d2.data.mappers`) subclass it for its checked
    reads, augmentation, padding and components.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, augmentations: List[T.Augmentation], image_format: str,
                 ignore_label: int, num_classes: Optional[int], pad_size: Optional[Tuple[int, int]],
                 components: bool = True, class_masks: bool = False, image_pad_value: int = 0,
                 component_mode: str = "connected"):
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
        if component_mode not in COMPONENT_MODES:
            raise ValueError(f"MODEL.SGR.COMPONENTS is {component_mode!r}; expected one of {list(COMPONENT_MODES)}")
        self.component_mode = component_mode
        logger.info(f"[{type(self).__name__}] augmentations: {augmentations}")

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
        return dict(
            common,
            augmentations=build_train_augmentations(cfg),
            pad_size=pad,
            components=True,
            class_masks=cfg.INPUT.DATASET_MAPPER_NAME in CLASS_MASK_MAPPERS,
            image_pad_value=cfg.INPUT.IMAGE_PAD_VALUE,
            component_mode=cfg.MODEL.SGR.COMPONENTS,
        )

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self.read_image(dataset_dict)
        if "sem_seg_file_name" not in dataset_dict:
            if not self.is_train:  # evaluation without ground truth (e.g. a test split)
                return self._image_only(dataset_dict, image)
            raise KeyError(
                f"dataset dict of {dataset_dict['file_name']} has no 'sem_seg_file_name'; "
                "semantic segmentation training needs a label map per image"
            )
        sem = read_sem_seg_checked(dataset_dict["sem_seg_file_name"], image.shape, self.num_classes,
                                   self.ignore_label)
        inst = None
        if self.components and self.component_mode == "instances":
            inst = self._read_instances(dataset_dict, sem)
            if inst.dtype != sem.dtype:  # both take the same resampling path (PIL for uint8)
                sem, inst = sem.astype(np.float64), inst.astype(np.float64)
        del dataset_dict["sem_seg_file_name"]
        image, sem, (inst,), _ = self.augment(image, sem, inst)
        if self.pad_size is not None:
            image, sem = self._pad(image, sem)
            inst = None if inst is None else pad_bottom_right(inst, self.pad_size, 0)
        dataset_dict["image"] = self.image_tensor(image)
        sem = sem.astype(np.int64)
        dataset_dict["sem_seg"] = torch.as_tensor(sem)
        if self.components:
            inst = None if inst is None else inst.astype(np.int64)
            dataset_dict["components"] = component_targets(sem, self.ignore_label, inst)
        if self.class_masks:
            dataset_dict["instances"] = self._class_instances(sem)
        return dataset_dict

    # ------------------------------------------------------------ steps shared with the subclasses
    def read_image(self, dataset_dict) -> np.ndarray:
        """The checked image of ``dataset_dict``; sets its "height"/"width" when absent."""
        image = read_image_checked(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)
        return image

    def augment(self, image: np.ndarray, sem: Optional[np.ndarray], *extra: Optional[np.ndarray]):
        """``(image, sem, extras, transforms)`` after one draw of the augmentations; ``sem`` (may
        be None) is what the category-area crop reads, each array of ``extra`` (None stays None)
        is transformed as a segmentation map."""
        aug_input = T.AugInput(image, sem_seg=sem)
        transforms = self.augmentations(aug_input)
        extra = [None if x is None else transforms.apply_segmentation(x) for x in extra]
        return aug_input.image, aug_input.sem_seg, extra, transforms

    def image_tensor(self, image: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

    def _read_instances(self, dataset_dict, sem: np.ndarray) -> np.ndarray:
        path = instance_map_path(dataset_dict)
        if path is None:
            raise ValueError(
                f"MODEL.SGR.COMPONENTS is 'instances' but the dataset dict of {dataset_dict['file_name']} "
                "has no instance map (no 'instance_file_name', not a Cityscapes label file); use "
                "MODEL.SGR.COMPONENTS 'connected', or a dataset with instance annotations"
            )
        return compact_ids(read_instance_map(path, sem.shape[:2]))

    def _image_only(self, dataset_dict, image):
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        dataset_dict["image"] = self.image_tensor(aug_input.image)
        return dataset_dict

    def _pad(self, image, sem):
        return (pad_bottom_right(image, self.pad_size, self.image_pad_value),
                pad_bottom_right(sem, self.pad_size, self.ignore_label))

    def _class_instances(self, sem):
        classes = np.unique(sem)
        classes = classes[classes != self.ignore_label]
        inst = Instances(sem.shape)
        inst.gt_classes = torch.as_tensor(classes, dtype=torch.int64)
        masks = torch.from_numpy(sem[None] == classes.reshape(-1, 1, 1))
        inst.gt_masks = masks if len(classes) else torch.zeros((0, *sem.shape), dtype=torch.bool)
        return inst
