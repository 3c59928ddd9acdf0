#!/usr/bin/env python3
"""Write ADE20K's instance annotation as COCO-format JSON (the ``ade20k_instance_*`` datasets).

Reads   $DETECTRON2_DATASETS/ADEChallengeData2016/
          images/{training,validation}/*.jpg
          annotations_instance/{training,validation}/*.png   (red = thing category 1..100 of the
                                                              instance challenge, green = instance id)
Writes  $DETECTRON2_DATASETS/ADEChallengeData2016/ade20k_instance_{train,val}.json

As Mask2Former's script of this name: one annotation per object (its RLE mask, ``bbox``,
``area``, ``iscrowd`` 0, ``category_id`` = the 0-based ADE20K class index of its thing
category, ids 1, 2, ... over the split in image order), images with their name without
extension as ``id``, and the 100 thing categories (0-based class index, name). The JSON is
rewritten when it is missing or older than an input.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pycocotools.mask as mask_util
import numpy as np
from PIL import Image

from sgr_d2.data.datasets.register_ade20k import ADE20K_150_CLASSES, ADE20K_THING_IDS
from sgr_d2.data.datasets.register_ade20k_panoptic import read_ade20k_instances
from sgr_d2.data.prepare import SplitSummary, images_with_files, mask_bbox, missing_error, prepare_main, write_json

SPLITS = ("training", "validation")
SHORT = {"training": "train", "validation": "val"}
BASE = "ADEChallengeData2016"
LAYOUT = """\
$DETECTRON2_DATASETS/
  ADEChallengeData2016/
    images/{training,validation}/ADE_*.jpg
    annotations_instance/{training,validation}/ADE_*.png   (ADE20K instance annotation)"""
CATEGORIES = [{"id": i, "name": ADE20K_150_CLASSES[i]} for i in ADE20K_THING_IDS]


def _missing(path: Path, what: str) -> FileNotFoundError:
    return missing_error("ADE20K", path, what, LAYOUT, "ADEChallengeData2016")


def convert(inst_src: Path, image: Path):
    """The image's ``images`` entry and its objects' annotations (without ``id``)."""
    shape, objects = read_ade20k_instances(str(inst_src))
    with Image.open(image) as im:
        width, height = im.size
    if (height, width) != tuple(shape):
        raise ValueError(f"{inst_src} is {shape[1]}x{shape[0]} (WxH) but image {image} is {width}x{height}")
    annotations = []
    for _, category, mask in objects:
        rle = mask_util.encode(np.asfortranarray(mask[:, :, None].astype(np.uint8)))[0]
        rle["counts"] = rle["counts"].decode("utf-8")
        annotations.append({"image_id": image.stem, "iscrowd": 0, "category_id": category,
                            "bbox": mask_bbox(mask), "segmentation": rle, "area": int(mask_util.area(rle))})
    return {"id": image.stem, "file_name": image.name, "width": width, "height": height}, annotations


def collect(root: Path, split: str) -> list[tuple]:
    """(instance PNG, image) of one split; raises if any is missing."""
    base = root / BASE
    found = images_with_files(base / "images" / split, [(base / "annotations_instance" / split, "instance map")],
                              split, _missing)
    return [(inst, image) for image, (inst,) in found]


def _json_path(root: Path, split: str) -> Path:
    return root / BASE / f"ade20k_instance_{SHORT[split]}.json"


def _write_json(root: Path, split: str, tasks: list, results: list) -> None:
    annotations = [a for _, anns in results for a in anns]
    for k, a in enumerate(annotations, start=1):
        a["id"] = k
    write_json({"images": [image for image, _ in results], "categories": CATEGORIES,
                "annotations": annotations}, _json_path(root, split))


def _check_root(root: Path) -> None:
    if not (root / BASE).is_dir():
        raise _missing(root / BASE, "dataset folder")


def main(argv=None) -> int:
    return prepare_main(argv, __doc__.split("\n")[0], "ADE20K instance", _check_root, collect, SPLITS,
                        convert, lambda root, split: str(_json_path(root, split)),
                        summary=SplitSummary(_json_path, _write_json))


if __name__ == "__main__":
    sys.exit(main())
