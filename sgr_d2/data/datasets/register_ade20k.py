"""ADE20K (SceneParsing challenge 2016, 150 classes) for semantic segmentation.

Registers ``ade20k_sem_seg_train`` and ``ade20k_sem_seg_val``, replacing detectron2's own
registration of those names (which binds the root at import time and has no colors).
Label maps come from ``datasets/prepare_ade20k_sem_seg.py``: class k of ``objectInfo150``
(1..150) is stored as k-1 (0..149) and "other" (0) as 255.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

from detectron2.data.datasets import load_sem_seg

from .layout import (
    INSTANCE_FROM_COMPONENTS,
    datasets_root,
    refresh_metadata_paths,
    replace_dataset,
    require_dir,
)

__all__ = ["ADE20K_150_CLASSES", "ADE20K_150_COLORS", "ADE20K_THING_IDS", "load_ade20k_sem_seg",
           "register_all_ade20k"]

# First name of each class of objectInfo150 (the challenge's class list), in index order 1..150.
ADE20K_150_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
]

# The challenge's color coding (color150 of the SceneParsing development kit), same order.
ADE20K_150_COLORS = [
    [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3], [120, 120, 80],
    [140, 140, 140], [204, 5, 255], [230, 230, 230], [4, 250, 7], [224, 5, 255], [235, 255, 7],
    [150, 5, 61], [120, 120, 70], [8, 255, 51], [255, 6, 82], [143, 255, 140], [204, 255, 4],
    [255, 51, 7], [204, 70, 3], [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255],
    [255, 7, 71], [255, 9, 224], [9, 7, 230], [220, 220, 220], [255, 9, 92], [112, 9, 255],
    [8, 255, 214], [7, 255, 224], [255, 184, 6], [10, 255, 71], [255, 41, 10], [7, 255, 255],
    [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7], [255, 122, 8], [0, 255, 20],
    [255, 8, 41], [255, 5, 153], [6, 51, 255], [235, 12, 255], [160, 150, 20], [0, 163, 255],
    [140, 140, 140], [250, 10, 15], [20, 255, 0], [31, 255, 0], [255, 31, 0], [255, 224, 0],
    [153, 255, 0], [0, 0, 255], [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255],
    [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255], [0, 255, 112], [0, 255, 133],
    [255, 0, 0], [255, 163, 0], [255, 102, 0], [194, 255, 0], [0, 143, 255], [51, 255, 0],
    [0, 82, 255], [0, 255, 41], [0, 255, 173], [10, 0, 255], [173, 255, 0], [0, 255, 153],
    [255, 92, 0], [255, 0, 255], [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20],
    [255, 184, 184], [0, 31, 255], [0, 255, 61], [0, 71, 255], [255, 0, 204], [0, 255, 194],
    [0, 255, 82], [0, 10, 255], [0, 112, 255], [51, 0, 255], [0, 194, 255], [0, 122, 255],
    [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0], [143, 255, 0], [82, 0, 255],
    [163, 255, 0], [255, 235, 0], [8, 184, 170], [133, 0, 255], [0, 255, 92], [184, 0, 255],
    [255, 0, 31], [0, 184, 255], [0, 214, 255], [255, 0, 112], [92, 255, 0], [0, 224, 255],
    [112, 224, 255], [70, 184, 160], [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
    [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0], [255, 0, 235], [245, 0, 255],
    [255, 0, 122], [255, 245, 0], [10, 190, 212], [214, 255, 0], [0, 204, 255], [20, 0, 255],
    [255, 255, 0], [0, 153, 255], [0, 41, 255], [0, 255, 204], [41, 0, 255], [41, 255, 0],
    [173, 0, 255], [0, 245, 255], [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255],
    [184, 255, 0], [0, 133, 255], [255, 214, 0], [25, 194, 194], [102, 255, 0], [92, 0, 255],
]

assert len(ADE20K_150_CLASSES) == 150 and len(ADE20K_150_COLORS) == 150

# The 50 "stuff" classes (0-based index above) of ADE20K's panoptic and instance annotations;
# the other 100 are the "things" of the SceneParsing instance challenge (annotations_instance/).
_ADE20K_STUFF_IDS = (
    0, 1, 2, 3, 4, 5, 6, 9, 11, 13, 16, 17, 21, 25, 26, 28, 29, 34, 40, 46, 48, 51, 52, 54, 59,
    60, 61, 63, 68, 77, 79, 84, 91, 94, 96, 99, 100, 101, 105, 106, 109, 113, 114, 117, 122, 128,
    131, 140, 141, 145,
)
# Thing classes in increasing index: instance-challenge category k (1..100, the red channel of
# annotations_instance/*.png) is ADE20K_THING_IDS[k - 1] (the challenge numbers its 100
# categories in the order of objectInfo150).
ADE20K_THING_IDS = tuple(i for i in range(150) if i not in _ADE20K_STUFF_IDS)
assert len(ADE20K_THING_IDS) == 100

_SPLITS = {"ade20k_sem_seg_train": "training", "ade20k_sem_seg_val": "validation"}
_BASE = "ADEChallengeData2016"
_PREPARE = "datasets/prepare_ade20k_sem_seg.py"
_LAYOUT = """\
ADEChallengeData2016/
  images/{training,validation}/ADE_*.jpg
  annotations/{training,validation}/ADE_*.png              (raw: 0 = other, 1..150 = classes)
  annotations_detectron2/{training,validation}/ADE_*.png   (made by prepare_ade20k_sem_seg.py)"""


def _split_dirs(root: str, split: str) -> tuple[str, str]:
    base = os.path.join(root, _BASE)
    return os.path.join(base, "images", split), os.path.join(base, "annotations_detectron2", split)


def load_ade20k_sem_seg(split: str, root: Optional[str] = None, name: Optional[str] = None) -> list:
    """Dataset dicts (``file_name``, ``sem_seg_file_name``) of one ADE20K split.

    ``split`` is ``"training"`` or ``"validation"``; ``root`` defaults to ``$DETECTRON2_DATASETS``
    read now. Missing folders raise :class:`DatasetLayoutError` naming them.
    """
    root = datasets_root(root)
    image_dir, gt_dir = _split_dirs(root, split)
    dataset = name or f"ADE20K {split}"
    require_dir(os.path.join(root, _BASE), dataset=dataset, layout=_LAYOUT)
    require_dir(image_dir, dataset=dataset, layout=_LAYOUT)
    require_dir(gt_dir, dataset=dataset, layout=_LAYOUT, prepare=_PREPARE)
    if name is not None:
        refresh_metadata_paths(name, image_root=image_dir, sem_seg_root=gt_dir)
    return load_sem_seg(gt_dir, image_dir, gt_ext="png", image_ext="jpg")


def register_all_ade20k(root: Optional[str] = None) -> None:
    """Register both splits. With ``root=None`` the loaders read ``$DETECTRON2_DATASETS`` when run."""
    for name, split in _SPLITS.items():
        image_dir, gt_dir = _split_dirs(datasets_root(root), split)
        replace_dataset(
            name,
            functools.partial(load_ade20k_sem_seg, split, root, name),
            dict(
                stuff_classes=list(ADE20K_150_CLASSES),
                stuff_colors=[list(c) for c in ADE20K_150_COLORS],
                image_root=image_dir,
                sem_seg_root=gt_dir,
                evaluator_type="sem_seg",
                ignore_label=255,
                instance_source=INSTANCE_FROM_COMPONENTS,
            ),
        )


register_all_ade20k()
