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

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sgr_d2.data.prepare import run_conversions, up_to_date

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
    return FileNotFoundError(
        f"ADE20K: {what} not found: {str(path)!r}.\nExpected layout:\n{LAYOUT}\n"
        "See datasets/README.md (set DETECTRON2_DATASETS to the folder holding ADEChallengeData2016)."
    )


def convert_label(src: Path, dst: Path) -> None:
    """Write the detectron2 label map of one raw ADE20K label map (atomically)."""
    with Image.open(src) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{src}: expected a single-channel label map, got PIL mode {im.mode!r}")
        raw = np.asarray(im)
    bad = np.unique(raw[(raw < 0) | (raw > NUM_CLASSES)])
    if bad.size:
        raise ValueError(f"{src}: label values {bad.tolist()} outside 0..{NUM_CLASSES}")
    out = _LUT[raw.astype(np.intp)]
    tmp = dst.with_name(dst.name + ".tmp")
    Image.fromarray(out, mode="L").save(tmp, format="PNG")
    os.replace(tmp, dst)


def _convert_pair(pair: tuple[Path, Path]) -> None:
    convert_label(*pair)


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None,
                        help="datasets root (default: $DETECTRON2_DATASETS, else ./datasets)")
    parser.add_argument("--workers", type=int, default=1, help="processes to convert with")
    args = parser.parse_args(argv)
    root = Path(args.root or os.environ.get("DETECTRON2_DATASETS") or "datasets")
    if not (root / "ADEChallengeData2016").is_dir():
        raise _missing(root / "ADEChallengeData2016", "dataset folder")

    plan = {split: collect(root, split) for split in SPLITS}  # check everything before writing
    for split, pairs in plan.items():
        todo = [(src, dst) for src, dst in pairs if not up_to_date(src, dst)]
        if todo:
            todo[0][1].parent.mkdir(parents=True, exist_ok=True)
        desc = f"ADE20K {split}"
        run_conversions(_convert_pair, todo, len(pairs), desc, args.workers, unit="img")
        print(f"{desc}: {len(todo)} written, {len(pairs) - len(todo)} up to date "
              f"-> {root / 'ADEChallengeData2016' / 'annotations_detectron2' / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
