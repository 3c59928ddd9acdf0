"""Instance and panoptic data in COCO's formats, in the folder of ``DATASETS.FOLDER.ROOT``
(docs/own_data.md#instance-and-panoptic-data).

The folder::

    images/{train,val}/...                  the images the JSON files name
    annotations/instances_{train,val}.json  instance segmentation: COCO's instances format
    annotations/panoptic_{train,val}.json   panoptic segmentation: COCO's panoptic format,
    panoptic/{train,val}/<file_name>        with its PNGs (segment id = R + 256 G + 256² B, 0: void)
    classes.txt                             optional: if there, checked against the categories

No key picks the task: the dataset names of ``DATASETS.TRAIN`` / ``DATASETS.TEST`` do, as any
detectron2 dataset name does. When a config trains or tests on one of them,
:func:`register_coco_folder` (called by :func:`.folder.register_folder`, so by
:func:`sgr_d2.config.load_config`) registers, through detectron2's own functions:

* ``folder_instance_train`` / ``folder_instance_val``: ``register_coco_instances`` (loader
  ``load_coco_json``, ``evaluator_type="coco"``: mask AP);
* ``folder_panoptic_train`` / ``folder_panoptic_val``: ``register_coco_panoptic`` (loader
  ``load_coco_panoptic_json``, ``evaluator_type="coco_panoptic_seg"``: PQ, and mask AP against
  the things of the panoptic PNGs);
* ``folder_panoptic_val_with_sem_seg``: the same val split with ``sem_seg_file_name`` and
  ``stuff_dataset_id_to_contiguous_id`` over every category, so that a panoptic model also
  reports mIoU, as the official COCO panoptic configs evaluate on
  ``coco_2017_val_panoptic_with_sem_seg``.

Class ids follow detectron2: the instance categories sorted by id (``load_coco_json``); the
panoptic things sorted by id, then the stuff sorted by id (COCO's order, which
``COCOEvaluator`` needs: the things are classes 0..T-1). ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` -1
becomes the number of categories. Loading a config reads both JSON files of the task and checks
their categories (ids, names, ``isthing``; the same in both splits; classes.txt's names in that
order when the folder has one).

The loaders run the folder's checks first (when a data loader is built: before the first
iteration), on both splits, and raise one :class:`.folder.FolderDatasetError` listing every
problem: an empty split, an annotation without what the format requires, a category id not in
``categories``, an image or panoptic PNG the JSON names that does not exist or cannot be read,
an image of another size than the JSON (instances) or its PNG (panoptic) says, a segment id in a
PNG that its ``segments_info`` does not list or the other way round. Images and PNGs are read
once (:func:`.folder.cached_scan`: ``.sgr_d2_cache/scan-{instance,panoptic}.json``).

For the panoptic val split the scan also derives, into ``.sgr_d2_cache/panoptic/``, what the
evaluators read: the semantic maps (``semseg_val/``: each segment's class, crowd ones too, 255
on void, as Mask2Former's ``prepare_coco_semantic_annos_from_panoptic_annos.py`` derives COCO's)
and ``instances_val.json`` (every thing segment as a COCO instance: its RLE, box, area and
``iscrowd``), again only for PNGs or segments that changed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data.datasets import register_coco_instances, register_coco_panoptic

from ...files import atomic_write_text
from ..labels import panoptic_maps, rgb2id
from ..prepare import write_label_png
from ..toy_instances import coco_mask_annotation
from .folder import (FolderClasses, _error, _listed, _Options, _some, _stat, cached_scan, image_record,
                     set_num_classes, size_mismatch)
from .layout import INSTANCE_FROM_PANOPTIC, unregister

__all__ = ["INSTANCE_DATASETS", "PANOPTIC_DATASETS", "PANOPTIC_WITH_SEM_SEG", "COCO_FOLDER_DATASETS",
           "Categories", "json_rel", "read_categories", "register_coco_folder", "check_instances",
           "check_panoptic"]

INSTANCE_DATASETS = {"train": "folder_instance_train", "val": "folder_instance_val"}
PANOPTIC_DATASETS = {"train": "folder_panoptic_train", "val": "folder_panoptic_val"}
PANOPTIC_WITH_SEM_SEG = "folder_panoptic_val_with_sem_seg"
COCO_FOLDER_DATASETS = {**{name: "instance" for name in INSTANCE_DATASETS.values()},
                        **{name: "panoptic" for name in (*PANOPTIC_DATASETS.values(), PANOPTIC_WITH_SEM_SEG)}}
SPLITS = ("train", "val")
PANOPTIC_IGNORE = 255  # the ignore_label of register_coco_panoptic: void in the derived semantic maps
_CATEGORY_KEYS = {"instance": ("id", "name"), "panoptic": ("id", "name", "isthing")}
_ORDER = {"instance": "sorted by id", "panoptic": "the things sorted by id, then the stuff sorted by id"}
# what load_coco_json and the instance mapper and evaluator read of each image and annotation
_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "segmentation", "bbox", "area")


def json_rel(task: str, split: str) -> str:
    """The JSON file of ``task`` ("instance" or "panoptic") and ``split``, under the folder."""
    return f"annotations/{'instances' if task == 'instance' else 'panoptic'}_{split}.json"


def _derived(options: _Options, *parts: str) -> str:
    return os.path.join(options.cache, "panoptic", *parts)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _plural(n: int, word: str, suffix: str = "s") -> str:
    return f"{n} {word}{suffix if n != 1 else ''}"


# ----------------------------------------------------------------------------- categories
@dataclass(frozen=True)
class Categories:
    """The categories of a task's JSON files in the order of the class ids: dicts with ``id``,
    ``name``, ``isthing`` (panoptic) and ``color`` (when the file gives one)."""

    task: str
    ordered: Tuple[dict, ...]

    @property
    def names(self) -> List[str]:
        return [c["name"] for c in self.ordered]

    @property
    def contiguous(self) -> Dict[int, int]:
        return {c["id"]: i for i, c in enumerate(self.ordered)}

    @property
    def things(self) -> Dict[int, int]:
        return {c["id"]: i for i, c in enumerate(self.ordered) if self.task == "instance" or c["isthing"]}

    @property
    def colors(self) -> Optional[List[list]]:
        colors = [c.get("color") for c in self.ordered]
        return None if None in colors else colors

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.ordered, sort_keys=True).encode()).hexdigest()


def _load_json(root: str, rel: str, problems: List[str]) -> Optional[dict]:
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        problems.append(f"{rel} does not exist: expected the COCO-format annotation of that split "
                        "(docs/own_data.md#instance-and-panoptic-data)")
        return None
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        problems.append(f"{rel} cannot be read as JSON ({type(e).__name__}: {e})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{rel} holds a JSON {type(data).__name__}, not an object with `images`, `annotations` "
                        "and `categories`")
        return None
    return data


def _categories(data: dict, rel: str, task: str, problems: List[str]) -> Optional[List[dict]]:
    keys = _CATEGORY_KEYS[task]
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        problems.append(f"{rel} has no `categories`: expected a list of objects with {', '.join(keys)}, one per "
                        "class")
        return None
    bad = [str(i) for i, c in enumerate(cats)
           if not isinstance(c, dict) or any(k not in c for k in keys) or not _is_int(c["id"])]
    if bad:
        problems.append(f"{rel}: {len(bad)} categor{'y' if len(bad) == 1 else 'ies'} of `categories` "
                        f"lack{'s' if len(bad) == 1 else ''} {', '.join(keys)} or an integer id (at index "
                        f"{_some(bad, '')})")
        return None
    twice = sorted(i for i, n in Counter(c["id"] for c in cats).items() if n > 1)
    if twice:
        many = len(twice) > 1
        problems.append(f"{rel}: category id{'s' if many else ''} {twice} appear{'' if many else 's'} more than once "
                        "in `categories`")
        return None
    out = []
    for c in cats:
        cat = {"id": c["id"], "name": str(c["name"])}
        if task == "panoptic":
            cat["isthing"] = int(bool(c["isthing"]))
        color = c.get("color")
        if isinstance(color, list) and len(color) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in color):
            cat["color"] = list(color)
        out.append(cat)
    return sorted(out, key=lambda c: (task == "panoptic" and not c["isthing"], c["id"]))


def read_categories(options: _Options, task: str, classes: Optional[FolderClasses]) -> Categories:
    """The categories of ``annotations/<task>_{train,val}.json``, checked (both files exist and
    parse, their categories are well formed and the same, classes.txt, if given, names them in
    the order of the class ids); every problem in one :class:`.folder.FolderDatasetError`."""
    problems: List[str] = []
    found = {}
    for split in SPLITS:
        rel = json_rel(task, split)
        data = _load_json(options.root, rel, problems)
        cats = None if data is None else _categories(data, rel, task, problems)
        if cats is not None:
            found[split] = cats
    if len(found) == 2:
        strip = lambda cats: [{k: v for k, v in c.items() if k != "color"} for c in cats]  # noqa: E731
        train, val = strip(found["train"]), strip(found["val"])
        if train != val:
            only = lambda a, b: [f"{c['id']} {c['name']!r}" for c in a if c not in b]  # noqa: E731
            problems.append(f"{json_rel(task, 'train')} and {json_rel(task, 'val')} have different categories "
                            f"(only in train: {_some(only(train, val), 'none')}; only in val: "
                            f"{_some(only(val, train), 'none')}): both splits need the same classes")
    cats = found.get("train")
    if cats and task == "panoptic" and len(cats) >= PANOPTIC_IGNORE:
        problems.append(f"{json_rel(task, 'train')} has {len(cats)} categories; a panoptic folder takes at most "
                        f"{PANOPTIC_IGNORE - 1} (class {PANOPTIC_IGNORE} is void in the semantic maps)")
    names = [c["name"] for c in cats or ()]
    if cats and classes is not None and list(classes.names) != names:
        problems.append(f"classes.txt names {list(classes.names)} but the categories of {json_rel(task, 'train')} "
                        f"in the order of the class ids ({_ORDER[task]}) are {names}: list them in that order in "
                        "classes.txt, or remove it")
    if problems:
        raise _error(options.root, problems)
    return Categories(task, tuple(cats))


# ----------------------------------------------------------------------------- registration
def _checked_load(check, load, finish=None) -> List[dict]:
    check()
    dicts = load()
    return dicts if finish is None else finish(dicts)


def _register(name: str, register, check, *args, finish=None) -> None:
    """detectron2's ``register(name, *args)``, replacing any earlier registration of ``name``;
    its loader then runs after ``check()`` (the folder's checks), and ``finish`` adds to its dicts."""
    unregister(name)
    register(name, *args)
    load = DatasetCatalog[name]
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, functools.partial(_checked_load, check, load, finish))


def _with_sem_seg(sem_seg_root: str, panoptic_root: str, dicts: List[dict]) -> List[dict]:
    for d in dicts:
        d["sem_seg_file_name"] = os.path.join(sem_seg_root, os.path.relpath(d["pan_seg_file_name"], panoptic_root))
    return dicts


def register_coco_folder(cfg, options: _Options, tasks, classes: Optional[FolderClasses]) -> None:
    """Register the instance and panoptic datasets of the folder whose task is in ``tasks`` (the
    tasks the config trains or tests on), after :func:`read_categories`, and set or check
    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` from the categories."""
    root = options.root
    for task in ("instance", "panoptic"):
        if task not in tasks:
            continue
        cats = read_categories(options, task, classes)
        set_num_classes(cfg, len(cats.ordered), os.path.join(root, json_rel(task, "train")), "its categories")
        things = cats.things
        meta = dict(thing_classes=[c["name"] for c in cats.ordered if c["id"] in things],
                    thing_dataset_id_to_contiguous_id=things)
        colors = cats.colors
        if colors:
            meta["thing_colors"] = [col for c, col in zip(cats.ordered, colors) if c["id"] in things]
        paths = {split: dict(image_root=os.path.join(root, "images", split),
                             json_file=os.path.join(root, json_rel(task, split)),
                             panoptic_root=os.path.join(root, "panoptic", split)) for split in SPLITS}
        if task == "instance":
            check = functools.partial(check_instances, options, cats)
            for split, name in INSTANCE_DATASETS.items():
                _register(name, register_coco_instances, check, dict(meta), paths[split]["json_file"],
                          paths[split]["image_root"])
            continue
        check = functools.partial(check_panoptic, options, cats)
        meta.update(stuff_classes=cats.names, instance_source=INSTANCE_FROM_PANOPTIC)
        if colors:
            meta["stuff_colors"] = colors
        stuff = {i: k for i, k in cats.contiguous.items() if i not in things}
        instances_val = _derived(options, "instances_val.json")
        for split, name in PANOPTIC_DATASETS.items():
            p = paths[split]
            _register(name, register_coco_panoptic, check, dict(meta, stuff_dataset_id_to_contiguous_id=stuff),
                      p["image_root"], p["panoptic_root"], p["json_file"], instances_val if split == "val" else None)
        p, sem_seg_root = paths["val"], _derived(options, "semseg_val")
        _register(PANOPTIC_WITH_SEM_SEG, register_coco_panoptic, check,
                  dict(meta, stuff_dataset_id_to_contiguous_id=cats.contiguous, sem_seg_root=sem_seg_root),
                  p["image_root"], p["panoptic_root"], p["json_file"], instances_val,
                  finish=functools.partial(_with_sem_seg, sem_seg_root, p["panoptic_root"]))


# ----------------------------------------------------------------------------- the checks
def _list(data: dict, key: str, rel: str, problems: List[str]) -> Optional[list]:
    value = data.get(key)
    if not isinstance(value, list):
        problems.append(f"{rel} has no list `{key}`")
        return None
    return value


def _lacking(items: list, keys, nonempty=()) -> List[str]:
    """The indices of the entries of ``items`` that are not objects with every key of ``keys``
    (those of ``nonempty`` not empty)."""
    return [str(i) for i, x in enumerate(items)
            if not isinstance(x, dict) or any(k not in x for k in keys) or any(not x[k] for k in nonempty)]


def _missing(problems: List[str], missing: List[str], what: str, rel: str, how: str = "") -> None:
    if missing:
        n = len(missing)
        problems.append(f"{_plural(n, what)} named by {rel} do{'es' if n == 1 else ''} not exist: "
                        f"{_some(missing, '')}{how}")


def _read_problems(records: Dict[str, dict], rels: List[str]) -> List[str]:
    return [f"{rel} cannot be read ({records[rel]['error']})" for rel in rels if "error" in records[rel]]


def check_instances(options: _Options, cats: Categories) -> None:
    """Check both splits of an instance folder (the JSON files and the images they name); every
    problem in one :class:`.folder.FolderDatasetError`."""
    root, known = options.root, cats.contiguous
    problems: List[str] = []
    sizes: Dict[str, Tuple[str, List[int]]] = {}  # image -> (json, [height, width] the json says)
    unknown, orphans = [], []
    for split in SPLITS:
        rel = json_rel("instance", split)
        data = _load_json(root, rel, problems)
        if data is None:
            continue
        images, annotations = _list(data, "images", rel, problems), _list(data, "annotations", rel, problems)
        if images is None or annotations is None:
            continue
        if not images:
            problems.append(f"the {split} split is empty: {rel} lists no image")
        bad = _lacking(images, _IMAGE_KEYS)
        if bad:
            problems.append(f"{rel}: {_plural(len(bad), 'image')} of `images` lack{'s' if len(bad) == 1 else ''} "
                            f"one of {', '.join(_IMAGE_KEYS)} (at index {_some(bad, '')})")
        bad = _lacking(annotations, _ANNOTATION_KEYS, nonempty=("segmentation", "bbox"))
        if bad:
            problems.append(f"{rel}: {_plural(len(bad), 'annotation')} lack{'s' if len(bad) == 1 else ''} one of "
                            f"{', '.join(_ANNOTATION_KEYS)}, or ha{'s' if len(bad) == 1 else 've'} an empty "
                            f"segmentation or bbox (at index {_some(bad, '')})")
        image_ids = {im["id"] for im in images if isinstance(im, dict) and "id" in im}
        ann_ids = Counter(a["id"] for a in annotations if isinstance(a, dict) and "id" in a)
        twice = sorted(str(i) for i, n in ann_ids.items() if n > 1)
        if twice:
            problems.append(f"{rel}: annotation ids appear more than once: {_some(twice, '')}")
        for a in annotations:
            if not isinstance(a, dict):
                continue
            if "category_id" in a and a["category_id"] not in known:
                unknown.append(f"{rel}: annotation {a.get('id')} (image {a.get('image_id')}) has category id "
                               f"{a['category_id']}, which is not in its categories (ids {sorted(known)})")
            if "image_id" in a and a["image_id"] not in image_ids:
                orphans.append(f"{rel}: annotation {a.get('id')} is of image id {a['image_id']}, which is not in "
                               "its `images`")
        missing = []
        for im in images:
            if not isinstance(im, dict) or "file_name" not in im:
                continue
            image = f"images/{split}/{im['file_name']}"
            if os.path.isfile(os.path.join(root, image)):
                sizes[image] = (rel, [im.get("height"), im.get("width")])
            else:
                missing.append(image)
        _missing(problems, missing, "image", rel)
    _listed(problems, unknown, "annotations of unknown categories")
    _listed(problems, orphans, "annotations of images not in `images`")
    records = cached_scan(options, "instance", {image: (None, None) for image in sizes}, lambda: (
        lambda rel: image_record(os.path.join(root, rel))), f"sgr_d2: reading the images of {root}")
    _listed(problems, _read_problems(records, list(sizes)), "files that cannot be read")
    wrong = []
    for image, (rel, (h, w)) in sizes.items():
        rec = records[image]
        if "error" not in rec and rec["size"] != [h, w]:
            wrong.append(f"{image} is {rec['size'][1]}x{rec['size'][0]} (WxH) but {rel} says {w}x{h}")
    _listed(problems, wrong, "images whose size differs from the JSON's")
    if problems:
        raise _error(root, problems)


def _segments_key(ann: dict, cats: Categories) -> str:
    """What a panoptic PNG's derived files depend on besides the PNG."""
    segments = [[s["id"], s["category_id"], int(bool(s.get("iscrowd", 0)))] for s in ann["segments_info"]]
    return hashlib.sha256(json.dumps([ann["image_id"], segments, cats.digest]).encode()).hexdigest()


def _read_panoptic(path: str, ann: Optional[dict], cats: Categories, sem_seg: Optional[str]) -> dict:
    """The record of one panoptic PNG: its ``size`` and segment ``ids``; with ``ann`` (the val
    split), when its segments and the PNG agree, the derived semantic map written to
    ``sem_seg`` and the things as COCO ``instances`` (``converted``)."""
    rec = {"stat": _stat(path)}
    try:
        ids = rgb2id(utils.read_image(path, format="RGB"))
    except Exception as e:  # as for images
        rec["error"] = f"{type(e).__name__}: {e}"
        return rec
    rec["size"] = list(ids.shape)
    rec["ids"] = [int(v) for v in np.unique(ids) if v != 0]
    if ann is None:
        return rec
    rec["key"] = _segments_key(ann, cats)
    contiguous, things = cats.contiguous, cats.things
    segments = ann["segments_info"]
    if set(rec["ids"]) != {s["id"] for s in segments} or any(s["category_id"] not in contiguous for s in segments):
        return rec  # a problem the checks name: nothing to derive
    mapped = [dict(s, category_id=contiguous[s["category_id"]]) for s in segments]
    labels, _ = panoptic_maps(ids, mapped, (), PANOPTIC_IGNORE, crowd_labels=True)
    write_label_png(labels.astype(np.uint8), sem_seg)
    rec["instances"] = [dict(coco_mask_annotation(ids == s["id"], 0, ann["image_id"], s["category_id"]),
                             iscrowd=int(bool(s.get("iscrowd", 0)))) for s in segments if s["category_id"] in things]
    rec["converted"] = True
    return rec


def check_panoptic(options: _Options, cats: Categories) -> None:
    """Check both splits of a panoptic folder (the JSON files, the images and PNGs they name) and
    derive the val split's semantic maps and instances JSON; every problem in one
    :class:`.folder.FolderDatasetError`."""
    root, known = options.root, cats.contiguous
    problems: List[str] = []
    jobs: Dict[str, Tuple[str, dict, str]] = {}  # PNG -> (split, annotation, its image)
    wanted: Dict[str, Tuple[Optional[str], Optional[str]]] = {}
    unknown, twice = [], []
    for split in SPLITS:
        rel = json_rel("panoptic", split)
        data = _load_json(root, rel, problems)
        annotations = None if data is None else _list(data, "annotations", rel, problems)
        if annotations is None:
            continue
        if not annotations:
            problems.append(f"the {split} split is empty: {rel} has no annotation")
        bad = [i for i, a in enumerate(annotations) if not (
            isinstance(a, dict) and isinstance(a.get("file_name"), str) and "image_id" in a
            and isinstance(a.get("segments_info"), list)
            and all(isinstance(s, dict) and _is_int(s.get("id")) and "category_id" in s for s in a["segments_info"]))]
        if bad:
            problems.append(f"{rel}: {_plural(len(bad), 'annotation')} lack{'s' if len(bad) == 1 else ''} one of "
                            "file_name, image_id and segments_info (a list of objects with an integer id and a "
                            f"category_id) (at index {_some([str(i) for i in bad], '')})")
        missing_images, missing_pngs, skip = [], [], set(bad)
        for k, ann in enumerate(annotations):
            if k in skip:
                continue
            png = f"panoptic/{split}/{ann['file_name']}"
            for s in ann["segments_info"]:
                if s["category_id"] not in known:
                    unknown.append(f"{rel}: segment {s['id']} of {ann['file_name']} has category id "
                                   f"{s['category_id']}, which is not in its categories (ids {sorted(known)})")
            repeated = sorted(i for i, n in Counter(s["id"] for s in ann["segments_info"]).items() if n > 1)
            if repeated:
                twice.append(f"{rel}: the segments_info of {ann['file_name']} lists segment ids {repeated} more "
                             "than once")
            image = f"images/{split}/{os.path.splitext(ann['file_name'])[0]}.jpg"
            found = True
            for path, missing in ((image, missing_images), (png, missing_pngs)):
                if not os.path.isfile(os.path.join(root, path)):
                    missing.append(path)
                    found = False
            if not found:
                continue
            wanted[image] = (None, None)
            if split == "val":
                wanted[png] = (_segments_key(ann, cats), _derived(options, "semseg_val", ann["file_name"]))
            else:
                wanted[png] = (None, None)
            jobs[png] = (split, ann, image)
        _missing(problems, missing_images, "image", rel, f" (detectron2's load_coco_panoptic_json reads "
                 f"images/{split}/<the stem of each PNG's file_name>.jpg)")
        _missing(problems, missing_pngs, "panoptic PNG", rel)
    _listed(problems, unknown, "segments of unknown categories")
    _listed(problems, twice, "annotations with repeated segment ids")

    def reader():
        def read(rel):
            if rel.startswith("images/"):
                return image_record(os.path.join(root, rel))
            split, ann, _ = jobs[rel]
            return _read_panoptic(os.path.join(root, rel), ann if split == "val" else None, cats, wanted[rel][1])
        return read

    records = cached_scan(options, "panoptic", wanted, reader,
                          f"sgr_d2: reading the panoptic folder {root} (and deriving its val maps)")
    _listed(problems, _read_problems(records, list(wanted)), "files that cannot be read")
    sizes, unlisted, absent = [], [], []
    for png, (split, ann, image) in jobs.items():
        pan, img = records[png], records[image]
        if "error" in pan or "error" in img:
            continue
        if pan["size"] != img["size"]:
            sizes.append(size_mismatch(png, pan["size"], image, img["size"]))
        listed = {s["id"] for s in ann["segments_info"]}
        extra = [i for i in pan["ids"] if i not in listed]
        if extra:
            unlisted.append(f"{png} holds segment id{'s' if len(extra) > 1 else ''} "
                            f"{_some([str(i) for i in extra], '')} that its segments_info in "
                            f"{json_rel('panoptic', split)} does not list")
        gone = sorted(listed - set(pan["ids"]))
        if gone:
            absent.append(f"{json_rel('panoptic', split)}: the segments_info of {ann['file_name']} lists segment "
                          f"id{'s' if len(gone) > 1 else ''} {_some([str(i) for i in gone], '')} that {png} does "
                          "not hold")
    _listed(problems, sizes, "PNGs whose size differs from their image's")
    _listed(problems, unlisted, "PNGs with segments their segments_info does not list")
    _listed(problems, absent, "annotations with segments their PNG does not hold")
    if problems:
        raise _error(root, problems)
    _write_instances(options, cats, jobs, records)


def _write_instances(options: _Options, cats: Categories, jobs, records) -> None:
    """``.sgr_d2_cache/panoptic/instances_val.json``: the things of the val split's PNGs as COCO
    instances, for ``COCOEvaluator`` (written when its content changes)."""
    images, annotations = [], []
    for png, (split, ann, _) in jobs.items():
        if split != "val":
            continue
        h, w = records[png]["size"]
        images.append({"id": ann["image_id"], "file_name": os.path.splitext(ann["file_name"])[0] + ".jpg",
                       "height": h, "width": w})
        for inst in records[png]["instances"]:
            annotations.append(dict(inst, id=len(annotations) + 1))
    things = cats.things
    text = json.dumps({"images": images, "annotations": annotations,
                       "categories": [{"id": c["id"], "name": c["name"]} for c in cats.ordered if c["id"] in things]})
    path = _derived(options, "instances_val.json")
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    atomic_write_text(path, text)
