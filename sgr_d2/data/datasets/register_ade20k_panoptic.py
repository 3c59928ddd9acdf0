"""ADE20K (SceneParsing 2016, 150 classes: 100 things, 50 stuff) for panoptic and instance
segmentation, under Mask2Former's names and layouts.

* ``ade20k_panoptic_train`` / ``ade20k_panoptic_val``: the COCO-format panoptic annotation made
  by ``datasets/prepare_ade20k_pan_seg.py`` from the raw semantic and instance maps. Each dict
  has ``file_name``, ``image_id`` (the image's name without extension), ``pan_seg_file_name``,
  ``sem_seg_file_name`` (the ``annotations_detectron2`` map of ``prepare_ade20k_sem_seg.py``)
  and ``segments_info`` (``category_id`` 0..149, ``isthing``, ``iscrowd``, ``area``, ``bbox``).
  ``evaluator_type="ade20k_panoptic_seg"``: mIoU always, PQ with
  ``MODEL.MASK_FORMER.TEST.PANOPTIC_ON``, mask AP (against ``ade20k_instance_<split>.json``)
  with ``INSTANCE_ON``.
* ``ade20k_instance_train`` / ``ade20k_instance_val``: the COCO-format instance annotation made
  by ``datasets/prepare_ade20k_ins_seg.py`` (category ids are the 0-based class indices of the
  100 things), read with detectron2's ``load_coco_json``; ``evaluator_type="coco"``.

Class names and colors are those of the semantic registration (:mod:`.register_ade20k`, the
first name of each class of objectInfo150); the thing/stuff split is
:data:`~.register_ade20k.ADE20K_THING_IDS`. Registration never touches the disk; the loaders
resolve ``$DETECTRON2_DATASETS`` when they run and refresh the metadata's paths.
"""
from __future__ import annotations

import functools
import json
import os
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from detectron2.data.datasets.coco import load_coco_json

from .layout import (
    INSTANCE_FROM_PANOPTIC,
    datasets_root,
    refresh_metadata_paths,
    register_paths,
    replace_dataset,
    require_dir,
    require_file,
)
from .register_ade20k import ADE20K_150_CLASSES, ADE20K_150_COLORS, ADE20K_THING_IDS

__all__ = ["ade20k_panoptic_metadata", "ade20k_instance_metadata", "load_ade20k_panoptic",
           "load_ade20k_instances", "register_all_ade20k_panoptic", "read_ade20k_instances"]

_SPLITS = {"train": "training", "val": "validation"}
_BASE = "ADEChallengeData2016"
_LAYOUT = """\
ADEChallengeData2016/
  images/{training,validation}/ADE_*.jpg
  annotations/{training,validation}/ADE_*.png            (raw: 0 = other, 1..150 = classes)
  annotations_instance/{training,validation}/ADE_*.png   (raw: R = thing category 1..100, G = instance)
  annotations_detectron2/{training,validation}/ADE_*.png (made by prepare_ade20k_sem_seg.py)
  ade20k_panoptic_{train,val}.json, ade20k_panoptic_{train,val}/ADE_*.png
                                                         (made by prepare_ade20k_pan_seg.py)
  ade20k_instance_{train,val}.json                       (made by prepare_ade20k_ins_seg.py)"""


def _paths(root: str, short: str) -> dict:
    base = os.path.join(root, _BASE)
    split = _SPLITS[short]
    return dict(
        image_root=os.path.join(base, "images", split),
        sem_seg_root=os.path.join(base, "annotations_detectron2", split),
        panoptic_root=os.path.join(base, f"ade20k_panoptic_{short}"),
        panoptic_json=os.path.join(base, f"ade20k_panoptic_{short}.json"),
        json_file=os.path.join(base, f"ade20k_instance_{short}.json"),
    )


def _metadata_paths(root: Optional[str], short: str, keys) -> dict:
    paths = _paths(datasets_root(root), short)
    return paths if keys is None else {k: paths[k] for k in keys}


def ade20k_panoptic_metadata() -> dict:
    """Class metadata of ``ade20k_panoptic_*`` (as Mask2Former's): ``thing_classes`` (100) and
    ``stuff_classes`` (all 150) with their colors; both id maps are the identity on the class
    index (things: the 100 thing indices; stuff: all 150, for the semantic evaluator)."""
    things = set(ADE20K_THING_IDS)
    return dict(
        thing_classes=[ADE20K_150_CLASSES[i] for i in ADE20K_THING_IDS],
        thing_colors=[list(ADE20K_150_COLORS[i]) for i in ADE20K_THING_IDS],
        stuff_classes=list(ADE20K_150_CLASSES),
        stuff_colors=[list(c) for c in ADE20K_150_COLORS],
        thing_dataset_id_to_contiguous_id={i: i for i in range(150) if i in things},
        stuff_dataset_id_to_contiguous_id={i: i for i in range(150)},
    )


def ade20k_instance_metadata() -> dict:
    """Class metadata of ``ade20k_instance_*`` (as Mask2Former's): the 100 things, their class
    index (the json's category id) mapped to 0..99."""
    return dict(
        thing_classes=[ADE20K_150_CLASSES[i] for i in ADE20K_THING_IDS],
        thing_colors=[list(ADE20K_150_COLORS[i]) for i in ADE20K_THING_IDS],
        thing_dataset_id_to_contiguous_id={cid: k for k, cid in enumerate(ADE20K_THING_IDS)},
    )


def read_ade20k_instances(path: str) -> Tuple[Tuple[int, int], List[Tuple[int, int, np.ndarray]]]:
    """The objects of a raw ADE20K instance PNG (``annotations_instance/``: red = thing category
    1..100 of the instance challenge, green = instance id, 0 = none): ``((H, W), [(instance
    id, class index 0..149, (H, W) bool mask), ...])`` in increasing instance id. An object
    whose pixels hold several categories, or a category outside 1..100, is an error naming the
    file."""
    with Image.open(path) as im:
        rgb = np.asarray(im)
    if rgb.ndim != 3 or rgb.shape[2] < 2:
        raise ValueError(f"{path}: expected an RGB instance map (red = category, green = instance id), "
                         f"got an array of shape {rgb.shape}")
    category, instance = rgb[..., 0], rgb[..., 1]
    objects = []
    for k in np.unique(instance).tolist():
        if k == 0:
            continue
        mask = instance == k
        cats = np.unique(category[mask]).tolist()
        if len(cats) != 1 or not 1 <= cats[0] <= len(ADE20K_THING_IDS):
            raise ValueError(f"{path}: instance {k} has category values {cats}; expected one value in "
                             f"1..{len(ADE20K_THING_IDS)}")
        objects.append((k, ADE20K_THING_IDS[cats[0] - 1], mask))
    return instance.shape, objects


def _check(root: str, short: str, dataset: str, keys, prepare: str) -> dict:
    paths = _paths(root, short)
    require_dir(os.path.join(root, _BASE), dataset=dataset, layout=_LAYOUT)
    for key in keys:
        require = require_file if key.endswith("json") or key == "json_file" else require_dir
        hint = "datasets/prepare_ade20k_sem_seg.py" if key == "sem_seg_root" else None if key == "image_root" else prepare
        require(paths[key], dataset=dataset, layout=_LAYOUT, prepare=hint)
    return paths


def load_ade20k_panoptic(short: str, root: Optional[str] = None, name: Optional[str] = None) -> list:
    """Dataset dicts of ``ade20k_panoptic_<short>`` (``short``: "train" or "val"), root resolved
    now; missing folders or files raise :class:`~.layout.DatasetLayoutError` naming them."""
    root = datasets_root(root)
    prepare = "datasets/prepare_ade20k_pan_seg.py"
    paths = _check(root, short, name or f"ADE20K panoptic {short}",
                   ("image_root", "sem_seg_root", "panoptic_root", "panoptic_json"), prepare)
    if name is not None:
        refresh_metadata_paths(name, **paths)
    meta = ade20k_panoptic_metadata()
    things = meta["thing_dataset_id_to_contiguous_id"]
    with open(paths["panoptic_json"]) as f:
        annotations = json.load(f)["annotations"]
    dicts = []
    for ann in annotations:
        stem = os.path.splitext(ann["file_name"])[0]
        segments = []
        for seg in ann["segments_info"]:
            seg = dict(seg)
            isthing = seg["category_id"] in things
            seg["category_id"] = (things if isthing else meta["stuff_dataset_id_to_contiguous_id"])[seg["category_id"]]
            seg["isthing"] = isthing
            segments.append(seg)
        dicts.append({
            "file_name": os.path.join(paths["image_root"], stem + ".jpg"),
            "image_id": ann["image_id"],
            "pan_seg_file_name": os.path.join(paths["panoptic_root"], ann["file_name"]),
            "sem_seg_file_name": os.path.join(paths["sem_seg_root"], ann["file_name"]),
            "segments_info": segments,
        })
    return dicts


def load_ade20k_instances(short: str, root: Optional[str] = None, name: Optional[str] = None) -> list:
    """detectron2's ``load_coco_json`` of ``ade20k_instance_<short>.json``, root resolved now."""
    root = datasets_root(root)
    paths = _check(root, short, name or f"ADE20K instance {short}", ("image_root", "json_file"),
                   "datasets/prepare_ade20k_ins_seg.py")
    if name is not None:
        refresh_metadata_paths(name, image_root=paths["image_root"], json_file=paths["json_file"])
    return load_coco_json(paths["json_file"], paths["image_root"], name)


def register_all_ade20k_panoptic(root: Optional[str] = None) -> None:
    """Register the four names. With ``root=None`` the loaders read ``$DETECTRON2_DATASETS`` when run."""
    for short in _SPLITS:
        name = f"ade20k_panoptic_{short}"
        paths = functools.partial(_metadata_paths, root, short, None)
        replace_dataset(name, functools.partial(load_ade20k_panoptic, short, root, name),
                        dict(ade20k_panoptic_metadata(), **paths(), evaluator_type="ade20k_panoptic_seg",
                             ignore_label=255, label_divisor=1000, instance_source=INSTANCE_FROM_PANOPTIC))
        register_paths(name, paths)
        name = f"ade20k_instance_{short}"
        paths = functools.partial(_metadata_paths, root, short, ("image_root", "json_file"))
        replace_dataset(name, functools.partial(load_ade20k_instances, short, root, name),
                        dict(ade20k_instance_metadata(), **paths(), evaluator_type="coco"))
        register_paths(name, paths)


register_all_ade20k_panoptic()
