#!/usr/bin/env python3
"""Write Cityscapes train-id label maps (``*_gtFine_labelTrainIds.png``) from the label-id maps.

Reads   $DETECTRON2_DATASETS/cityscapes/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
        $DETECTRON2_DATASETS/cityscapes/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png
Writes  $DETECTRON2_DATASETS/cityscapes/gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png

The mapping is the ``id -> trainId`` table of ``cityscapesscripts.helpers.labels`` (labels whose
trainId is 255 or -1 become 255 = ignore). This gives the same files as cityscapesscripts'
``createTrainIdLabelImgs`` (which redraws them from the polygon json files); a label id that is
not in the table is rejected. An output newer than its input is left alone, so the script can
be re-run (or resumed) at no cost.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sgr_d2.data.prepare import missing_error, prepare_main, read_label_png, write_label_png

SPLITS = ("train", "val")
IGNORE = 255
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
OUTPUT_SUFFIX = "_gtFine_labelTrainIds.png"
LAYOUT = """\
$DETECTRON2_DATASETS/
  cityscapes/
    leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
    gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png   (also _instanceIds.png, _polygons.json)"""


def train_id_lut() -> tuple[np.ndarray, np.ndarray]:
    """(lookup table label id -> train id, mask of the label ids the table defines)."""
    from cityscapesscripts.helpers.labels import labels

    lut = np.full(256, IGNORE, dtype=np.uint8)
    known = np.zeros(256, dtype=bool)
    for label in labels:
        if label.id < 0:  # "license plate": never drawn in label-id maps
            continue
        known[label.id] = True
        lut[label.id] = label.trainId if 0 <= label.trainId < IGNORE else IGNORE
    return lut, known


_LUT, _KNOWN = train_id_lut()


def _missing(path: Path, what: str) -> FileNotFoundError:
    return missing_error("Cityscapes", path, what, LAYOUT, "cityscapes/")


def convert_label(src: Path, dst: Path) -> None:
    """Write the train-id map of one ``*_gtFine_labelIds.png`` (atomically)."""
    raw = read_label_png(src).astype(np.int64)
    values = np.unique(raw)
    unknown = values[(values < 0) | (values > 255)]
    if unknown.size == 0:
        unknown = values[~_KNOWN[values]]
    if unknown.size:
        raise ValueError(f"{src}: label ids {unknown.tolist()} are not in "
                         "cityscapesscripts.helpers.labels")
    write_label_png(_LUT[raw], dst)


def collect(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(label-id map, train-id map) pairs of one split; raises if a folder or label is missing."""
    base = root / "cityscapes"
    image_dir, gt_dir = base / "leftImg8bit" / split, base / "gtFine" / split
    for path, what in ((image_dir, f"image folder of split {split!r}"),
                       (gt_dir, f"annotation folder of split {split!r}")):
        if not path.is_dir():
            raise _missing(path, what)
    images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise _missing(image_dir / "<city>" / f"*{IMAGE_SUFFIX}", f"images of split {split!r}")
    pairs = []
    for image in images:
        stem = image.name[: -len(IMAGE_SUFFIX)]
        label = gt_dir / image.parent.name / f"{stem}{LABEL_SUFFIX}"
        if not label.is_file():
            raise _missing(label, f"label map of image {str(image)!r}")
        pairs.append((label, label.with_name(f"{stem}{OUTPUT_SUFFIX}")))
    return pairs


def _check_root(root: Path) -> None:
    if not (root / "cityscapes").is_dir():
        raise _missing(root / "cityscapes", "dataset folder")


def main(argv=None) -> int:
    return prepare_main(
        argv, __doc__.split("\n")[0], "Cityscapes", _check_root, collect, SPLITS, convert_label,
        lambda root, split: f"{root / 'cityscapes' / 'gtFine' / split}/<city>/*{OUTPUT_SUFFIX}")


if __name__ == "__main__":
    sys.exit(main())
