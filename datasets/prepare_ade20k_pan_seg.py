#!/usr/bin/env python3
"""Combine ADE20K's semantic and instance annotations into a COCO-format panoptic annotation.

Reads   $DETECTRON2_DATASETS/ADEChallengeData2016/
          images/{training,validation}/*.jpg
          annotations/{training,validation}/*.png            (0 = other, 1..150 = classes)
          annotations_instance/{training,validation}/*.png   (red = thing category 1..100 of the
                                                              instance challenge, green = instance id)
Writes  $DETECTRON2_DATASETS/ADEChallengeData2016/
          ade20k_panoptic_{train,val}/*.png   (COCO panoptic PNGs)
          ade20k_panoptic_{train,val}.json    ("images", "annotations", "categories": the 150
                                               classes, 0-based ids, 100 of them things)

As Mask2Former's script of this name: each stuff class present in the semantic map is one
segment; each object of the instance map is one segment of its thing class, drawn over the
stuff (the two annotations overlap a little); thing-class pixels of the semantic map that no
object covers, and "other", are VOID. A stuff segment's ``area`` and ``bbox`` are those of its
class in the semantic map before the objects are drawn over it (the official script's
numbers, which PQ's union reads). Unlike the official script, segment ids are deterministic:
``(class + 1) * 1000 + k`` (k = 0 for stuff, the object's instance id for things), where the
official draws random colors near the class color; segments, classes, areas and boxes are
the same. The JSON is rewritten when it is missing or older than an input; a panoptic PNG
newer than its inputs is left alone.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sgr_d2.data.datasets.register_ade20k import ADE20K_150_CLASSES, ADE20K_150_COLORS, ADE20K_THING_IDS
from sgr_d2.data.datasets.register_ade20k_panoptic import read_ade20k_instances
from sgr_d2.data.prepare import (SplitSummary, images_with_files, mask_bbox, missing_error, prepare_main,
                                 read_label_png, up_to_date, write_json, write_panoptic_png)

SPLITS = ("training", "validation")
SHORT = {"training": "train", "validation": "val"}
NUM_CLASSES = 150
BASE = "ADEChallengeData2016"
LAYOUT = """\
$DETECTRON2_DATASETS/
  ADEChallengeData2016/
    images/{training,validation}/ADE_*.jpg
    annotations/{training,validation}/ADE_*.png            (0 = other, 1..150 = classes)
    annotations_instance/{training,validation}/ADE_*.png   (ADE20K instance annotation)"""
THINGS = frozenset(ADE20K_THING_IDS)
CATEGORIES = [{"id": i, "name": ADE20K_150_CLASSES[i], "isthing": int(i in THINGS),
               "color": list(ADE20K_150_COLORS[i])} for i in range(NUM_CLASSES)]


def _missing(path: Path, what: str) -> FileNotFoundError:
    return missing_error("ADE20K", path, what, LAYOUT, "ADEChallengeData2016")


def _segment(segment_id: int, category: int, mask: np.ndarray) -> dict:
    return {"id": segment_id, "category_id": category, "area": int(mask.sum()), "bbox": mask_bbox(mask),
            "iscrowd": 0}


def panoptic_annotation(sem_src: Path, inst_src: Path):
    """``(ids (H, W) int64, segments_info)`` of one image (see the module docstring)."""
    raw = read_label_png(sem_src)
    bad = np.unique(raw[raw > NUM_CLASSES])
    if bad.size:
        raise ValueError(f"{sem_src}: label values {bad.tolist()} outside 0..{NUM_CLASSES}")
    shape, objects = read_ade20k_instances(str(inst_src))
    if tuple(shape) != raw.shape:
        raise ValueError(f"{inst_src} is {shape[1]}x{shape[0]} (WxH) but {sem_src} is {raw.shape[1]}x{raw.shape[0]}")
    sem = raw.astype(np.int64) - 1  # "other" -> -1
    ids = np.zeros(raw.shape, dtype=np.int64)
    segments = []
    for c in np.unique(sem).tolist():
        if c < 0 or c in THINGS:
            continue
        mask = sem == c
        ids[mask] = (c + 1) * 1000
        segments.append(_segment((c + 1) * 1000, c, mask))
    for k, c, mask in objects:
        ids[mask] = (c + 1) * 1000 + k
        segments.append(_segment((c + 1) * 1000 + k, c, mask))
    return ids, segments


def convert(sem_src: Path, pan_dst: Path, inst_src: Path, image: Path):
    """Write one panoptic PNG (unless up to date); return the image's ``images`` and
    ``annotations`` entries of the JSON."""
    ids, segments = panoptic_annotation(sem_src, inst_src)
    with Image.open(image) as im:
        width, height = im.size
    if (height, width) != ids.shape:
        raise ValueError(f"{sem_src} is {ids.shape[1]}x{ids.shape[0]} (WxH) but image {image} is {width}x{height}")
    if not (up_to_date(sem_src, pan_dst) and up_to_date(inst_src, pan_dst)):
        write_panoptic_png(ids, pan_dst)
    return ({"id": image.stem, "file_name": image.name, "width": width, "height": height},
            {"image_id": image.stem, "file_name": pan_dst.name, "segments_info": segments})


def collect(root: Path, split: str) -> list[tuple]:
    """(semantic PNG, panoptic PNG, instance PNG, image) of one split; raises if any is missing."""
    base = root / BASE
    out_dir = base / f"ade20k_panoptic_{SHORT[split]}"
    found = images_with_files(base / "images" / split, [(base / "annotations" / split, "label map"),
                                                        (base / "annotations_instance" / split, "instance map")],
                              split, _missing)
    return [(sem, out_dir / sem.name, inst, image) for image, (sem, inst) in found]


def _json_path(root: Path, split: str) -> Path:
    return root / BASE / f"ade20k_panoptic_{SHORT[split]}.json"


def _write_json(root: Path, split: str, tasks: list, results: list) -> None:
    write_json({"images": [r[0] for r in results], "annotations": [r[1] for r in results],
                "categories": CATEGORIES}, _json_path(root, split))


def _check_root(root: Path) -> None:
    if not (root / BASE).is_dir():
        raise _missing(root / BASE, "dataset folder")


def main(argv=None) -> int:
    return prepare_main(
        argv, __doc__.split("\n")[0], "ADE20K panoptic", _check_root, collect, SPLITS, convert,
        lambda root, split: f"{root / BASE / f'ade20k_panoptic_{SHORT[split]}'}, {_json_path(root, split)}",
        summary=SplitSummary(_json_path, _write_json))


if __name__ == "__main__":
    sys.exit(main())
