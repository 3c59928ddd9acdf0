"""COCO 2017 instance and panoptic segmentation, under detectron2's and Mask2Former's names.

* ``coco_2017_train`` / ``coco_2017_val`` (instance segmentation, 80 classes; detectron2's
  names, loader ``load_coco_json`` and metadata, ``evaluator_type="coco"``);
* ``coco_2017_train_panoptic`` / ``coco_2017_val_panoptic`` (panoptic, 133 classes; detectron2's
  names, loader ``load_coco_panoptic_json`` and "standard" metadata, with ``thing_classes`` /
  ``thing_colors`` cut to the 80 things as Mask2Former does);
* ``coco_2017_train_panoptic_with_sem_seg`` / ``coco_2017_val_panoptic_with_sem_seg``
  (Mask2Former's: the panoptic dicts plus ``sem_seg_file_name``, the semantic map derived from
  the panoptic one by ``datasets/prepare_coco_semantic_annos_from_panoptic_annos.py``; its
  ``stuff_dataset_id_to_contiguous_id`` maps all 133 categories, so the semantic evaluator
  reads those maps: mIoU of a panoptic model, as the official evaluates it).

detectron2's ``builtin`` module registers the first four names at import time with loaders
bound to ``$DETECTRON2_DATASETS`` of that moment; they are replaced here by loaders that
resolve the root when they run (as every sgr_d2 dataset does), check the folders and files
(errors name the missing one and the layout), and refresh the metadata's paths
(``image_root``, ``json_file``, ``panoptic_root``, ``panoptic_json``, ``sem_seg_root``, which
the evaluators read) to what they read. detectron2's other COCO names (``*_panoptic_separated``,
``*_stuffonly``, 2014, ...) are left as detectron2 registers them.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES, _get_builtin_metadata
from detectron2.data.datasets.coco import load_coco_json
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json

from .layout import (
    INSTANCE_FROM_PANOPTIC,
    datasets_root,
    refresh_metadata_paths,
    register_paths,
    replace_dataset,
    require_dir,
    require_file,
)

__all__ = ["coco_panoptic_metadata", "load_coco_instances", "load_coco_panoptic", "register_all_coco"]

_SPLITS = {"train": "train2017", "val": "val2017"}
_PREPARE_SEM = "datasets/prepare_coco_semantic_annos_from_panoptic_annos.py"
_LAYOUT = """\
coco/
  {train,val}2017/*.jpg
  annotations/instances_{train,val}2017.json
  annotations/panoptic_{train,val}2017.json
  panoptic_{train,val}2017/*.png
  panoptic_semseg_{train,val}2017/*.png   (made by prepare_coco_semantic_annos_from_panoptic_annos.py)"""


def _paths(root: str, split: str) -> dict:
    coco = os.path.join(root, "coco")
    return dict(
        image_root=os.path.join(coco, split),
        json_file=os.path.join(coco, "annotations", f"instances_{split}.json"),
        panoptic_root=os.path.join(coco, f"panoptic_{split}"),
        panoptic_json=os.path.join(coco, "annotations", f"panoptic_{split}.json"),
        sem_seg_root=os.path.join(coco, f"panoptic_semseg_{split}"),
    )


def _metadata_paths(root: Optional[str], split: str, keys) -> dict:
    paths = _paths(datasets_root(root), split)
    return {k: paths[k] for k in keys}


def coco_panoptic_metadata(with_sem_seg: bool) -> dict:
    """The class metadata of the COCO panoptic names (133 categories: 80 things, then 53 stuff).

    ``thing_classes`` / ``thing_colors`` hold the 80 things; ``stuff_classes`` /
    ``stuff_colors`` all 133; ``thing_dataset_id_to_contiguous_id`` maps the things' COCO ids
    to their index among the 133; ``stuff_dataset_id_to_contiguous_id`` maps the stuff ids
    (``with_sem_seg=False``, detectron2's "standard" metadata) or all 133 ids (``True``,
    Mask2Former's ``_with_sem_seg`` metadata, which the semantic evaluator needs).
    """
    meta = _get_builtin_metadata("coco_panoptic_standard")
    meta["thing_classes"] = [c["name"] for c in COCO_CATEGORIES if c["isthing"]]
    meta["thing_colors"] = [c["color"] for c in COCO_CATEGORIES if c["isthing"]]
    if with_sem_seg:
        meta["stuff_dataset_id_to_contiguous_id"] = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}
    return meta


def _check(root: str, split: str, dataset: str, *keys: str) -> dict:
    paths = _paths(root, split)
    require_dir(os.path.join(root, "coco"), dataset=dataset, layout=_LAYOUT)
    for key in keys:
        require = require_file if key.endswith("json") or key == "json_file" else require_dir
        require(paths[key], dataset=dataset, layout=_LAYOUT, prepare=_PREPARE_SEM if key == "sem_seg_root" else None)
    return paths


def load_coco_instances(split: str, root: Optional[str] = None, name: Optional[str] = None) -> list:
    """detectron2's ``load_coco_json`` of ``coco/annotations/instances_<split>.json``, root
    resolved now; ``split`` is ``"train2017"`` or ``"val2017"``."""
    root = datasets_root(root)
    paths = _check(root, split, name or f"COCO {split}", "image_root", "json_file")
    if name is not None:
        refresh_metadata_paths(name, image_root=paths["image_root"], json_file=paths["json_file"])
    return load_coco_json(paths["json_file"], paths["image_root"], name)


def load_coco_panoptic(split: str, root: Optional[str] = None, name: Optional[str] = None,
                       with_sem_seg: bool = False) -> list:
    """detectron2's ``load_coco_panoptic_json`` of ``coco/annotations/panoptic_<split>.json``
    (dicts with ``file_name``, ``image_id``, ``pan_seg_file_name`` and ``segments_info`` with
    contiguous ``category_id`` and ``isthing``), root resolved now; with ``with_sem_seg`` each
    dict also gets ``sem_seg_file_name`` (``coco/panoptic_semseg_<split>/<same name>.png``)."""
    root = datasets_root(root)
    keys = ["image_root", "panoptic_root", "panoptic_json"] + (["sem_seg_root"] if with_sem_seg else [])
    paths = _check(root, split, name or f"COCO panoptic {split}", *keys)
    if not with_sem_seg:
        del paths["sem_seg_root"]
    if name is not None:
        refresh_metadata_paths(name, **paths)
    dicts = load_coco_panoptic_json(paths["panoptic_json"], paths["image_root"], paths["panoptic_root"],
                                    coco_panoptic_metadata(with_sem_seg))
    for d in dicts if with_sem_seg else ():
        d["sem_seg_file_name"] = os.path.join(paths["sem_seg_root"], os.path.basename(d["pan_seg_file_name"]))
    return dicts


def register_all_coco(root: Optional[str] = None) -> None:
    """Register the six names above. With ``root=None`` the loaders read ``$DETECTRON2_DATASETS``
    when they run."""
    for short, split in _SPLITS.items():
        name = f"coco_2017_{short}"
        paths = functools.partial(_metadata_paths, root, split, ("image_root", "json_file"))
        replace_dataset(name, functools.partial(load_coco_instances, split, root, name),
                        dict(_get_builtin_metadata("coco"), **paths(), evaluator_type="coco"))
        register_paths(name, paths)
        for suffix, with_sem_seg in (("_panoptic", False), ("_panoptic_with_sem_seg", True)):
            pname = name + suffix
            keys = ("image_root", "json_file", "panoptic_root", "panoptic_json") + (
                ("sem_seg_root",) if with_sem_seg else ())
            paths = functools.partial(_metadata_paths, root, split, keys)
            meta = dict(coco_panoptic_metadata(with_sem_seg), **paths(), evaluator_type="coco_panoptic_seg",
                        ignore_label=255, label_divisor=1000, instance_source=INSTANCE_FROM_PANOPTIC)
            replace_dataset(pname, functools.partial(load_coco_panoptic, split, root, pname, with_sem_seg), meta)
            register_paths(pname, paths)


register_all_coco()
