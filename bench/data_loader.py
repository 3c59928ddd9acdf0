#!/usr/bin/env python3
"""Images/s of sgr_d2's training mapper on each dataset layout (ADE20K, COCO-Stuff-10K, Cityscapes).

For each layout the script writes synthetic data in the official raw layout (Voronoi-like label
maps with a few dozen regions, images coloured by region plus noise) under a temporary
DETECTRON2_DATASETS, runs the layout's preparation script (datasets/prepare_*.py), loads the
registered training split through DatasetCatalog and times ``sgr_d2.data.SemSegDatasetMapper``
(read image + label map, scale 0.5-2.0, crop, colour jitter, flip, pad, connected components)
with and without the connected components. Each layout uses its training crop: 512x512 for
ADE20K and COCO-Stuff, 512x1024 for Cityscapes (the synthetic Cityscapes frames are
1024x512, half the real resolution, and are scaled around that size).

    python bench/data_loader.py                 # 20 images per layout, 2 passes, 1 process
    python bench/data_loader.py --workers 4     # through a torch DataLoader with 4 workers
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import sgr_d2  # noqa: E402  (before detectron2: compatibility shims)
import numpy as np  # noqa: E402
import scipy.io  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402

from sgr_d2 import add_sgr_config  # noqa: E402
from sgr_d2.data import SemSegDatasetMapper, build_train_augmentations  # noqa: E402

UNUSED_COCO_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91}

# name: (registered train split, prepare script, (W, H) of the synthetic images, short edge the
# scale jitter is relative to, crop (H, W), number of classes)
LAYOUTS = {
    "ade20k": ("ade20k_sem_seg_train", "prepare_ade20k_sem_seg", (512, 512), 512, (512, 512), 150),
    "coco_stuff_10k": ("coco_2017_train_stuff_10k_sem_seg", "prepare_coco_stuff_10k_sem_seg",
                       (512, 512), 512, (512, 512), 171),
    "cityscapes": ("cityscapes_fine_sem_seg_train", "prepare_cityscapes_sem_seg", (1024, 512), 512,
                   (512, 1024), 19),
}


# --------------------------------------------------------------------------------- fixtures
def _regions(rng, size, values, n_regions=40):
    """(H, W) map of ``n_regions`` nearest-seed regions, each with a value drawn from ``values``."""
    w, h = size
    step = 4  # compute on a coarse grid, then repeat: blocky but cheap
    gh, gw = -(-h // step), -(-w // step)
    seeds = rng.rand(n_regions, 2) * [gh, gw]
    yy, xx = np.mgrid[0:gh, 0:gw]
    d = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
    owner = d.argmin(axis=0)
    owner = np.repeat(np.repeat(owner, step, axis=0), step, axis=1)[:h, :w]
    region_values = rng.choice(np.asarray(values), size=n_regions)
    return owner, region_values[owner]


def _photo(rng, owner):
    palette = rng.randint(0, 256, size=(owner.max() + 1, 3))
    img = palette[owner] + rng.normal(0, 12, size=owner.shape + (3,))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _save_png(path, array, dtype=np.uint8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=dtype)).save(path)


def make_ade20k(root: Path, n: int, size, rng):
    base = root / "ADEChallengeData2016"
    for split, prefix, count in (("training", "ADE_train", n), ("validation", "ADE_val", 2)):
        for i in range(count):
            name = f"{prefix}_{i + 1:08d}"
            owner, raw = _regions(rng, size, np.arange(151))  # 0 = "other"
            path = base / "images" / split / f"{name}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            _photo(rng, owner).save(path, quality=90)
            _save_png(base / "annotations" / split / f"{name}.png", raw)


def make_coco_stuff_10k(root: Path, n: int, size, rng):
    base = root / "coco" / "coco_stuff_10k"
    used = [0] + [i for i in range(1, 183) if i not in UNUSED_COCO_IDS]  # 0 = unlabeled
    lists = {"train": [f"COCO_train2014_{i:012d}" for i in range(n)],
             "test": [f"COCO_train2014_{n + i:012d}" for i in range(2)]}
    for split, names in lists.items():
        for name in names:
            owner, raw = _regions(rng, size, used)
            (base / "images").mkdir(parents=True, exist_ok=True)
            _photo(rng, owner).save(base / "images" / f"{name}.jpg", quality=90)
            (base / "annotations").mkdir(parents=True, exist_ok=True)
            scipy.io.savemat(str(base / "annotations" / f"{name}.mat"), {"S": raw.astype(np.uint8)})
        (base / "imageLists").mkdir(parents=True, exist_ok=True)
        (base / "imageLists" / f"{split}.txt").write_text("\n".join(names) + "\n")


def make_cityscapes(root: Path, n: int, size, rng):
    base = root / "cityscapes"
    ids = list(range(34))
    for split, city, count in (("train", "aachen", n), ("val", "lindau", 2)):
        for i in range(count):
            frame = f"{city}_{i:06d}_000019"
            owner, label_ids = _regions(rng, size, ids)
            img = base / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png"
            img.parent.mkdir(parents=True, exist_ok=True)
            _photo(rng, owner).save(img)
            gt = base / "gtFine" / split / city
            _save_png(gt / f"{frame}_gtFine_labelIds.png", label_ids)
            inst = np.where(label_ids >= 24, label_ids * 1000 + owner, label_ids)
            _save_png(gt / f"{frame}_gtFine_instanceIds.png", inst, dtype=np.uint16)
            (gt / f"{frame}_gtFine_polygons.json").write_text(
                json.dumps({"imgHeight": size[1], "imgWidth": size[0], "objects": []}))


MAKERS = {"ade20k": make_ade20k, "coco_stuff_10k": make_coco_stuff_10k, "cityscapes": make_cityscapes}


# ------------------------------------------------------------------------------------ bench
def _prepare_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "datasets" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _mapper(short_edge, crop, num_classes, components):
    cfg = add_sgr_config(get_cfg())
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(int(short_edge * s / 10) for s in range(5, 21))  # 0.5..2.0
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.INPUT.MAX_SIZE_TRAIN = 4 * max(crop)
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = crop
    cfg.INPUT.COLOR_AUG = True
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
    return SemSegDatasetMapper(
        is_train=True, augmentations=build_train_augmentations(cfg), image_format="RGB",
        ignore_label=255, num_classes=num_classes, pad_size=tuple(crop), components=components)


def _time_mapper(mapper, dicts, passes, workers):
    """(images/s, mean components per image) over ``passes`` passes after a short warm-up."""
    work = [d for _ in range(passes) for d in dicts]
    for d in dicts[:2]:
        mapper(d)
    n_comp = []
    t0 = time.perf_counter()
    if workers > 0:
        loader = torch.utils.data.DataLoader(work, batch_size=1, num_workers=workers,
                                             collate_fn=lambda batch: [mapper(d) for d in batch])
        for batch in loader:
            n_comp += [len(o["components"]["classes"]) for o in batch if "components" in o]
    else:
        for d in work:
            out = mapper(d)
            if "components" in out:
                n_comp.append(len(out["components"]["classes"]))
    dt = time.perf_counter() - t0
    return len(work) / dt, (float(np.mean(n_comp)) if n_comp else float("nan"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20, help="training images per layout")
    parser.add_argument("--passes", type=int, default=2, help="passes over the images per timing")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader workers (0: map in this process)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--root", default=None, help="keep the synthetic datasets here (default: temp)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    tmp = None if args.root else tempfile.TemporaryDirectory(prefix="sgr_bench_data_")
    root = Path(args.root or tmp.name)
    os.environ["DETECTRON2_DATASETS"] = str(root)  # sgr_d2's loaders read it when they run
    rng = np.random.RandomState(args.seed)
    rows = []
    try:
        for layout in args.layouts:
            dataset, script, size, short_edge, crop, num_classes = LAYOUTS[layout]
            MAKERS[layout](root, args.images, size, rng)
            prep = _prepare_script(script)
            t0 = time.perf_counter()
            prep.main([])
            prep_s = time.perf_counter() - t0
            dicts = DatasetCatalog.get(dataset)
            assert len(dicts) == args.images, (dataset, len(dicts))
            with_cc, n_comp = _time_mapper(_mapper(short_edge, crop, num_classes, True), dicts,
                                           args.passes, args.workers)
            without_cc, _ = _time_mapper(_mapper(short_edge, crop, num_classes, False), dicts,
                                         args.passes, args.workers)
            rows.append((layout, f"{size[0]}x{size[1]}", f"{crop[1]}x{crop[0]}", len(dicts),
                         prep_s / (len(dicts) + 2), with_cc, without_cc, n_comp))
    finally:
        if tmp is not None:
            tmp.cleanup()

    print(f"\nmapper: sgr_d2.data.SemSegDatasetMapper, {args.passes} passes, "
          f"workers={args.workers}, torch threads={torch.get_num_threads()}, "
          f"cpus={os.cpu_count()}")
    head = ("layout", "image WxH", "crop WxH", "images", "prepare s/img", "img/s (with CC)",
            "img/s (no CC)", "components/img")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for layout, size, crop, n, prep, a, b, c in rows:
        print(f"| {layout} | {size} | {crop} | {n} | {prep:.3f} | {a:.1f} | {b:.1f} | {c:.1f} |")
    return rows


if __name__ == "__main__":
    main()
