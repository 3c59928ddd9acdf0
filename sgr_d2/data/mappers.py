"""The training mappers of every task and :func:`build_mapper`, which picks one by
``INPUT.DATASET_MAPPER_NAME`` (what ``Trainer.build_train_loader`` / ``build_test_loader`` call).

=========================  =============================================================
``DATASET_MAPPER_NAME``    training mapper
=========================  =============================================================
``sgr_sem_seg``            :class:`~.dataset_mapper.SemSegDatasetMapper` (per-pixel heads)
``sgr_mask_former_semantic`` / ``mask_former_semantic``
                           the same, plus one mask per class (MaskFormer / Mask2Former)
``mask_former_panoptic``   :class:`PanopticDatasetMapper`: MaskFormer's panoptic mapper
``mask_former_instance``   :class:`InstanceDatasetMapper`: MaskFormer's instance mapper
``coco_panoptic_lsj``      :class:`PanopticDatasetMapper` with large-scale jitter (COCO "new baseline")
``coco_instance_lsj``      :class:`InstanceDatasetMapper` with large-scale jitter (COCO "new baseline")
=========================  =============================================================

They read, augment and pad as the official Mask2Former mappers of the same names do, with
sgr_d2's checked reads (errors name the file), and emit ``image``, ``instances``
(``gt_classes``, ``gt_masks``; the LSJ mappers also ``gt_boxes``) and SGR's ``components``
(:func:`~.dataset_mapper.component_targets`) built from exactly the segments MaskFormer trains
on: the non-crowd segments (panoptic) or annotations (instance). ``MODEL.SGR.COMPONENTS``
"connected" gives the 8-connected regions of each class of the map they paint (two touching
objects of one class are one component); "instances" makes each thing segment / annotation its
own component (stuff keeps its connected regions). Crowd regions and VOID belong to no
component. At evaluation every name uses the semantic mapper's test mode (detectron2's test
resize, checked reads), as the official uses detectron2's test mapper.
"""
from __future__ import annotations

import copy
from typing import List, Optional

import numpy as np
import pycocotools.mask as mask_util
import torch

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances, polygons_to_bitmask

from ..sgr import COMPONENT_MODES
from .dataset_mapper import (CLASS_MASK_MAPPERS, SemSegDatasetMapper, build_train_augmentations,
                             component_targets, pad_bottom_right)
from .datasets.layout import INSTANCE_FROM_FILE
from .labels import panoptic_maps, read_panoptic_png, rgb2id, read_sem_seg_checked

__all__ = ["MAPPER_NAMES", "PanopticDatasetMapper", "InstanceDatasetMapper", "build_mapper",
           "check_mapper_name", "check_sgr_components", "lsj_augmentations"]

# name -> (training mapper class, its large-scale-jitter flag); None: the semantic mapper
MAPPER_NAMES = {
    "sgr_sem_seg": None,
    "sgr_mask_former_semantic": None,
    "mask_former_semantic": None,
    "mask_former_panoptic": ("panoptic", False),
    "mask_former_instance": ("instance", False),
    "coco_panoptic_lsj": ("panoptic", True),
    "coco_instance_lsj": ("instance", True),
}
assert set(CLASS_MASK_MAPPERS) < set(MAPPER_NAMES)
LSJ_PAD_VALUE = 128  # detectron2's FixedSizeCrop default, which the official LSJ mappers use


def check_mapper_name(name: str) -> None:
    """A ValueError naming the key and the known names for an unknown INPUT.DATASET_MAPPER_NAME."""
    if name not in MAPPER_NAMES:
        raise ValueError(f"INPUT.DATASET_MAPPER_NAME is {name!r}; expected one of {sorted(MAPPER_NAMES)} "
                         "(see sgr_d2/data/mappers.py)")


def lsj_augmentations(cfg) -> List[T.Augmentation]:
    """Large-scale jitter (Mask2Former's COCO "new baseline" mappers): the flip of
    ``INPUT.RANDOM_FLIP``, a resize by a random factor in [``INPUT.MIN_SCALE``,
    ``INPUT.MAX_SCALE``] of ``INPUT.IMAGE_SIZE``, then a random crop / bottom-right pad to
    ``IMAGE_SIZE`` x ``IMAGE_SIZE`` (image padded with 128, label maps with 0, detectron2 v0.6's
    FixedSizeCrop: for a panoptic map that is VOID)."""
    augs: List[T.Augmentation] = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                 vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
    size = cfg.INPUT.IMAGE_SIZE
    augs.append(T.ResizeScale(min_scale=cfg.INPUT.MIN_SCALE, max_scale=cfg.INPUT.MAX_SCALE,
                              target_height=size, target_width=size))
    augs.append(T.FixedSizeCrop(crop_size=(size, size), pad_value=LSJ_PAD_VALUE))
    return augs


def _thing_classes(dataset_name: Optional[str]) -> frozenset:
    """The contiguous ids of the thing classes of a dataset (its ``thing_dataset_id_to_contiguous_id``)."""
    if not dataset_name:
        return frozenset()
    return frozenset(MetadataCatalog.get(dataset_name).get("thing_dataset_id_to_contiguous_id", {}).values())


class _TrainingMapper(SemSegDatasetMapper):
    """What the panoptic and instance mappers set up alike from a config (training only)."""

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, lsj: bool = False):
        if not is_train:
            raise ValueError(f"{cls.__name__} maps training data; evaluation uses SemSegDatasetMapper(cfg, False)")
        ret = super().from_config(cfg, True)
        ret.update(class_masks=False, lsj=lsj)
        if lsj:
            ret.update(augmentations=lsj_augmentations(cfg), pad_size=None, image_pad_value=LSJ_PAD_VALUE)
        return ret


class PanopticDatasetMapper(_TrainingMapper):
    """MaskFormer's panoptic training mapper (``mask_former_panoptic``) and, with ``lsj=True``,
    Mask2Former's COCO panoptic LSJ mapper (``coco_panoptic_lsj``).

    Reads the image, the panoptic PNG (``pan_seg_file_name``, COCO encoding) and, except with
    LSJ, the label map ``sem_seg_file_name`` when the dict has one; augments them alike (the
    panoptic PNG as its RGB colours, as the official does); pads (image with
    ``INPUT.IMAGE_PAD_VALUE`` to the crop size, label map with the ignore label, panoptic ids with
    0 = VOID; with LSJ the crop pads). Emits ``image``, ``sem_seg`` (when read), ``instances``:
    one mask per non-crowd segment (``gt_classes`` = its ``category_id``; LSJ: also ``gt_boxes``)
    and ``components``. A segment is a thing by its ``isthing`` entry, else by its class being a
    value of the dataset's ``thing_dataset_id_to_contiguous_id``.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, lsj: bool = False, thing_classes=frozenset(), **kwargs):
        super().__init__(is_train, **kwargs)
        self.lsj = lsj
        self.thing_classes = frozenset(thing_classes)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, lsj: bool = False):
        ret = super().from_config(cfg, is_train, lsj)
        ret["thing_classes"] = _thing_classes(cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None)
        return ret

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self.read_image(dataset_dict)
        sem_file = dataset_dict.pop("sem_seg_file_name", None)
        sem = None
        if sem_file is not None and not self.lsj:
            sem = read_sem_seg_checked(sem_file, image.shape, self.num_classes, self.ignore_label)
        if "pan_seg_file_name" not in dataset_dict:
            raise KeyError(f"dataset dict of {dataset_dict['file_name']} has no 'pan_seg_file_name'; "
                           "panoptic training (INPUT.DATASET_MAPPER_NAME 'mask_former_panoptic' / "
                           "'coco_panoptic_lsj') needs a panoptic annotation per image")
        if "annotations" in dataset_dict and not self.lsj:
            raise ValueError("a panoptic segmentation dataset dict should not have 'annotations' "
                             f"({dataset_dict['file_name']})")
        pan = read_panoptic_png(dataset_dict.pop("pan_seg_file_name"), image.shape)
        segments = dataset_dict["segments_info"]
        crop_sem = sem
        if crop_sem is None and self._crop_reads_labels():
            crop_sem = panoptic_maps(rgb2id(pan), segments, self.thing_classes, self.ignore_label)[0]
            crop_sem = crop_sem.astype(np.uint8 if crop_sem.max(initial=0) < 256 else np.float64)
        image, crop_sem, (pan,), _ = self.augment(image, crop_sem, pan)
        ids = rgb2id(pan)
        if self.pad_size is not None:
            image = pad_bottom_right(image, self.pad_size, self.image_pad_value)
            ids = pad_bottom_right(ids, self.pad_size, 0)
            if sem is not None:
                crop_sem = pad_bottom_right(crop_sem, self.pad_size, self.ignore_label)
        dataset_dict["image"] = self.image_tensor(image)
        if sem is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(crop_sem.astype(np.int64))
        kept = [s for s in segments if not s.get("iscrowd", 0)]
        instances = Instances(ids.shape)
        instances.gt_classes = torch.tensor([int(s["category_id"]) for s in kept], dtype=torch.int64)
        masks = torch.from_numpy(ids[None] == np.array([int(s["id"]) for s in kept]).reshape(-1, 1, 1))
        instances.gt_masks = masks
        if self.lsj:
            instances.gt_boxes = BitMasks(masks).get_bounding_boxes()
        dataset_dict["instances"] = instances
        if self.components:
            labels, inst = panoptic_maps(ids, segments, self.thing_classes, self.ignore_label)
            dataset_dict["components"] = component_targets(
                labels, self.ignore_label, inst if self.component_mode == "instances" else None)
        return dataset_dict

    def _crop_reads_labels(self) -> bool:
        return any(isinstance(a, T.RandomCrop_CategoryAreaConstraint) and a.single_category_max_area < 1.0
                   for a in self.augmentations.augs)


def _annotation_mask(segm, height: int, width: int) -> np.ndarray:
    """The (H, W) bool mask of one transformed COCO ``segmentation``: polygons, RLE or an array."""
    if isinstance(segm, list):
        return polygons_to_bitmask(segm, height, width)
    if isinstance(segm, dict):
        if isinstance(segm["counts"], list):  # uncompressed RLE
            segm = mask_util.frPyObjects(segm, *segm["size"])
        return mask_util.decode(segm).astype(bool)
    if isinstance(segm, np.ndarray) and segm.ndim == 2:
        return segm.astype(bool)
    raise ValueError(f"cannot convert a segmentation of type {type(segm).__name__} to a mask; expected "
                     "polygons (a list), a COCO RLE (a dict) or an (H, W) array")


class InstanceDatasetMapper(_TrainingMapper):
    """MaskFormer's instance training mapper (``mask_former_instance``) and, with ``lsj=True``,
    Mask2Former's COCO instance LSJ mapper (``coco_instance_lsj``).

    Reads the image and its ``annotations`` (COCO polygons or RLE; crowd annotations are
    dropped, as the official does), augments them (without LSJ: resize, a plain random crop,
    colour jitter, flip), pads the image and the masks to the crop size (LSJ: the crop pads
    the image with 128 and emits ``padding_mask``, True on the padding). Emits ``image``,
    ``instances`` (``gt_classes``, ``gt_masks``; without LSJ, as the official, an object cropped
    away stays with an empty mask; with LSJ it is dropped and ``gt_boxes`` are the boxes of the
    masks, where the official drops the objects whose cropped polygons are empty and boxes the
    polygons: both differ only for objects under a pixel wide) and ``components`` (the masks painted in annotation order, a later one over an
    earlier one where they overlap).
    """

    @configurable
    def __init__(self, is_train: bool = True, *, lsj: bool = False, **kwargs):
        super().__init__(is_train, **kwargs)
        self.lsj = lsj

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, lsj: bool = False):
        ret = super().from_config(cfg, is_train, lsj)
        if not lsj:
            ret["augmentations"] = build_train_augmentations(cfg, category_area_crop=False)
        return ret

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self.read_image(dataset_dict)
        if "annotations" not in dataset_dict:
            raise KeyError(f"dataset dict of {dataset_dict['file_name']} has no 'annotations'; instance "
                           "training (INPUT.DATASET_MAPPER_NAME 'mask_former_instance' / 'coco_instance_lsj') "
                           "needs the objects of each image")
        valid = np.ones(image.shape[:2], dtype=np.uint8) if self.lsj else None
        image, _, (valid,), transforms = self.augment(image, None, valid)
        h, w = image.shape[:2]
        annos = [utils.transform_instance_annotations({k: v for k, v in obj.items() if k != "keypoints"},
                                                      transforms, (h, w))
                 for obj in dataset_dict.pop("annotations") if not obj.get("iscrowd", 0)]
        masks = np.zeros((len(annos), h, w), dtype=bool)
        for j, obj in enumerate(annos):
            if "segmentation" not in obj:
                raise KeyError(f"an annotation of {dataset_dict['file_name']} has no 'segmentation'; "
                               "instance segmentation needs the mask of every object")
            masks[j] = _annotation_mask(obj["segmentation"], h, w)
        classes = np.array([int(obj["category_id"]) for obj in annos], dtype=np.int64)
        if self.lsj:
            keep = masks.any(axis=(1, 2))
            masks, classes = masks[keep], classes[keep]
            dataset_dict["padding_mask"] = torch.from_numpy(~valid.astype(bool))
        elif self.pad_size is not None:
            image = pad_bottom_right(image, self.pad_size, self.image_pad_value)
            masks = pad_bottom_right(masks.transpose(1, 2, 0), self.pad_size, False).transpose(2, 0, 1)
        dataset_dict["image"] = self.image_tensor(image)
        instances = Instances(masks.shape[1:])
        instances.gt_classes = torch.from_numpy(classes)
        instances.gt_masks = torch.from_numpy(np.ascontiguousarray(masks))
        if self.lsj:
            instances.gt_boxes = BitMasks(instances.gt_masks).get_bounding_boxes()
        dataset_dict["instances"] = instances
        if self.components:
            painted = np.zeros(masks.shape[1:], dtype=np.int64)  # 0 = none, j + 1 = annotation j
            for j in range(len(masks)):
                painted[masks[j]] = j + 1
            labels = np.where(painted > 0, np.append(0, classes)[painted], self.ignore_label)
            dataset_dict["components"] = component_targets(
                labels, self.ignore_label, painted if self.component_mode == "instances" else None)
        return dataset_dict


_CLASSES = {"panoptic": PanopticDatasetMapper, "instance": InstanceDatasetMapper}


def check_sgr_components(cfg) -> None:
    """``MODEL.SGR.COMPONENTS "instances"`` needs instances: a panoptic or instance mapper, or
    training datasets whose metadata has ``instance_source="instance_file"`` (Cityscapes, the
    toy datasets) for the semantic mappers. Otherwise a ValueError naming the key and dataset
    (raised when the training loader is built, before the first iteration)."""
    mode = cfg.MODEL.SGR.COMPONENTS
    if mode not in COMPONENT_MODES:
        raise ValueError(f"MODEL.SGR.COMPONENTS is {mode!r}; expected one of {list(COMPONENT_MODES)}")
    if mode != "instances" or MAPPER_NAMES.get(cfg.INPUT.DATASET_MAPPER_NAME) is not None:
        return
    for name in cfg.DATASETS.TRAIN:
        if MetadataCatalog.get(name).get("instance_source") != INSTANCE_FROM_FILE:
            raise ValueError(
                f"MODEL.SGR.COMPONENTS is 'instances' but dataset {name!r} (DATASETS.TRAIN) has no "
                f"instance maps for the semantic mapper {cfg.INPUT.DATASET_MAPPER_NAME!r}: its instances "
                "could only be the connected components. Use MODEL.SGR.COMPONENTS 'connected', or a "
                "dataset with instances: a panoptic one (INPUT.DATASET_MAPPER_NAME 'mask_former_panoptic'), "
                "an instance one ('mask_former_instance'), or one with instance maps (Cityscapes, the toy "
                "datasets)"
            )


def build_mapper(cfg, is_train: bool, dataset_name: Optional[str] = None):
    """The mapper of ``INPUT.DATASET_MAPPER_NAME`` for training (``is_train=True``, after
    :func:`check_sgr_components`), or the checked test mapper for ``dataset_name``."""
    check_mapper_name(cfg.INPUT.DATASET_MAPPER_NAME)
    if not is_train:
        return SemSegDatasetMapper(cfg, False, dataset_name)
    check_sgr_components(cfg)
    entry = MAPPER_NAMES[cfg.INPUT.DATASET_MAPPER_NAME]
    if entry is None:
        return SemSegDatasetMapper(cfg, True)
    kind, lsj = entry
    return _CLASSES[kind](cfg, True, lsj=lsj)
