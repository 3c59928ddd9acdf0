"""``sgr_toy_panoptic``: a generated panoptic dataset whose things of one class often touch.

SGR's supervision (docs/method.md#supervision-from-connected-components) matches tokens to the
8-connected components of each class of the semantic map. Where two objects of one class touch,
their component is the union of both: the components are a lower bound on the instances. The
shape toy (:mod:`.toy`) keeps its objects apart, so the two never differ there. Here they do,
often, and the panoptic ground truth says which pixels are which object, so that SGR supervised
by the connected components (``MODEL.SGR.COMPONENTS connected``) and by the instances
(``instances``) can be compared.

Scene (128 × 128; :func:`draw_panoptic_scene`):

* the shape toy's stuff (:func:`.toy.draw_stuff`): ``sky``, ``grass``, a striped ``wall``; in half
  of the scenes a grey patch (6–14 pixels a side) that is left unlabelled (void, panoptic id 0);
* 3–5 **clusters** of things, each of one class: ``ball`` (discs), ``box`` (squares) or ``kite``
  (diamonds), i.e. the balls of the Euclidean, maximum and taxicab norms, radius 7–12. A cluster
  holds 1–4 objects (probabilities 0.5, 0.3, 0.15, 0.05); each object after the first is placed
  against one drawn before it, overlapping it by 1.5 pixels up to 35% of the smaller radius
  (the later one covers the earlier), and no nearer than 0.75 × the sum of the radii to any other
  object of its cluster. Clusters keep 3 pixels apart, so objects of one class touch only
  within their cluster; a cluster with no room left is left out.
* What tells touching objects apart (in the image only; the labels of an object cover all its
  visible pixels, so touching objects of a class form one connected component): a dark 1-pixel
  rim along every object's outline (drawn over what it covers, so a visible line runs where two
  objects meet), objects of a cluster alternately lighter and darker (±12%), and the shape of
  the union (two discs make a peanut, not a disc).

Then the shape toy's brightness change (×0.8–1.2) and noise (σ = 12) on the whole image.

Ground truth in the COCO panoptic format as detectron2 reads it (``load_coco_panoptic_json``),
under ``$DETECTRON2_DATASETS/sgr_toy_panoptic/`` in COCO's layout:

* ``<split>/NNNN.jpg``: the images;
* ``panoptic_<split>/NNNN.png``: segment ids encoded in RGB (``id = R + 256 G + 256² B``;
  :func:`id2rgb`, :func:`rgb2id`), 0 = void; the ids are drawn at random in 1..256³ − 1, as
  COCO's are arbitrary;
* ``annotations/panoptic_<split>.json``: ``images``, ``annotations`` (``image_id``,
  ``file_name``, ``segments_info``: ``id``, ``category_id``, ``iscrowd``, ``area``, ``bbox`` XYWH
  as panopticapi computes them) and ``categories`` (``id``, ``name``, ``isthing``, ``color``,
  ``supercategory``): one segment per object and one per stuff class present;
* ``panoptic_semseg_<split>/NNNN.png``: the semantic maps derived from the panoptic ones, as
  Mask2Former's ``prepare_coco_semantic_annos_from_panoptic_annos.py`` derives COCO's: the
  contiguous class of every segment's pixels (things and stuff alike), 255 on void;
* ``annotations/instances_<split>.json``: the things as COCO instances (RLE masks of the visible
  pixels, :func:`.toy_instances.coco_mask_annotation`), for detectron2's ``COCOEvaluator``.

The category ids are COCO-like: not contiguous (ball 2, box 4, kite 7, sky 10, grass 12, wall 15),
so that confusing a dataset id with a contiguous one shows; the contiguous ids put the things
first, as COCO's order does (``COCOEvaluator`` requires the things' contiguous ids to be
``0..T-1``): ball 0, box 1, kite 2, sky 3, grass 4, wall 5.

Registered (metadata as detectron2's builtin COCO panoptic registration and Mask2Former's
``register_coco_panoptic_annos_semseg.py`` set them):

* ``sgr_toy_panoptic_train`` / ``_val``: detectron2's ``load_coco_panoptic_json`` dicts
  (``pan_seg_file_name``, ``segments_info``) — the training set of the panoptic configs;
* ``sgr_toy_panoptic_train_with_sem_seg`` / ``_val_with_sem_seg``: the same with
  ``sem_seg_file_name`` and ``sem_seg_root``, and ``stuff_dataset_id_to_contiguous_id`` covering
  every category, so that ``SemSegEvaluator`` reports mIoU from a panoptic model — the test set.

Splits: train 160 scenes (seeds 7000–7159), val 40 (seeds 8000–8039), generated on first use
(deterministic; :func:`.toy.generate_once`: stamp, lock, atomic moves). How often objects
share a component: :func:`touching_statistics`. The trivial baseline (every pixel the most
frequent stuff class of the training split): :func:`trivial_baseline`.
"""
from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json

from .toy import IGNORE, TOY_COLORS, draw_stuff, generate_once, write_image
from .toy_instances import coco_mask_annotation

__all__ = ["PANOPTIC_CATEGORIES", "PANOPTIC_SPLITS", "PANOPTIC_CLASSES", "panoptic_root", "id2rgb", "rgb2id",
           "draw_panoptic_scene", "generate_panoptic_split", "register_toy_panoptic", "touching_statistics",
           "panoptic_quality", "trivial_baseline"]

# In contiguous order: things first (as COCO), then stuff. Dataset ids not contiguous (as COCO's).
PANOPTIC_CATEGORIES = [
    {"id": 2, "name": "ball", "isthing": 1, "color": [220, 60, 60], "supercategory": "thing"},
    {"id": 4, "name": "box", "isthing": 1, "color": [230, 190, 60], "supercategory": "thing"},
    {"id": 7, "name": "kite", "isthing": 1, "color": [80, 70, 200], "supercategory": "thing"},
    {"id": 10, "name": "sky", "isthing": 0, "color": list(TOY_COLORS[0]), "supercategory": "stuff"},
    {"id": 12, "name": "grass", "isthing": 0, "color": list(TOY_COLORS[1]), "supercategory": "stuff"},
    {"id": 15, "name": "wall", "isthing": 0, "color": list(TOY_COLORS[2]), "supercategory": "stuff"},
]
PANOPTIC_CLASSES = [c["name"] for c in PANOPTIC_CATEGORIES]
PANOPTIC_SPLITS = {"train": (160, 7000), "val": (40, 8000)}  # split: (number of images, first seed)
PANOPTIC_SIZE = 128
PANOPTIC_VERSION = 1
_THINGS = [c for c in PANOPTIC_CATEGORIES if c["isthing"]]
_STUFF = [c for c in PANOPTIC_CATEGORIES if not c["isthing"]]
_CONTIGUOUS = {c["id"]: i for i, c in enumerate(PANOPTIC_CATEGORIES)}
# per thing class: the norm whose ball is its shape, and the colour it is drawn in
_NORMS = (2.0, np.inf, 1.0)
_THING_RGB = ((225, 70, 60), (225, 185, 70), (85, 80, 205))
_CLUSTER_SIZES, _CLUSTER_P = (1, 2, 3, 4), (0.5, 0.3, 0.15, 0.05)
_RADII = (7, 13)  # [low, high)
_MAX_ID = 256 ** 3


def panoptic_root() -> Path:
    return Path(os.getenv("DETECTRON2_DATASETS", "datasets")) / "sgr_toy_panoptic"


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids (0 .. 256³ − 1) -> (H, W, 3) uint8 RGB, ``id = R + 256 G + 256² B``."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= _MAX_ID):
        raise ValueError(f"segment ids must be in 0..{_MAX_ID - 1}; got {int(ids.min())}..{int(ids.max())}")
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W) int64 segment ids, ``R + 256 G + 256² B`` (inverse of :func:`id2rgb`)."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _ball(shape, cy, cx, r, p):
    """(H, W) mask of the pixels within distance ``r`` of (cy, cx) in the norm ``p`` (2: a disc,
    inf: a square, 1: a diamond), computed on the ball's bounding window."""
    mask = np.zeros(shape, bool)
    y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, shape[0]), max(cx - r, 0), min(cx + r + 1, shape[1])
    if y0 >= y1 or x0 >= x1:
        return mask
    dy, dx = np.abs(np.arange(y0, y1) - cy)[:, None], np.abs(np.arange(x0, x1) - cx)[None, :]
    if p == 2.0:
        window = dy * dy + dx * dx <= r * r
    elif p == np.inf:
        window = np.maximum(dy, dx) <= r
    else:
        window = dy + dx <= r
    mask[y0:y1, x0:x1] = window
    return mask


def _cluster(rng, p):
    """Centres (relative, integer) and radii of one cluster of objects in the norm ``p``."""
    size = int(rng.choice(_CLUSTER_SIZES, p=_CLUSTER_P))
    centres, radii = [np.zeros(2)], [int(rng.integers(*_RADII))]
    for _ in range(size - 1):
        r = int(rng.integers(*_RADII))
        for _try in range(10):
            a = int(rng.integers(len(centres)))  # the object it is placed against
            theta = rng.uniform(0, 2 * np.pi)
            u = np.array([np.sin(theta), np.cos(theta)])
            u /= np.linalg.norm(u, ord=p)
            overlap = rng.uniform(1.5, max(1.5, 0.35 * min(r, radii[a])))
            c = np.round(centres[a] + (radii[a] + r - overlap) * u)
            if all(np.linalg.norm(c - cm, ord=p) >= 0.75 * (r + rm) for cm, rm in zip(centres, radii)):
                centres.append(c)
                radii.append(r)
                break
        else:  # no room found next to the cluster: it stays smaller
            break
    return np.array(centres, dtype=np.int64), radii


def draw_panoptic_scene(seed: int, size: int = PANOPTIC_SIZE):
    """Scene ``seed``: (rgb uint8 (H, W, 3), segment ids int64 (H, W) with 0 = void, segments
    [{"id", "category_id" (dataset id), "iscrowd": 0}] — the stuff classes present, then the
    visible objects in drawing order)."""
    rng = np.random.default_rng(seed)
    h = w = size
    img, stuff = draw_stuff(rng, size)
    void = np.zeros((h, w), bool)
    if rng.random() < 0.5:  # an unlabelled grey patch
        ph, pw = (int(v) for v in rng.integers(6, 15, size=2))
        y0, x0 = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
        void[y0:y0 + ph, x0:x0 + pw] = True
        img[void] = np.array([128, 128, 128], np.float32) + rng.uniform(-20, 20, 3)
    objects = np.zeros((h, w), np.int64)  # 0: stuff or void, k: the k-th object
    classes = []  # thing index of object k - 1
    occupied = np.zeros((h, w), bool)  # every cluster so far, grown by 3 pixels
    for _ in range(int(rng.integers(3, 6))):
        t = int(rng.integers(len(_THINGS)))
        p = _NORMS[t]
        centres, radii = _cluster(rng, p)
        r_arr = np.array(radii)[:, None]
        lo = (r_arr - centres).max(axis=0)  # translations keeping every object inside the image
        hi = (np.array([h - 1, w - 1]) - r_arr - centres).min(axis=0)
        if (lo > hi).any():
            continue
        for _try in range(20):
            shift = np.array([rng.integers(lo[0], hi[0] + 1), rng.integers(lo[1], hi[1] + 1)])
            grown = np.zeros((h, w), bool)
            for c, r in zip(centres + shift, radii):
                grown |= _ball((h, w), c[0], c[1], r + 3, p)
            if not (grown & occupied).any():
                break
        else:  # no free place: the cluster is left out
            continue
        occupied |= grown
        for j, (c, r) in enumerate(zip(centres + shift, radii)):
            shape = _ball((h, w), c[0], c[1], r, p)
            shade = 1.12 if j % 2 == 0 else 0.88
            img[shape] = np.array(_THING_RGB[t], np.float32) * shade + rng.uniform(-10, 10, 3)
            rim = shape & ~_ball((h, w), c[0], c[1], r - 1, p)
            img[rim] *= 0.55
            classes.append(t)
            objects[shape] = len(classes)
    img = img * rng.uniform(0.8, 1.2) + rng.normal(0, 12, size=img.shape)

    # one segment per stuff class present and per visible object, with distinct random ids
    regions = [(stuff == s) & ~void & (objects == 0) for s in range(len(_STUFF))]
    regions = [(m, _STUFF[s]["id"]) for s, m in enumerate(regions)]
    regions += [(objects == k + 1, _THINGS[t]["id"]) for k, t in enumerate(classes)]
    regions = [(m, cat) for m, cat in regions if m.any()]
    ids = []
    while len(ids) < len(regions):
        new = int(rng.integers(1, _MAX_ID))
        if new not in ids:
            ids.append(new)
    pan = np.zeros((h, w), np.int64)
    segments = []
    for (mask, cat), seg_id in zip(regions, ids):
        pan[mask] = seg_id
        segments.append({"id": seg_id, "category_id": cat, "iscrowd": 0})
    return np.clip(img, 0, 255).astype(np.uint8), pan, segments


def _segment_info(mask: np.ndarray, segment: dict) -> dict:
    """``segment`` with its ``area`` (pixels) and ``bbox`` ([x, y, width, height] of the pixels,
    integers, as panopticapi's converters compute it)."""
    ys, xs = np.nonzero(mask)
    x, y = int(xs.min()), int(ys.min())
    return {**segment, "area": int(mask.sum()), "bbox": [x, y, int(xs.max()) - x + 1, int(ys.max()) - y + 1]}


def _stamp(split: str):
    n, seed = PANOPTIC_SPLITS[split]
    return {"version": PANOPTIC_VERSION, "size": PANOPTIC_SIZE, "count": n, "seed": seed}


def _paths(root: Path, split: str) -> dict:
    return {
        "image_root": root / split,
        "panoptic_root": root / f"panoptic_{split}",
        "sem_seg_root": root / f"panoptic_semseg_{split}",
        "panoptic_json": root / "annotations" / f"panoptic_{split}.json",
        "json_file": root / "annotations" / f"instances_{split}.json",
    }


def generate_panoptic_split(split: str, root: Path | None = None) -> Path:
    """Write the split's files under ``root`` (default :func:`panoptic_root`) once; return ``root``."""
    if split not in PANOPTIC_SPLITS:
        raise KeyError(f"sgr_toy_panoptic has splits {sorted(PANOPTIC_SPLITS)}, not {split!r}")
    root = Path(root) if root is not None else panoptic_root()
    n, seed = PANOPTIC_SPLITS[split]
    paths = _paths(root, split)

    def write(tmp: Path):
        for sub in ("images", "panoptic", "semseg"):
            (tmp / sub).mkdir()
        images, annotations, instances = [], [], []
        for i in range(n):
            rgb, pan, segments = draw_panoptic_scene(seed + i)
            stem, image_id = f"{i:04d}", i + 1
            write_image(tmp / "images" / f"{stem}.jpg", rgb)
            cv2.imwrite(str(tmp / "panoptic" / f"{stem}.png"), id2rgb(pan)[:, :, ::-1])
            sem = np.full(pan.shape, IGNORE, np.uint8)
            infos = []
            for seg in segments:
                mask = pan == seg["id"]
                sem[mask] = _CONTIGUOUS[seg["category_id"]]
                infos.append(_segment_info(mask, seg))
                if seg["category_id"] in (c["id"] for c in _THINGS):
                    instances.append(coco_mask_annotation(mask, len(instances) + 1, image_id, seg["category_id"]))
            cv2.imwrite(str(tmp / "semseg" / f"{stem}.png"), sem)
            images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": rgb.shape[0], "width": rgb.shape[1]})
            annotations.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": infos})
        info = {"description": f"sgr_toy_panoptic {split} (sgr_d2.data.toy_panoptic)", **_stamp(split)}
        (tmp / "panoptic.json").write_text(json.dumps(
            {"info": info, "licenses": [], "images": images, "annotations": annotations,
             "categories": PANOPTIC_CATEGORIES}))
        (tmp / "instances.json").write_text(json.dumps(
            {"info": info, "licenses": [], "images": images, "annotations": instances,
             "categories": [{k: c[k] for k in ("id", "name", "supercategory")} for c in _THINGS]}))
        return {"images": paths["image_root"].relative_to(root),
                "panoptic": paths["panoptic_root"].relative_to(root),
                "semseg": paths["sem_seg_root"].relative_to(root),
                "panoptic.json": paths["panoptic_json"].relative_to(root),
                "instances.json": paths["json_file"].relative_to(root)}

    return generate_once(root, split, _stamp(split), write)


def _metadata(with_sem_seg: bool) -> dict:
    """Category metadata as detectron2's ``coco_panoptic_standard`` and Mask2Former set it:
    ``thing_classes`` the things, ``stuff_classes`` every category (contiguous order);
    ``stuff_dataset_id_to_contiguous_id`` the stuff only (detectron2), or every category for
    the ``_with_sem_seg`` datasets (Mask2Former: ``SemSegEvaluator`` maps every class through it)."""
    return {
        "thing_classes": [c["name"] for c in _THINGS],
        "thing_colors": [c["color"] for c in _THINGS],
        "stuff_classes": list(PANOPTIC_CLASSES),
        "stuff_colors": [c["color"] for c in PANOPTIC_CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {c["id"]: _CONTIGUOUS[c["id"]] for c in _THINGS},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: _CONTIGUOUS[c["id"]] for c in
                                              (PANOPTIC_CATEGORIES if with_sem_seg else _STUFF)},
    }


def _load(split: str, with_sem_seg: bool):
    paths = _paths(generate_panoptic_split(split), split)
    dicts = load_coco_panoptic_json(str(paths["panoptic_json"]), str(paths["image_root"]),
                                    str(paths["panoptic_root"]), _metadata(with_sem_seg))
    if with_sem_seg:
        for d in dicts:
            d["sem_seg_file_name"] = str(paths["sem_seg_root"] / os.path.basename(d["pan_seg_file_name"]))
    return dicts


def register_toy_panoptic():
    root = panoptic_root()
    for split in PANOPTIC_SPLITS:
        paths = {k: str(v) for k, v in _paths(root, split).items()}
        for with_sem_seg in (False, True):
            name = f"sgr_toy_panoptic_{split}" + ("_with_sem_seg" if with_sem_seg else "")
            if name in DatasetCatalog.list():
                continue
            DatasetCatalog.register(name, lambda s=split, sem=with_sem_seg: _load(s, sem))
            MetadataCatalog.get(name).set(
                image_root=paths["image_root"],
                panoptic_root=paths["panoptic_root"],
                panoptic_json=paths["panoptic_json"],
                # the instance file exists once the split was generated (on loading the dataset,
                # which a test run does before it builds the evaluators)
                json_file=paths["json_file"],
                evaluator_type="coco_panoptic_seg",
                ignore_label=IGNORE,
                label_divisor=1000,
                **({"sem_seg_root": paths["sem_seg_root"]} if with_sem_seg else {}),
                **_metadata(with_sem_seg),
            )


def read_panoptic(d: dict) -> np.ndarray:
    """The (H, W) segment ids of a dataset dict's ``pan_seg_file_name``."""
    path = d["pan_seg_file_name"]
    rgb = cv2.imread(path, cv2.IMREAD_COLOR)
    if rgb is None:
        raise FileNotFoundError(f"panoptic file {path} is missing or unreadable")
    return rgb2id(rgb[:, :, ::-1])


def _thing_ids(meta) -> set:
    return set(meta.thing_dataset_id_to_contiguous_id.values())


def touching_statistics(dataset_name: str) -> dict:
    """How often the connected components merge objects, in a registered panoptic dataset with
    semantic maps (``sgr_toy_panoptic_<split>_with_sem_seg``, or any COCO-panoptic-style one).

    The components are SGR's (:func:`sgr_d2.sgr.component_label_map`: 8-connected regions of
    one class of the semantic map, ``sem_seg_file_name``). An object (a thing segment, not
    crowd) is *merged* when a component holding some of its pixels also holds pixels of another
    object. Returns ``instances`` (objects), ``merged``, ``merged_fraction``,
    ``thing_components`` (components of thing classes) and ``images_with_merge``.
    """
    from ..sgr.components import component_label_map
    from .labels import read_id_map

    meta = MetadataCatalog.get(dataset_name)
    thing_classes = _thing_ids(meta)
    instances = merged = components = images_with_merge = 0
    for d in DatasetCatalog.get(dataset_name):
        pan = read_panoptic(d)
        labels, classes = component_label_map(read_id_map(d["sem_seg_file_name"]), meta.ignore_label)
        things = [s for s in d["segments_info"] if s["category_id"] in thing_classes and not s.get("iscrowd", 0)]
        components += int(np.isin(classes, list(thing_classes)).sum())
        owners = defaultdict(set)  # component -> the objects with pixels in it
        for s in things:
            for comp in np.unique(labels[pan == s["id"]]).tolist():
                owners[comp].add(s["id"])
        merged_here = {i for objs in owners.values() if len(objs) > 1 for i in objs}
        instances += len(things)
        merged += len(merged_here)
        images_with_merge += bool(merged_here)
    return {"instances": instances, "merged": merged, "merged_fraction": merged / max(instances, 1),
            "thing_components": components, "images_with_merge": images_with_merge}


def panoptic_quality(images, categories) -> dict:
    """PQ, SQ and RQ (%) with panopticapi's definitions (``pq_compute``), from arrays in memory.

    ``images``: iterable of ``(gt_ids, gt_segments, pred_ids, pred_segments)`` — (H, W) segment
    id maps (0 = void) and their ``segments_info`` (``id``, ``category_id``; ``iscrowd`` for the
    ground truth); ``categories``: [{"id", "isthing"}]. Per image, areas are pixel counts of the
    maps. A ground-truth segment (not crowd) and a predicted one of the same category match when
    IoU > 0.5, with ``IoU = inter / (pred + gt − inter − pred ∩ void)``; a match is a TP adding
    its IoU, an unmatched ground-truth segment an FN (crowd ones excepted), an unmatched
    prediction an FP unless more than half of it lies on void or on a crowd region of its
    category. Over the dataset, per category: ``PQ = ΣIoU / (TP + FP/2 + FN/2)``,
    ``SQ = ΣIoU / TP``, ``RQ = TP / (TP + FP/2 + FN/2)``; ``PQ`` averages the categories with
    TP + FP + FN > 0, ``PQ_th`` / ``PQ_st`` the things / the stuff among them (the keys of
    detectron2's ``COCOPanopticEvaluator``; likewise SQ, RQ).
    """
    stat = defaultdict(lambda: np.zeros(4))  # category -> [ΣIoU, TP, FP, FN]
    for gt_ids, gt_segments, pred_ids, pred_segments in images:
        gt = {s["id"]: s for s in gt_segments}
        pred = {s["id"]: s for s in pred_segments}
        gt_ids, pred_ids = np.asarray(gt_ids, np.int64), np.asarray(pred_ids, np.int64)
        for name, ids, segs in (("ground truth", gt_ids, gt), ("prediction", pred_ids, pred)):
            unknown = set(np.unique(ids).tolist()) - set(segs) - {0}
            if unknown:
                raise KeyError(f"{name} map holds segment ids {sorted(unknown)} without a segments_info entry")
        pairs, counts = np.unique(gt_ids * _MAX_ID + pred_ids, return_counts=True)
        inter = {(int(p // _MAX_ID), int(p % _MAX_ID)): int(c) for p, c in zip(pairs, counts)}
        gt_area, pred_area = Counter(), Counter()
        for (g, p), c in inter.items():
            gt_area[g] += c
            pred_area[p] += c
        gt_matched, pred_matched = set(), set()
        for (g, p), n in inter.items():
            if g not in gt or p not in pred or gt[g].get("iscrowd", 0) or gt[g]["category_id"] != pred[p]["category_id"]:
                continue
            iou = n / (pred_area[p] + gt_area[g] - n - inter.get((0, p), 0))
            if iou > 0.5:
                stat[gt[g]["category_id"]] += (iou, 1, 0, 0)
                gt_matched.add(g)
                pred_matched.add(p)
        crowd = {}
        for g, s in gt.items():
            if g in gt_matched:
                continue
            if s.get("iscrowd", 0):
                crowd[s["category_id"]] = g
            else:
                stat[s["category_id"]] += (0, 0, 0, 1)
        for p, s in pred.items():
            if p in pred_matched or pred_area[p] == 0:
                continue
            ignored = inter.get((0, p), 0) + (inter.get((crowd[s["category_id"]], p), 0) if s["category_id"] in crowd else 0)
            if ignored / pred_area[p] > 0.5:
                continue
            stat[s["category_id"]] += (0, 0, 1, 0)
    out = {}
    for suffix, keep in (("", lambda c: True), ("_th", lambda c: c["isthing"]), ("_st", lambda c: not c["isthing"])):
        pq, sq, rq = [], [], []
        for c in categories:
            iou, tp, fp, fn = stat[c["id"]]
            if not keep(c) or tp + fp + fn == 0:
                continue
            pq.append(iou / (tp + fp / 2 + fn / 2))
            sq.append(iou / tp if tp else 0.0)
            rq.append(tp / (tp + fp / 2 + fn / 2))
        for key, vals in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
            out[key + suffix] = 100.0 * float(np.mean(vals)) if vals else float("nan")
    return out


def trivial_baseline(train_name: str = "sgr_toy_panoptic_train",
                     val_name: str = "sgr_toy_panoptic_val_with_sem_seg") -> dict:
    """The trivial panoptic baseline: every pixel of a ``val_name`` image is one segment of the
    stuff class with the most pixels (``segments_info`` areas) in ``train_name``. Returns that
    class (``stuff_class``), its PQ / SQ / RQ (:func:`panoptic_quality`; every thing class
    scores 0) and its mIoU, from sgr_d2's ``SGRSemSegEvaluator`` on ``val_name`` as a panoptic
    model's mIoU is evaluated. Its mask AP is 0: it predicts no instances."""
    from ..evaluation import SGRSemSegEvaluator

    meta = MetadataCatalog.get(val_name)
    things = _thing_ids(meta)
    areas = Counter()
    for d in DatasetCatalog.get(train_name):
        for s in d["segments_info"]:
            if s["category_id"] not in things:
                areas[s["category_id"]] += s["area"]
    if not areas:
        raise ValueError(f"dataset {train_name!r} has no stuff segment")
    major = max(areas, key=areas.get)
    evaluator = SGRSemSegEvaluator(val_name, distributed=False)
    evaluator.reset()
    images = []
    for d in DatasetCatalog.get(val_name):
        pan = read_panoptic(d)
        images.append((pan, d["segments_info"], np.ones_like(pan), [{"id": 1, "category_id": major}]))
        scores = torch.zeros(len(meta.stuff_classes), *pan.shape)
        scores[major] = 1.0
        evaluator.process([d], [{"sem_seg": scores}])
    categories = [{"id": i, "isthing": i in things} for i in range(len(meta.stuff_classes))]
    return {"stuff_class": meta.stuff_classes[major], **panoptic_quality(images, categories),
            "mIoU": evaluator.evaluate()["sem_seg"]["mIoU"]}


register_toy_panoptic()
