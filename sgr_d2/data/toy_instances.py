"""``sgr_toy_instances_train`` / ``_val``: the toy scenes (``sgr_d2.data.toy``) as a COCO
instance-segmentation dataset, for Mask R-CNN (docs/method.md#transfer-to-detection, on a CPU).

The things of ``sgr_toy`` (``ball``, ``box``, ``kite``, COCO category ids 1, 2, 3) are read from
the instance-id PNGs (0 = stuff / ignore, 1.. = objects). Each instance becomes a COCO
annotation with an RLE mask (pycocotools; exact, with the counts stored as text), its box
(``toBbox``, XYWH) and area. Objects drawn later may cover part of earlier ones: the mask is what
remains visible, and an object covered entirely is absent.

On first use the split's COCO file is written beside the toy data as
``$DETECTRON2_DATASETS/sgr_toy/instances_<split>.json`` (deterministic; rewritten when the toy
recipe changes) and the dicts are loaded from it with detectron2's ``load_coco_json``. The
metadata's ``json_file`` names that file once it exists, so ``COCOEvaluator`` reads the same
ground truth; should an evaluator be built before the data were ever loaded in this process,
it converts the dicts to COCO json itself (detectron2's fallback), with the same content.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ..files import atomic_write_text
from .toy import TOY_COLORS, TOY_SPLITS, TOY_VERSION, generate_toy_split, toy_root

__all__ = ["TOY_THING_CLASSES", "toy_instances_json", "toy_coco_dict", "coco_mask_annotation", "register_toy_instances"]

TOY_THING_CLASSES = ["ball", "box", "kite"]
_FIRST_THING = 3  # semantic id of "ball" in TOY_CLASSES
_FORMAT_VERSION = 1  # of the COCO file written here


def _stamp(split: str) -> dict:
    n, seed = TOY_SPLITS[split]
    return {"toy_version": TOY_VERSION, "format": _FORMAT_VERSION, "split": split, "count": n, "seed": seed}


def coco_mask_annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int) -> dict:
    """One COCO instance annotation of the bool (H, W) ``mask``: an exact RLE (pycocotools; the
    counts as text, so the dict is JSON), its area and its XYWH box (``toBbox``), not crowd.
    The toy instance files (here, :mod:`.toy_panoptic`) are written with it."""
    h, w = mask.shape
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": {"size": [int(h), int(w)], "counts": rle["counts"].decode("ascii")},
        "area": float(mask_util.area(rle)),
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "iscrowd": 0,
    }


def toy_coco_dict(split: str, root: Path) -> dict:
    """The COCO dict of ``split`` from the PNGs under ``root`` (which must exist)."""
    image_dir = root / "images" / split
    inst_dir = root / "instances" / split
    sem_dir = root / "annotations" / split
    images, annotations = [], []
    for image_id, img_path in enumerate(sorted(image_dir.glob("*.jpg")), start=1):
        stem = img_path.stem
        inst = cv2.imread(str(inst_dir / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        sem = cv2.imread(str(sem_dir / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        if inst is None or sem is None:
            raise FileNotFoundError(f"sgr_toy: {inst_dir / (stem + '.png')} or {sem_dir / (stem + '.png')} "
                                    "is missing or unreadable")
        h, w = inst.shape
        images.append({"id": image_id, "file_name": img_path.name, "height": h, "width": w})
        for obj in np.unique(inst):
            if obj == 0:
                continue
            mask = inst == obj
            classes = np.unique(sem[mask])
            if len(classes) != 1 or not _FIRST_THING <= int(classes[0]) < _FIRST_THING + len(TOY_THING_CLASSES):
                raise ValueError(f"sgr_toy: instance {int(obj)} of {inst_dir / (stem + '.png')} covers "
                                 f"semantic classes {classes.tolist()}; expected one thing class")
            annotations.append(coco_mask_annotation(mask, len(annotations) + 1, image_id,
                                                    int(classes[0]) - _FIRST_THING + 1))
    if not images:
        raise FileNotFoundError(f"sgr_toy: no images in {image_dir}")
    return {
        "info": {"description": f"sgr_toy {split} instances (sgr_d2.data.toy_instances)", **_stamp(split)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "thing"} for i, n in enumerate(TOY_THING_CLASSES)],
    }


def toy_instances_json(split: str, root: Path | None = None) -> Path:
    """Generate the toy split if needed and write its COCO file (idempotent); return its path."""
    if split not in TOY_SPLITS:
        raise KeyError(f"sgr_toy has splits {sorted(TOY_SPLITS)}, not {split!r}")
    root = generate_toy_split(split, root)
    path = root / f"instances_{split}.json"
    if path.is_file():
        try:
            info = json.loads(path.read_text()).get("info", {})
        except ValueError:
            info = {}  # a damaged file is written again
        if info.get("toy_version") == TOY_VERSION and info.get("format") == _FORMAT_VERSION:
            return path
    atomic_write_text(str(path), json.dumps(toy_coco_dict(split, root)))  # readers: the old file or the whole new one
    return path


def _load(split: str, name: str):
    path = toy_instances_json(split)
    dicts = load_coco_json(str(path), str(path.parent / "images" / split), name)
    meta = MetadataCatalog.get(name)
    if not hasattr(meta, "json_file"):
        meta.json_file = str(path)
    return dicts


def register_toy_instances():
    root = toy_root()
    for split in TOY_SPLITS:
        name = f"sgr_toy_instances_{split}"
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda s=split, n=name: _load(s, n))
        meta = MetadataCatalog.get(name)
        meta.set(
            thing_classes=list(TOY_THING_CLASSES),
            thing_colors=[list(c) for c in TOY_COLORS[_FIRST_THING:]],
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(TOY_THING_CLASSES))},
            image_root=str(root / "images" / split),
            evaluator_type="coco",
        )
        path = root / f"instances_{split}.json"
        if path.is_file():
            meta.json_file = str(path)


register_toy_instances()
