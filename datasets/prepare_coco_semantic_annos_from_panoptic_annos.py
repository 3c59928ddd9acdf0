#!/usr/bin/env python3
"""Derive COCO semantic label maps (133 classes) from the COCO panoptic annotation.

Reads   $DETECTRON2_DATASETS/coco/annotations/panoptic_{train,val}2017.json
        $DETECTRON2_DATASETS/coco/panoptic_{train,val}2017/*.png   (COCO panoptic format)
Writes  $DETECTRON2_DATASETS/coco/panoptic_semseg_{train,val}2017/*.png
        (the pixels of every segment, crowd ones included, hold the index of its category among
        the 133 of the panoptic task: 80 things then 53 stuff, in COCO id order; VOID -> 255)

The semantic maps of the ``coco_2017_*_panoptic_with_sem_seg`` datasets, which the semantic
evaluator reads (mIoU of a panoptic model); the same files as Mask2Former's script of this name.
A category id the panoptic task does not have, or a segment id missing from its PNG, is an
error naming the file. An output newer than its panoptic PNG and the json is left alone, so the
script can be re-run (or resumed) at no cost.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from sgr_d2.data.datasets.register_coco import coco_panoptic_metadata
from sgr_d2.data.labels import panoptic_maps, read_panoptic_png, rgb2id
from sgr_d2.data.prepare import missing_error, prepare_main, write_label_png

SPLITS = ("val2017", "train2017")
IGNORE = 255
LAYOUT = """\
$DETECTRON2_DATASETS/
  coco/
    annotations/panoptic_{train,val}2017.json
    panoptic_{train,val}2017/*.png"""
# COCO category id -> index among the 133 panoptic categories
ID_TO_INDEX = coco_panoptic_metadata(with_sem_seg=True)["stuff_dataset_id_to_contiguous_id"]


def _missing(path: Path, what: str) -> FileNotFoundError:
    return missing_error("COCO panoptic", path, what, LAYOUT, "coco/")


def convert_panoptic(src: Path, dst: Path, segments: list, json_file: Path) -> None:
    """Write the semantic map of one panoptic PNG and its ``segments_info`` (atomically)."""
    ids = rgb2id(read_panoptic_png(str(src)))
    present = set(np.unique(ids).tolist())
    mapped = []
    for seg in segments:
        if seg["category_id"] not in ID_TO_INDEX:
            raise ValueError(f"{src}: segment {seg['id']} has category id {seg['category_id']}, which is "
                             "not one of the 133 COCO panoptic categories")
        if seg["id"] not in present:
            raise ValueError(f"{src}: segment {seg['id']} of the json does not occur in the PNG")
        mapped.append(dict(seg, category_id=ID_TO_INDEX[seg["category_id"]]))
    labels, _ = panoptic_maps(ids, mapped, (), IGNORE, crowd_labels=True)
    write_label_png(labels.astype(np.uint8), dst)


def collect(root: Path, split: str) -> list[tuple]:
    """(panoptic PNG, semantic PNG, segments, json) of one split; raises if the json or a PNG is missing."""
    coco = root / "coco"
    json_file, pan_dir = coco / "annotations" / f"panoptic_{split}.json", coco / f"panoptic_{split}"
    if not json_file.is_file():
        raise _missing(json_file, f"panoptic annotation of split {split!r}")
    if not pan_dir.is_dir():
        raise _missing(pan_dir, f"panoptic PNG folder of split {split!r}")
    with open(json_file) as f:
        annotations = json.load(f)["annotations"]
    tasks = []
    for ann in annotations:
        src = pan_dir / ann["file_name"]
        if not src.is_file():
            raise _missing(src, f"panoptic PNG of image {ann['image_id']!r} (listed in {json_file})")
        tasks.append((src, coco / f"panoptic_semseg_{split}" / ann["file_name"], ann["segments_info"], json_file))
    return tasks


def _check_root(root: Path) -> None:
    if not (root / "coco").is_dir():
        raise _missing(root / "coco", "dataset folder")


def main(argv=None) -> int:
    return prepare_main(argv, __doc__.split("\n")[0], "COCO panoptic", _check_root, collect, SPLITS,
                        convert_panoptic, lambda root, split: str(root / "coco" / f"panoptic_semseg_{split}"))


if __name__ == "__main__":
    sys.exit(main())
