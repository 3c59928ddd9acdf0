"""COCO-Stuff-10K (v1.1) for semantic segmentation, 171 classes.

Registers ``coco_2017_train_stuff_10k_sem_seg`` (9,000 images) and
``coco_2017_test_stuff_10k_sem_seg`` (1,000 images). Label maps come from
``datasets/prepare_coco_stuff_10k_sem_seg.py``: the 171 COCO ids that occur in COCO-Stuff
(1..182 minus the 11 thing ids never annotated) become 0..170 in increasing id order and
"unlabeled" becomes 255. Instances for the token metrics are the connected components of each
class in the label map (there is no instance annotation): ``instance_map_path`` gives None.
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

__all__ = [
    "COCO_STUFF_171_CATEGORIES",
    "COCO_STUFF_UNUSED_IDS",
    "COCO_STUFF_ID_TO_CONTIGUOUS",
    "load_coco_stuff_10k_sem_seg",
    "register_all_coco_stuff_10k",
]

# COCO category ids (1..91 "things") of the 2014 paper that no COCO release annotates.
COCO_STUFF_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)

# (COCO id, name) of the 171 classes, in increasing id order: 80 things, then 91 stuff classes.
COCO_STUFF_171_CATEGORIES = [
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
    (92, "banner"), (93, "blanket"), (94, "branch"), (95, "bridge"), (96, "building-other"),
    (97, "bush"), (98, "cabinet"), (99, "cage"), (100, "cardboard"), (101, "carpet"),
    (102, "ceiling-other"), (103, "ceiling-tile"), (104, "cloth"), (105, "clothes"),
    (106, "clouds"), (107, "counter"), (108, "cupboard"), (109, "curtain"), (110, "desk-stuff"),
    (111, "dirt"), (112, "door-stuff"), (113, "fence"), (114, "floor-marble"),
    (115, "floor-other"), (116, "floor-stone"), (117, "floor-tile"), (118, "floor-wood"),
    (119, "flower"), (120, "fog"), (121, "food-other"), (122, "fruit"), (123, "furniture-other"),
    (124, "grass"), (125, "gravel"), (126, "ground-other"), (127, "hill"), (128, "house"),
    (129, "leaves"), (130, "light"), (131, "mat"), (132, "metal"), (133, "mirror-stuff"),
    (134, "moss"), (135, "mountain"), (136, "mud"), (137, "napkin"), (138, "net"),
    (139, "paper"), (140, "pavement"), (141, "pillow"), (142, "plant-other"), (143, "plastic"),
    (144, "platform"), (145, "playingfield"), (146, "railing"), (147, "railroad"),
    (148, "river"), (149, "road"), (150, "rock"), (151, "roof"), (152, "rug"), (153, "salad"),
    (154, "sand"), (155, "sea"), (156, "shelf"), (157, "sky-other"), (158, "skyscraper"),
    (159, "snow"), (160, "solid-other"), (161, "stairs"), (162, "stone"), (163, "straw"),
    (164, "structural-other"), (165, "table"), (166, "tent"), (167, "textile-other"),
    (168, "towel"), (169, "tree"), (170, "vegetable"), (171, "wall-brick"),
    (172, "wall-concrete"), (173, "wall-other"), (174, "wall-panel"), (175, "wall-stone"),
    (176, "wall-tile"), (177, "wall-wood"), (178, "water-other"), (179, "waterdrops"),
    (180, "window-blind"), (181, "window-other"), (182, "wood"),
]

assert len(COCO_STUFF_171_CATEGORIES) == 171
assert [i for i, _ in COCO_STUFF_171_CATEGORIES] == [
    i for i in range(1, 183) if i not in COCO_STUFF_UNUSED_IDS
]

COCO_STUFF_ID_TO_CONTIGUOUS = {cid: k for k, (cid, _) in enumerate(COCO_STUFF_171_CATEGORIES)}


def _coco_stuff_colors() -> list[list[int]]:
    """One RGB color per class: detectron2's COCO panoptic color where it has the class, else
    a fixed pseudo-random color not used by any other class (reproducible across runs)."""
    import numpy as np
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    by_id = {c["id"]: c["color"] for c in COCO_CATEGORIES if c["id"] <= 182}
    # Panoptic "merged" stuff classes (ids > 182) stand for one or more COCO-Stuff classes;
    # give their color to the COCO-Stuff class of the same base name (or "<base>-other").
    by_name = {}
    for c in COCO_CATEGORIES:
        if c["name"].endswith("-merged"):
            base = c["name"][: -len("-merged")]
            by_name[base] = by_name[f"{base}-other"] = c["color"]
    colors = [by_id.get(cid) or by_name.get(name) for cid, name in COCO_STUFF_171_CATEGORIES]
    used = {tuple(c) for c in colors if c is not None}
    rng = np.random.RandomState(171)
    for k, c in enumerate(colors):
        if c is None:
            while True:
                cand = tuple(int(v) for v in rng.randint(0, 256, size=3))
                if cand not in used:
                    break
            used.add(cand)
            colors[k] = cand
    return [list(c) for c in colors]


_SPLITS = {"coco_2017_train_stuff_10k_sem_seg": "train", "coco_2017_test_stuff_10k_sem_seg": "test"}
_BASE = os.path.join("coco", "coco_stuff_10k")
_PREPARE = "datasets/prepare_coco_stuff_10k_sem_seg.py"
_LAYOUT = """\
coco/coco_stuff_10k/
  images/*.jpg, annotations/*.mat, imageLists/{train,test}.txt   (official v1.1 release)
  images_detectron2/{train,test}/*.jpg                (made by prepare_coco_stuff_10k_sem_seg.py)
  annotations_detectron2/{train,test}/*.png           (made by prepare_coco_stuff_10k_sem_seg.py)"""


def _split_dirs(root: str, split: str) -> tuple[str, str]:
    base = os.path.join(root, _BASE)
    return (os.path.join(base, "images_detectron2", split),
            os.path.join(base, "annotations_detectron2", split))


def load_coco_stuff_10k_sem_seg(split: str, root: Optional[str] = None,
                                name: Optional[str] = None) -> list:
    """Dataset dicts (``file_name``, ``sem_seg_file_name``) of one COCO-Stuff-10K split.

    ``split`` is ``"train"`` or ``"test"``; ``root`` defaults to ``$DETECTRON2_DATASETS`` read
    now. Missing folders raise :class:`DatasetLayoutError` naming them.
    """
    root = datasets_root(root)
    image_dir, gt_dir = _split_dirs(root, split)
    dataset = name or f"COCO-Stuff-10K {split}"
    require_dir(os.path.join(root, _BASE), dataset=dataset, layout=_LAYOUT)
    require_dir(image_dir, dataset=dataset, layout=_LAYOUT, prepare=_PREPARE)
    require_dir(gt_dir, dataset=dataset, layout=_LAYOUT, prepare=_PREPARE)
    if name is not None:
        refresh_metadata_paths(name, image_root=image_dir, sem_seg_root=gt_dir)
    return load_sem_seg(gt_dir, image_dir, gt_ext="png", image_ext="jpg")


def register_all_coco_stuff_10k(root: Optional[str] = None) -> None:
    """Register both splits. With ``root=None`` the loaders read ``$DETECTRON2_DATASETS`` when run."""
    colors = _coco_stuff_colors()
    for name, split in _SPLITS.items():
        image_dir, gt_dir = _split_dirs(datasets_root(root), split)
        replace_dataset(
            name,
            functools.partial(load_coco_stuff_10k_sem_seg, split, root, name),
            dict(
                stuff_classes=[n for _, n in COCO_STUFF_171_CATEGORIES],
                stuff_colors=[list(c) for c in colors],
                stuff_dataset_id_to_contiguous_id=dict(COCO_STUFF_ID_TO_CONTIGUOUS),
                image_root=image_dir,
                sem_seg_root=gt_dir,
                evaluator_type="sem_seg",
                ignore_label=255,
                instance_source=INSTANCE_FROM_COMPONENTS,
            ),
        )


register_all_coco_stuff_10k()
