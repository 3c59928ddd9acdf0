#!/usr/bin/env python3
"""How long the folder dataset's scan takes (docs/own_data.md): every mask read once, its values
(class ids) or colours counted, colour masks converted, every image's header read.

The script writes N synthetic image/mask pairs (region maps of 150 classes, ADE20K-sized
512x512 by default) into a temporary folder, once with id masks and once with colour masks, and
times the registered loader (``DatasetCatalog.get("folder_sem_seg_train")``): the first load
(the scan, in threads) and a second one (the cache: a stat per file). It also times the two
ways of finding the values of a uint8 mask (``np.bincount``, what the scan uses, and
``np.unique``) and of a colour mask's class ids (a gather through a table of all 2^24 colours,
what the scan uses, and ``np.unique``).

    python bench/folder_scan.py                         # 200 pairs of 512x512
    python bench/folder_scan.py --images 1000 --size 1024
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import sgr_d2  # noqa: E402,F401  (before detectron2: compatibility shims)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from detectron2.data import DatasetCatalog  # noqa: E402

from sgr_d2.config import load_config  # noqa: E402

CONFIG = str(REPO / "configs" / "folder" / "dil_fcn_r18_sgr.yaml")
CLASSES = 150


def _labels(rng, size: int) -> np.ndarray:
    """A (size, size) uint8 map of 40 nearest-seed regions, each of a random class."""
    step = 8
    g = -(-size // step)
    seeds = rng.integers(0, g, size=(40, 2))
    yy, xx = np.mgrid[:g, :g]
    nearest = np.argmin((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, axis=-1)
    coarse = rng.integers(0, CLASSES, size=40)[nearest]
    return np.repeat(np.repeat(coarse, step, 0), step, 1)[:size, :size].astype(np.uint8)


def write_folder(root: Path, n: int, size: int, colors: bool) -> None:
    rng = np.random.default_rng(0)
    palette = rng.choice(256 ** 3, size=CLASSES, replace=False)
    palette = np.stack([palette >> 16, (palette >> 8) & 255, palette & 255], 1).astype(np.uint8)
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"class{k} {r} {g} {b}\n" for k, (r, g, b) in enumerate(palette)))
    for split, count in (("train", n), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(count):
            sem = _labels(rng, size)
            Image.fromarray(palette[sem]).save(root / "images" / split / f"{i:05d}.jpg", quality=90)
            Image.fromarray(palette[sem] if colors else sem).save(root / "masks" / split / f"{i:05d}.png")


def time_loads(root: Path, colors: bool):
    opts = ["DATASETS.FOLDER.ROOT", str(root)] + (["DATASETS.FOLDER.MASK_FORMAT", "colors"] if colors else [])
    times = []
    for _ in range(2):
        load_config(CONFIG, opts)
        t = time.perf_counter()
        DatasetCatalog.get("folder_sem_seg_train")
        times.append(time.perf_counter() - t)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200, help="training pairs (the val split has 2)")
    p.add_argument("--size", type=int, default=512, help="side of the square images and masks")
    args = p.parse_args()
    print(f"{args.images} training pairs of {args.size}x{args.size}, {CLASSES} classes, "
          f"{os.cpu_count()} CPUs")
    print("| masks | first load (scan) | per pair | second load (cache) |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for colors in (False, True):
            root = Path(tmp) / ("colors" if colors else "ids")
            write_folder(root, args.images, args.size, colors)
            first, second = time_loads(root, colors)
            n = args.images + 2
            kind = "colours (read, count, convert)" if colors else "class ids (read, count)"
            print(f"| {kind} | {first:.2f} s | {1000 * first / n:.1f} ms | {second:.3f} s |")
    sem = _labels(np.random.default_rng(1), args.size)
    codes = (sem.astype(np.uint32) * 99991) & 0xFFFFFF  # 150 distinct colour codes
    table = np.full(1 << 24, -1, np.int16)
    table[np.unique(codes)] = np.arange(len(np.unique(codes)))
    for name, fn in (("uint8 mask: values with np.bincount (the scan)", lambda: np.flatnonzero(np.bincount(sem.ravel()))),
                     ("uint8 mask: values with np.unique", lambda: np.unique(sem)),
                     ("colour mask: class ids through a 2^24 table (the scan)", lambda: table[codes]),
                     ("colour mask: class ids with np.unique(return_inverse)",
                      lambda: np.unique(codes, return_inverse=True))):
        t = time.perf_counter()
        for _ in range(20):
            fn()
        print(f"{args.size}x{args.size} {name}: {1000 * (time.perf_counter() - t) / 20:.2f} ms")

if __name__ == "__main__":
    main()
