#!/usr/bin/env python3
"""Convert ADE20K (SceneParsing 2016) label maps to detectron2's convention.

Reads   $DETECTRON2_DATASETS/ADEChallengeData2016/annotations/{training,validation}/*.png
        (0 = "other", 1..150 = the classes of objectInfo150)
Writes  $DETECTRON2_DATASETS/ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png
        (class k -> k-1 in 0..149, "other" -> 255 = ignore)

Every image of images/<split>/*.jpg must have its label map. An output newer than its input is
left alone, so the script can be re-run (or resumed) at no cost. $DETECTRON2_DATASETS defaults
to ./datasets; see datasets/README.md for the whole layout.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sgr_d2.data.prepare import missing_error, prepare_main, read_label_png, write_label_png

SPLITS = ("training", "validation")
NUM_CLASSES = 150
IGNORE = 255
LAYOUT = """\
$DETECTRON2_DATASETS/
  ADEChallengeData2016/
    images/{training,validation}/ADE_*.jpg
    annotations/{training,validation}/ADE_*.png   (0 = other, 1..150 = classes)"""

# Lookup table: raw value -> detectron2 value (values above 150 are rejected before use).
_LUT = np.full(256, IGNORE, dtype=np.uint8)
_LUT[1 : NUM_CLASSES + 1] = np.arange(NUM_CLASSES, dtype=np.uint8)


def _missing(path: Path, what: str) -> FileNotFoundError:
    return missing_error("ADE20K", path, what, LAYOUT, "ADEChallengeData2016")


def convert_label(src: Path, dst: Path) -> None:
    """Write the detectron2 label map of one raw ADE20K label map (atomically)."""
    raw = read_label_png(src)
    bad = np.unique(raw[(raw < 0) | (raw > NUM_CLASSES)])
    if bad.size:
        raise ValueError(f"{src}: label values {bad.tolist()} outside 0..{NUM_CLASSES}")
    write_label_png(_LUT[raw.astype(np.intp)], dst)


def collect(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(raw label, output label) pairs of one split; raises if a folder or label is missing."""
    base = root / "ADEChallengeData2016"
    image_dir, ann_dir = base / "images" / split, base / "annotations" / split
    for path, what in ((image_dir, f"image folder of split {split!r}"),
                       (ann_dir, f"annotation folder of split {split!r}")):
        if not path.is_dir():
            raise _missing(path, what)
    images = sorted(image_dir.glob("*.jpg"))
    if not images:
        raise _missing(image_dir / "*.jpg", f"images of split {split!r}")
    out_dir = base / "annotations_detectron2" / split
    pairs = []
    for image in images:
        label = ann_dir / (image.stem + ".png")
        if not label.is_file():
            raise _missing(label, f"label map of image {str(image)!r}")
        pairs.append((label, out_dir / label.name))
    return pairs


def _check_root(root: Path) -> None:
    if not (root / "ADEChallengeData2016").is_dir():
        raise _missing(root / "ADEChallengeData2016", "dataset folder")


def main(argv=None) -> int:
    return prepare_main(
        argv, __doc__.split("\n")[0], "ADE20K", _check_root, collect, SPLITS, convert_label,
        lambda root, split: str(root / "ADEChallengeData2016" / "annotations_detectron2" / split))


if __name__ == "__main__":
    sys.exit(main())
