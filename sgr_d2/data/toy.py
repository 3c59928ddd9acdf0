"""``sgr_toy``: a deterministic, generated semantic-segmentation dataset that ships with the code.

No real dataset can be downloaded on every machine, so the demo, the tests and the benchmarks
train on scenes drawn here. Each 128×128 scene has

* three "stuff" classes: ``sky`` above a wavy horizon, ``grass`` below it, and a ``wall``
  block standing on the horizon at the left or the right;
* three "thing" classes, each with 2 or 3 separate instances: ``ball`` (discs),
  ``box`` (squares) and ``kite`` (diamonds with a 1-pixel ignore outline, so the ignore
  label occurs as it does in real data).

So every object class has more than one disconnected region: connected components matter.
Colours overlap between classes (balls and kites share a hue range, boxes and the wall do)
and every image gets noise and a brightness change, so shape and context count too.

Splits: ``sgr_toy_sem_seg_train`` (160 images) and ``sgr_toy_sem_seg_val`` (40 images),
generated from fixed seeds on first use under ``$DETECTRON2_DATASETS/sgr_toy/`` (default
``./datasets``) as ``images/<split>/*.jpg``, ``annotations/<split>/*.png`` (class ids, 255 =
ignore) and ``instances/<split>/*.png`` (instance ids: 0 = stuff / none, 1.. = objects).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg

from ..files import atomic_write_text, exclusive_lock
from .datasets.layout import INSTANCE_FROM_FILE

__all__ = ["TOY_CLASSES", "TOY_COLORS", "generate_toy_split", "toy_root", "register_toy", "draw_scene", "draw_stuff",
           "generate_once", "write_image", "write_generated_split", "load_generated_split", "register_generated"]

TOY_CLASSES = ["sky", "grass", "wall", "ball", "box", "kite"]
TOY_COLORS = [[135, 206, 235], [60, 160, 60], [150, 120, 100], [230, 60, 60], [170, 130, 90], [240, 90, 60]]
TOY_SPLITS = {"train": (160, 1000), "val": (40, 2000)}  # split: (number of images, seed)
TOY_SIZE = 128
TOY_VERSION = 1
IGNORE = 255


def toy_root() -> Path:
    return Path(os.getenv("DETECTRON2_DATASETS", "datasets")) / "sgr_toy"


def _texture(rng, shape, base_rgb, spread):
    base = np.asarray(base_rgb, dtype=np.float32) + rng.uniform(-spread, spread, size=3)
    return np.broadcast_to(base, (*shape, 3)).copy()


def draw_stuff(rng, size: int = TOY_SIZE):
    """The stuff of a scene, drawn from ``rng``: ``sky`` above a wavy horizon, ``grass`` below,
    a striped ``wall`` block on the horizon at the left or the right. Returns (image float32
    (H,W,3), semantic labels uint8 (H,W): 0 sky, 1 grass, 2 wall). The shape toy and the panoptic
    toy (:mod:`.toy_panoptic`) draw their stuff here."""
    h = w = size
    sem = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    horizon = int(h * rng.uniform(0.35, 0.6))
    wobble = horizon + (rng.uniform(3, 8) * np.sin(xx[0] / w * 2 * np.pi * rng.uniform(0.5, 2) + rng.uniform(0, 6)))
    sem[yy >= wobble[None, :]] = 1  # grass
    wall_w = int(w * rng.uniform(0.2, 0.4))
    wall_top = int(horizon * rng.uniform(0.2, 0.6))
    left = rng.random() < 0.5
    wall = (yy >= wall_top) & (yy < wobble[None, :]) & ((xx < wall_w) if left else (xx >= w - wall_w))
    sem[wall] = 2
    colors = {0: (135, 190, 235), 1: (70, 150, 60), 2: (160, 120, 95)}
    img = np.zeros((h, w, 3), np.float32)
    for c, rgb in colors.items():
        img[sem == c] = _texture(rng, (int((sem == c).sum()),), rgb, 20)
    # stripes on the wall, a gradient in the sky
    img[wall] += (8 * np.sign(np.sin(yy[wall] / 2.0)))[:, None]
    img[sem == 0] -= ((h - yy[sem == 0]) * 0.15)[:, None]
    return img, sem


def draw_scene(seed: int, size: int = TOY_SIZE):
    """Return (rgb uint8 (H,W,3), semantic labels uint8 (H,W), instance ids uint8 (H,W))."""
    rng = np.random.default_rng(seed)
    h = w = size
    img, sem = draw_stuff(rng, size)
    inst = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    next_id = 1
    thing_colors = {3: (225, 70, 60), 4: (165, 125, 95), 5: (235, 95, 55)}
    for c in (3, 4, 5):
        for _ in range(int(rng.integers(2, 4))):
            r = int(rng.integers(7, 15))
            cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
            if c == 3:
                shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            elif c == 4:
                shape = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
            else:
                shape = np.abs(yy - cy) + np.abs(xx - cx) <= r
            rgb = _texture(rng, (int(shape.sum()),), thing_colors[c], 25)
            img[shape] = rgb
            sem[shape] = c
            inst[shape] = next_id
            if c == 5:
                ring = (np.abs(yy - cy) + np.abs(xx - cx) == r + 1)
                sem[ring] = IGNORE
                inst[ring] = 0
            next_id += 1
    img = img * rng.uniform(0.8, 1.2) + rng.normal(0, 12, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), sem, inst


def _stamp(n, seed):
    return {"version": TOY_VERSION, "size": TOY_SIZE, "count": n, "seed": seed}


def _is_current(stamp_file: Path, stamp: dict) -> bool:
    try:
        return json.loads(stamp_file.read_text()) == stamp
    except (OSError, ValueError):  # missing, or damaged: generate again
        return False


def generate_once(root: Path, split: str, stamp: dict, write) -> Path:
    """Generate a split's files under ``root`` once: ``write(tmp)`` fills the empty temporary
    folder ``tmp`` and returns ``{name in tmp: destination relative to root}``; each of those
    files or folders is then moved into place (a folder already there is replaced) and the
    stamp ``root/.<split>.json`` written. Idempotent: nothing is written when the stamp file
    already holds ``stamp``; a changed stamp (recipe) rewrites the split. Every generated toy
    dataset (this module, :mod:`.toy_context`, :mod:`.toy_panoptic`) goes through here.

    Safe when several processes call it at once on a fresh folder (``--num-gpus N``, parallel
    tests): one generates under an exclusive lock (``<root>/.<split>.lock``) while the others wait,
    then find the split complete. The stamp is written last, so a split with a current stamp is
    complete and is read without taking the lock.
    """
    root = Path(root)
    stamp_file = root / f".{split}.json"
    if _is_current(stamp_file, stamp):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / f".{split}.lock"):
        if _is_current(stamp_file, stamp):  # generated by another process while we waited
            return root
        stamp_file.unlink(missing_ok=True)  # an outdated split: later callers wait for the lock
        # Draw into a temporary folder, then move into place.
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{split}-tmp-") as tmp:
            tmp = Path(tmp)
            for name, dest in write(tmp).items():
                dest = root / dest
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.is_dir():
                    shutil.rmtree(dest)
                # a file replaces its old version atomically; a whole folder is not a job for
                # atomic_write_text (one file)
                os.replace(tmp / name, dest)
        atomic_write_text(str(stamp_file), json.dumps(stamp))
    return root


def write_image(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image (JPEG at quality 95, or lossless by the file's extension)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if Path(path).suffix == ".jpg" else []
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]), params):
        raise OSError(f"could not write {path}")


def write_generated_split(root: Path, split: str, count: int, seed: int, draw, stamp: dict,
                          image_ext: str = "jpg") -> Path:
    """Draw ``count`` scenes ``draw(seed + i)`` -> (rgb, labels, instance ids) into ``root`` as
    ``images/<split>/NNNN.<image_ext>``, ``annotations/<split>/NNNN.png`` and
    ``instances/<split>/NNNN.png``, once (:func:`generate_once`: stamp, lock, atomic moves)."""
    subs = ("images", "annotations", "instances")

    def write(tmp: Path):
        for sub in subs:
            (tmp / sub).mkdir()
        for i in range(count):
            rgb, sem, inst = draw(seed + i)
            write_image(tmp / "images" / f"{i:04d}.{image_ext}", rgb)
            cv2.imwrite(str(tmp / "annotations" / f"{i:04d}.png"), sem)
            cv2.imwrite(str(tmp / "instances" / f"{i:04d}.png"), inst)
        return {sub: f"{sub}/{split}" for sub in subs}

    return generate_once(root, split, stamp, write)


def load_generated_split(root: Path, split: str, image_ext: str = "jpg"):
    """detectron2 dicts of a split written by :func:`write_generated_split`, each with its
    ``instance_file_name``."""
    dicts = load_sem_seg(str(root / "annotations" / split), str(root / "images" / split),
                         gt_ext="png", image_ext=image_ext)
    for d in dicts:
        stem = Path(d["file_name"]).stem
        d["instance_file_name"] = str(root / "instances" / split / f"{stem}.png")
    return dicts


def register_generated(prefix: str, splits, load, root: Path, **metadata):
    """Register ``<prefix>_<split>`` for each split (``load(split)`` gives its dicts) with
    semantic-segmentation metadata (its dicts' ``instance_file_name`` are the instance maps:
    ``instance_source="instance_file"``); a name already registered is left alone."""
    for split in splits:
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda s=split: load(s))
        MetadataCatalog.get(name).set(
            image_root=str(root / "images" / split),
            sem_seg_root=str(root / "annotations" / split),
            ignore_label=IGNORE,
            evaluator_type="sem_seg",
            instance_source=INSTANCE_FROM_FILE,
            **metadata,
        )


def generate_toy_split(split: str, root: Path | None = None) -> Path:
    """Write the split's files under ``root`` (idempotent; rewritten if the recipe changed)."""
    if split not in TOY_SPLITS:
        raise KeyError(f"sgr_toy has splits {sorted(TOY_SPLITS)}, not {split!r}")
    root = Path(root) if root is not None else toy_root()
    n, seed = TOY_SPLITS[split]
    return write_generated_split(root, split, n, seed, draw_scene, _stamp(n, seed))


def _load(split: str):
    return load_generated_split(generate_toy_split(split), split)


def register_toy():
    register_generated("sgr_toy_sem_seg", TOY_SPLITS, _load, toy_root(),
                       stuff_classes=list(TOY_CLASSES), stuff_colors=[list(c) for c in TOY_COLORS],
                       thing_classes=["ball", "box", "kite"])


register_toy()
