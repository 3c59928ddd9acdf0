"""Tiny panoptic / instance datasets in the raw official layouts, for the tests.

Every layout holds the same two 32x48 scenes per split (train and val alike), drawn from
:data:`SCENES`, so that expectations are written once, by hand, in scene terms:

* scene 0: sky (rows 0-9), road (rows 10-31) cut in two pieces by a car (rows 10-31, cols
  28-35), two *touching* persons (rows 12-27, cols 4-11 and 12-19), a crowd of persons
  (rows 29-31, cols 0-3) and an unlabelled (VOID) patch (rows 28-31, cols 40-47);
* scene 1: sky (rows 0-15), road (rows 16-31) and a car (rows 18-29, cols 10-29).

Writers (each returns the dataset's base folder; nothing else is prepared):

* :func:`write_coco` — ``coco/``: ``{train,val}2017/*.jpg``, ``annotations/instances_*.json``
  (polygons; the crowd as an RLE with ``iscrowd`` 1), ``annotations/panoptic_*.json`` and
  ``panoptic_*/*.png``;
* :func:`write_ade20k` — ``ADEChallengeData2016/``: ``images/``, ``annotations/`` (raw 0..150),
  ``annotations_instance/`` (red = thing category 1..100, green = instance id; the crowd has no
  instance, so it is VOID in the panoptic annotation);
* :func:`write_cityscapes` — ``cityscapes/``: ``leftImg8bit/``, ``gtFine/*_polygons.json`` and
  the ``*_labelIds.png`` / ``*_instanceIds.png`` (16-bit) that cityscapesscripts draws from them
  (the crowd is a ``persongroup``).

:func:`prepare` runs a ``datasets/prepare_*.py`` script (or cityscapesscripts' panoptic
conversion) on a root, as a user would. A module beside conftest.py (imported the same way), so
that any test file, the end-to-end ``train_net.py --eval-only`` ones included, can reuse it.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
H, W = 32, 48
SPLITS = ("train", "val")

# (class, rows [a, b), cols [a, b)); drawn in order, a later one over an earlier one.
# "void" leaves its pixels unlabelled; "crowd" is a crowd region of persons.
SCENES = [
    [("sky", (0, 10), (0, 48)), ("road", (10, 32), (0, 48)), ("void", (28, 32), (40, 48)),
     ("person", (12, 28), (4, 12)), ("person", (12, 28), (12, 20)), ("car", (10, 32), (28, 36)),
     ("crowd", (29, 32), (0, 4))],
    [("sky", (0, 16), (0, 48)), ("road", (16, 32), (0, 48)), ("car", (18, 30), (10, 30))],
]
STUFF, THINGS = ("sky", "road"), ("person", "car")


def scene_segments(i: int) -> list:
    """The segments of scene ``i`` as drawn: dicts ``class``, ``mask`` (H, W) bool, ``thing``,
    ``crowd``; the stuff classes first (one segment per class present), then the objects in
    drawing order (the crowd included, with ``class`` "person")."""
    owner = np.full((H, W), -1)
    items = SCENES[i]
    for k, (_, rows, cols) in enumerate(items):
        owner[rows[0]:rows[1], cols[0]:cols[1]] = k
    segments = []
    for name in STUFF:
        mask = np.isin(owner, [k for k, it in enumerate(items) if it[0] == name])
        if mask.any():
            segments.append({"class": name, "mask": mask, "thing": False, "crowd": False})
    for k, (name, _, _) in enumerate(items):
        if name in THINGS or name == "crowd":
            segments.append({"class": "person" if name == "crowd" else name, "mask": owner == k,
                             "thing": True, "crowd": name == "crowd"})
    return segments


def _image(path: Path, seed: int, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.RandomState(seed).randint(0, 256, size=(H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format=fmt)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _box(mask: np.ndarray) -> list:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


# ----------------------------------------------------------------------------------------- COCO
COCO_IDS = {"sky": 187, "road": 149, "person": 1, "car": 3}  # sky-other-merged, road, person, car
# the ids of the segments in the panoptic PNGs: arbitrary, as COCO's are
COCO_SEGMENT_IDS = [[5263440, 2301, 9934, 9935, 4180097, 777], [5263440, 2301, 4180097]]


def _coco_categories(panoptic: bool) -> list:
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    if panoptic:
        return [{k: c[k] for k in ("id", "name", "isthing", "color")} for c in COCO_CATEGORIES]
    return [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]


def write_coco(root) -> Path:
    import pycocotools.mask as mask_util

    base = Path(root) / "coco"
    for split in SPLITS:
        images, instances, panoptic = [], [], []
        for i in range(len(SCENES)):
            image_id = i + 1
            name = f"{image_id:012d}"
            _image(base / f"{split}2017" / f"{name}.jpg", i, "JPEG")
            images.append({"id": image_id, "file_name": f"{name}.jpg", "height": H, "width": W})
            ids = np.zeros((H, W), dtype=np.int64)
            segments_info = []
            for seg, sid in zip(scene_segments(i), COCO_SEGMENT_IDS[i]):
                ids[seg["mask"]] = sid
                cid = COCO_IDS[seg["class"]]
                area, box = int(seg["mask"].sum()), _box(seg["mask"])
                segments_info.append({"id": sid, "category_id": cid, "iscrowd": int(seg["crowd"]),
                                      "area": area, "bbox": box})
                if not seg["thing"]:
                    continue
                if seg["crowd"]:
                    rle = mask_util.encode(np.asfortranarray(seg["mask"].astype(np.uint8)))
                    segm = {"size": rle["size"], "counts": rle["counts"].decode()}
                else:  # a rectangle as a COCO polygon around its pixels
                    x, y, w, h = box
                    segm = [[x, y, x + w, y, x + w, y + h, x, y + h]]
                instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": cid,
                                  "iscrowd": int(seg["crowd"]), "area": area, "bbox": box,
                                  "segmentation": segm})
            _png(base / f"panoptic_{split}2017" / f"{name}.png", _rgb(ids))
            panoptic.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": segments_info})
        ann = base / "annotations"
        ann.mkdir(parents=True, exist_ok=True)
        (ann / f"instances_{split}2017.json").write_text(json.dumps(
            {"images": images, "annotations": instances, "categories": _coco_categories(False)}))
        (ann / f"panoptic_{split}2017.json").write_text(json.dumps(
            {"images": images, "annotations": panoptic, "categories": _coco_categories(True)}))
    return base


# --------------------------------------------------------------------------------------- ADE20K
ADE_RAW = {"sky": 3, "road": 7, "person": 13, "car": 21}  # 1-based objectInfo150 index
ADE_INSTANCE_CATEGORY = {"person": 4, "car": 9}  # instance challenge category (red channel)


def ade20k_names(split: str) -> list:
    prefix = {"train": "ADE_train", "val": "ADE_val"}[split]
    return [f"{prefix}_{i + 1:08d}" for i in range(len(SCENES))]


def write_ade20k(root) -> Path:
    base = Path(root) / "ADEChallengeData2016"
    for split, folder in (("train", "training"), ("val", "validation")):
        for i, name in enumerate(ade20k_names(split)):
            _image(base / "images" / folder / f"{name}.jpg", i, "JPEG")
            sem = np.zeros((H, W), dtype=np.uint8)  # 0 = other
            inst = np.zeros((H, W, 3), dtype=np.uint8)
            k = 0
            for seg in scene_segments(i):
                sem[seg["mask"]] = ADE_RAW[seg["class"]]
                if seg["thing"] and not seg["crowd"]:  # a crowd has no instance in ADE20K
                    k += 1
                    inst[seg["mask"]] = (ADE_INSTANCE_CATEGORY[seg["class"]], k, 0)
            _png(base / "annotations" / folder / f"{name}.png", sem)
            _png(base / "annotations_instance" / folder / f"{name}.png", inst)
    return base


# ----------------------------------------------------------------------------------- Cityscapes
CITYSCAPES_FRAMES = {"train": [("aachen", "aachen_000000_000019"), ("aachen", "aachen_000001_000019")],
                     "val": [("lindau", "lindau_000000_000019"), ("lindau", "lindau_000001_000019")]}


def write_cityscapes(root) -> Path:
    """Polygon files of the scenes, and the label-id / instance-id maps cityscapesscripts draws
    from them (``json2labelImg`` / ``json2instanceImg``, what the official files are)."""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    base = Path(root) / "cityscapes"
    for split, frames in CITYSCAPES_FRAMES.items():
        for i, (city, frame) in enumerate(frames):
            _image(base / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png", i, "PNG")
            objects = []
            for name, (r0, r1), (c0, c1) in SCENES[i]:
                label = {"void": "unlabeled", "crowd": "persongroup"}.get(name, name)
                objects.append({"label": label, "polygon": [[c0, r0], [c1 - 1, r0], [c1 - 1, r1 - 1], [c0, r1 - 1]]})
            gt = base / "gtFine" / split / city
            gt.mkdir(parents=True, exist_ok=True)
            poly = gt / f"{frame}_gtFine_polygons.json"
            poly.write_text(json.dumps({"imgHeight": H, "imgWidth": W, "objects": objects}))
            json2labelImg(str(poly), str(gt / f"{frame}_gtFine_labelIds.png"), "ids")
            annotation = Annotation()
            annotation.fromJsonFile(str(poly))
            # json2instanceImg itself saves a 32-bit PIL image, which Pillow >= 11 cannot write as PNG
            instance_ids = np.asarray(createInstanceImage(annotation, "ids"), dtype=np.uint16)
            _png(gt / f"{frame}_gtFine_instanceIds.png", instance_ids)
    return base


# -------------------------------------------------------------------------------------- prepare
def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_layout_prep_{name}", REPO / "datasets" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prepare(name: str, root) -> None:
    """Run ``datasets/<name>.py`` on ``root`` (``--root``), or with ``name`` "cityscapes_panoptic"
    cityscapesscripts' ``createPanopticImgs`` conversion of ``<root>/cityscapes`` (train, val)."""
    if name == "cityscapes_panoptic":
        from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

        convert2panoptic(str(Path(root) / "cityscapes" / "gtFine"), setNames=list(SPLITS))
        return
    assert _script(name).main(["--root", str(root)]) == 0


PREPARE_STEPS = {
    "coco": ["prepare_coco_semantic_annos_from_panoptic_annos"],
    "ade20k": ["prepare_ade20k_sem_seg", "prepare_ade20k_pan_seg", "prepare_ade20k_ins_seg"],
    "cityscapes": ["prepare_cityscapes_sem_seg", "cityscapes_panoptic"],
}
WRITERS = {"coco": write_coco, "ade20k": write_ade20k, "cityscapes": write_cityscapes}


def write_prepared(root, datasets=tuple(WRITERS)) -> Path:
    """Write the raw layouts of ``datasets`` under ``root`` and prepare them as datasets/README.md
    says: every registered panoptic / instance name of those datasets then loads from ``root``."""
    for name in datasets:
        WRITERS[name](root)
        for step in PREPARE_STEPS[name]:
            prepare(step, root)
    return Path(root)
