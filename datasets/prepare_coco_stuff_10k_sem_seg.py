#!/usr/bin/env python3
"""Convert the official COCO-Stuff-10K v1.1 release to detectron2 image / label-map folders.

Reads   $DETECTRON2_DATASETS/coco/coco_stuff_10k/
          imageLists/{train,test}.txt   (one image name per line, e.g. COCO_train2014_000000000077)
          images/<name>.jpg
          annotations/<name>.mat        (MATLAB v5 file; key "S": 0 = unlabeled, else COCO id 1..182)
Writes  $DETECTRON2_DATASETS/coco/coco_stuff_10k/
          images_detectron2/{train,test}/<name>.jpg        (hard link, or copy across devices)
          annotations_detectron2/{train,test}/<name>.png   (171 classes -> 0..170, unlabeled -> 255)

The 171 classes are the COCO ids 1..182 except the 11 thing ids no COCO release annotates
(12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91), numbered in increasing id order; a file holding
one of those ids, or an id above 182, is rejected. An output newer than its input is left
alone, so the script can be re-run (or resumed) at no cost.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sgr_d2.data.prepare import missing_error, prepare_main, write_label_png
from sgr_d2.files import atomic_write

SPLITS = ("train", "test")
IGNORE = 255
UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
USED_IDS = tuple(i for i in range(1, 183) if i not in UNUSED_IDS)  # 171 ids, increasing
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
LAYOUT = """\
$DETECTRON2_DATASETS/
  coco/coco_stuff_10k/
    imageLists/{train,test}.txt
    images/COCO_*.jpg
    annotations/COCO_*.mat   (official v1.1 release, key "S")"""

# Lookup table: raw value (0 or COCO id) -> contiguous id; unused/unknown ids are rejected first.
_LUT = np.full(256, IGNORE, dtype=np.uint8)
for _k, _cid in enumerate(USED_IDS):
    _LUT[_cid] = _k
_VALID = np.zeros(256, dtype=bool)
_VALID[[0, *USED_IDS]] = True


class MatFileVersionError(ValueError):
    """The .mat file is MATLAB v7.3 (HDF5), which scipy.io.loadmat cannot read."""


def _missing(path: Path, what: str) -> FileNotFoundError:
    return missing_error("COCO-Stuff-10K", path, what, LAYOUT, "coco/")


def read_label_mat(path: Path) -> np.ndarray:
    """The ``S`` label array of one COCO-Stuff-10K .mat file (v5 format, via scipy)."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    v73 = MatFileVersionError(
        f"{path}: MATLAB v7.3 (HDF5) .mat file; expected the MATLAB v5 files of the official "
        "COCO-Stuff-10K v1.1 release, which scipy.io.loadmat reads. Re-download the release, or "
        "re-save the file from MATLAB with save(..., '-v7')."
    )
    with open(path, "rb") as f:
        head = f.read(520)
    if head[:8] == HDF5_SIGNATURE or head[512:520] == HDF5_SIGNATURE:
        raise v73
    try:
        mat = loadmat(str(path))
    except NotImplementedError as e:  # scipy's answer to the v7.3 version field
        raise v73 from e
    except (ValueError, MatReadError) as e:
        raise ValueError(f"{path}: not a readable .mat file ({e})") from e
    if "S" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise KeyError(f"{path}: no key 'S' (the label map) in the .mat file; keys: {keys}")
    labels = np.asarray(mat["S"])
    whole = np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))
    if labels.ndim == 2 and whole:
        labels = labels.astype(np.int64)  # MATLAB "double" holding whole numbers
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: 'S' should be a 2-D array of integer labels, got "
                         f"{labels.dtype} {labels.shape}")
    return labels


def convert_label(src: Path, dst: Path, image: Path | None = None) -> None:
    """Write the 0..170/255 label map of one .mat file (atomically)."""
    raw = read_label_mat(src)
    if image is not None:
        with Image.open(image) as im:
            if im.size != (raw.shape[1], raw.shape[0]):
                raise ValueError(f"{src}: label map is {raw.shape[1]}x{raw.shape[0]} (WxH) but "
                                 f"image {image} is {im.size[0]}x{im.size[1]}")
    values = np.unique(raw)
    out_of_range = values[(values < 0) | (values > 182)]
    if out_of_range.size:
        raise ValueError(f"{src}: label values {out_of_range.tolist()} outside 0..182 "
                         "(0 = unlabeled, else a COCO id)")
    unused = values[~_VALID[values]]
    if unused.size:
        raise ValueError(f"{src}: COCO ids {unused.tolist()} are not COCO-Stuff classes (unused ids "
                         f"{list(UNUSED_IDS)} never appear in valid annotations)")
    write_label_png(_LUT[raw.astype(np.intp)], dst)


def link_image(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (copy with its mtime if linking fails)."""
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        with open(src, "rb") as f:
            atomic_write(str(dst), lambda out: shutil.copyfileobj(f, out))
        shutil.copystat(src, dst)  # the mode and times of src, as copy2 gives them


def _do(src: Path, dst: Path, kind: str, image: Path | None) -> None:
    if kind == "image":
        link_image(src, dst)
    else:
        convert_label(src, dst, image)


def _read_list(path: Path) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        name = line.strip()
        if not name:
            continue
        for ext in (".jpg", ".mat", ".png"):
            if name.endswith(ext):
                name = name[: -len(ext)]
        names.append(name)
    return names


def collect(root: Path, split: str) -> list[tuple]:
    """Tasks (src, dst, kind, image) of one split; raises if a list, image or label is missing."""
    base = root / "coco" / "coco_stuff_10k"
    list_file = base / "imageLists" / f"{split}.txt"
    if not list_file.is_file():
        raise _missing(list_file, f"image list of split {split!r}")
    names = _read_list(list_file)
    if not names:
        raise ValueError(f"COCO-Stuff-10K: image list {list_file} is empty")
    tasks = []
    for name in names:
        image, mat = base / "images" / f"{name}.jpg", base / "annotations" / f"{name}.mat"
        if not image.is_file():
            raise _missing(image, f"image {name!r} listed in {list_file}")
        if not mat.is_file():
            raise _missing(mat, f"label file of image {str(image)!r}")
        tasks.append((image, base / "images_detectron2" / split / image.name, "image", None))
        tasks.append((mat, base / "annotations_detectron2" / split / f"{name}.png", "label", image))
    return tasks


def _check_root(root: Path) -> None:
    base = root / "coco" / "coco_stuff_10k"
    if not base.is_dir():
        raise _missing(base, "dataset folder")
    for sub in ("images", "annotations", "imageLists"):
        if not (base / sub).is_dir():
            raise _missing(base / sub, f"folder {sub}/")


def main(argv=None) -> int:
    base = Path("coco") / "coco_stuff_10k"
    return prepare_main(
        argv, __doc__.split("\n")[0], "COCO-Stuff-10K", _check_root, collect, SPLITS, _do,
        lambda root, split: (f"{root / base / 'images_detectron2' / split}, "
                             f"{root / base / 'annotations_detectron2' / split}"),
        unit="file")


if __name__ == "__main__":
    sys.exit(main())
