"""Your own data without code: a folder of images and masks (docs/own_data.md).

The folder that ``DATASETS.FOLDER.ROOT`` names::

    classes.txt                           one class per line: "name", or "name r g b" (a palette)
    images/{train,val}/<stem>.{jpg,jpeg,png}
    masks/{train,val}/<stem>.png          the same stems as the images

:func:`register_folder` (called by :func:`sgr_d2.config.load_config`, so in every process that
loads a config: each worker of a run, the tools) registers ``folder_sem_seg_train`` and
``folder_sem_seg_val`` with the classes and colours of ``classes.txt`` as their metadata, and
sets ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` -1 to the number of classes (any other value must equal
it). It reads only ``classes.txt``.

The datasets' loaders (:func:`load_folder_split`, run when a data loader is built: before the
first iteration) check the whole folder, both splits, and raise one
:class:`FolderDatasetError` listing every problem, each naming its file: a mask value that is
neither a class nor the ignore label, a colour outside the palette, an image without a mask or a
mask without an image, an image and a mask of different sizes, an empty split, a file that
cannot be read. Masks hold class ids (``DATASETS.FOLDER.MASK_FORMAT`` "ids", the ignore label
``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``) or the palette's colours ("colors", converted to class
ids).

Every mask and image is read once: what the scan found (mask values or colours, sizes) is kept
in ``<ROOT>/.sgr_d2_cache/scan-<format>.json`` keyed on each file's size and modification time,
with the converted colour masks (``.sgr_d2_cache/masks/<split>/<stem>.png``, tied to the
content of ``classes.txt``). A later run, and every other worker of the same run, reads only
what changed; one process scans while the others wait (:func:`sgr_d2.files.exclusive_lock`).

COCO-format instance and panoptic JSON files in the same folder: :mod:`.folder_coco`, with
this module's error and scan cache (:func:`cached_scan`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from detectron2.data import detection_utils as utils

from ...files import atomic_write, atomic_write_text, exclusive_lock
from .layout import INSTANCE_FROM_COMPONENTS, replace_dataset

__all__ = ["FOLDER_DATASETS", "MASK_FORMATS", "NUM_CLASSES_FROM_FOLDER", "CACHE_DIR", "FolderClasses",
           "FolderDatasetError", "read_classes", "register_folder", "load_folder_split", "scan_folder",
           "cached_scan", "image_record", "set_num_classes", "size_mismatch"]

logger = logging.getLogger(__name__)

FOLDER_DATASETS = {"train": "folder_sem_seg_train", "val": "folder_sem_seg_val"}
MASK_FORMATS = ("ids", "colors")
NUM_CLASSES_FROM_FOLDER = -1  # MODEL.SEM_SEG_HEAD.NUM_CLASSES: the number of lines of classes.txt
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
CACHE_DIR = ".sgr_d2_cache"
CACHE_VERSION = 1
SHOWN = 5  # files listed per kind of problem
HELP = "docs/own_data.md#errors-and-what-to-do"


class FolderDatasetError(ValueError):
    """The folder of ``DATASETS.FOLDER.ROOT`` cannot be trained on: the message lists every problem."""


def _error(root: str, problems: List[str]) -> FolderDatasetError:
    lines = "\n".join(f"  - {p}" for p in problems)
    return FolderDatasetError(
        f"the folder dataset {root} (DATASETS.FOLDER.ROOT) has {len(problems)} "
        f"problem{'s' if len(problems) != 1 else ''}:\n{lines}\nFix them and run again; what to do "
        f"about each: {HELP}.")


# ----------------------------------------------------------------------------- classes.txt
@dataclass(frozen=True)
class FolderClasses:
    """The classes of ``classes.txt`` (class k: its k-th non-empty line) and their colours."""

    path: str
    names: Tuple[str, ...]
    colors: Optional[Tuple[Tuple[int, int, int], ...]]  # None: the file gives no palette
    digest: str  # of the file's bytes: the converted colour masks depend on it


def _parse_line(line: str):
    tokens = line.split()
    if len(tokens) >= 4 and all(t.lstrip("-").isdigit() for t in tokens[-3:]):
        return " ".join(tokens[:-3]), tuple(int(t) for t in tokens[-3:])
    return " ".join(tokens), None


def read_classes(root: str, mask_format: str, ignore_label: int) -> FolderClasses:
    """``<root>/classes.txt``, checked: every problem of the file in one :class:`FolderDatasetError`."""
    path = os.path.join(root, "classes.txt")
    if not os.path.isfile(path):
        raise _error(root, [f"{path} does not exist: expected one class name per line, in the order of "
                            "the class ids (optionally `name r g b`, the colour of the class in 0..255)"])
    with open(path, "rb") as f:
        data = f.read()
    problems, names, colors, lines = [], [], [], []
    for lineno, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        name, color = _parse_line(raw)
        if color is not None and not all(0 <= c <= 255 for c in color):
            problems.append(f"classes.txt line {lineno}: colour {list(color)} is not `r g b` in 0..255")
        if name in names:
            problems.append(f"classes.txt line {lineno}: class {name!r} is already class {names.index(name)}")
        names.append(name)
        colors.append(color)
        lines.append(lineno)
    if not names:
        problems.append(f"{path} names no class: expected one class name per line")
    given = [c for c in colors if c is not None]
    if given and len(given) != len(colors):
        bare = [str(n) for n, c in zip(lines, colors) if c is None]
        problems.append(f"classes.txt gives a colour to {len(given)} of {len(colors)} classes (none on "
                        f"line{'s' if len(bare) > 1 else ''} {', '.join(bare[:SHOWN])}"
                        f"{' ...' if len(bare) > SHOWN else ''}): give every class a colour, or none")
    for i, c in enumerate(colors):
        if c is not None and c in colors[:i]:
            problems.append(f"classes.txt line {lines[i]}: colour {list(c)} is also class "
                            f"{colors.index(c)}'s: each class needs its own colour")
    if mask_format == "colors" and not given and names:
        problems.append("DATASETS.FOLDER.MASK_FORMAT is 'colors' but classes.txt gives no colours: "
                        "write `name r g b` on each line")
    if ignore_label < len(names):
        problems.append(f"classes.txt names {len(names)} classes, so class {ignore_label} would be the ignore "
                        f"label MODEL.SEM_SEG_HEAD.IGNORE_VALUE ({ignore_label}): set an ignore value "
                        f">= {len(names)}")
    if problems:
        raise _error(root, problems)
    palette = tuple(colors) if given else None
    return FolderClasses(path=path, names=tuple(names), colors=palette, digest=hashlib.sha256(data).hexdigest())


# ----------------------------------------------------------------------------- registration
@dataclass(frozen=True)
class _Options:
    root: str
    mask_format: str
    ignore_label: int
    ignore_colors: Tuple[Tuple[int, int, int], ...]

    @property
    def cache(self) -> str:
        return os.path.join(self.root, CACHE_DIR)

    def key(self, classes: FolderClasses) -> str:
        """What a converted colour mask depends on besides the mask itself."""
        return f"{classes.digest}:{self.ignore_label}:{list(self.ignore_colors)}"


def _options(cfg) -> _Options:
    f = cfg.DATASETS.FOLDER
    if f.MASK_FORMAT not in MASK_FORMATS:
        raise ValueError(f"DATASETS.FOLDER.MASK_FORMAT is {f.MASK_FORMAT!r}; expected 'ids' (class ids) or "
                         "'colors' (the palette of classes.txt)")
    ignore_colors = []
    for c in f.IGNORE_COLORS:
        if not (isinstance(c, (list, tuple)) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)):
            raise ValueError(f"DATASETS.FOLDER.IGNORE_COLORS is {list(f.IGNORE_COLORS)}; expected a list of "
                             "[r, g, b] colours in 0..255, e.g. [[0, 0, 0]]")
        ignore_colors.append(tuple(c))
    return _Options(root=os.path.abspath(os.path.expanduser(f.ROOT)), mask_format=f.MASK_FORMAT,
                    ignore_label=int(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE), ignore_colors=tuple(ignore_colors))


def set_num_classes(cfg, n: int, source: str, what: str) -> None:
    """``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` -1 becomes ``n``, the number of classes ``source`` (a
    file) names; any other value must equal it."""
    head = cfg.MODEL.SEM_SEG_HEAD
    if head.NUM_CLASSES == NUM_CLASSES_FROM_FOLDER:
        head.NUM_CLASSES = n
    elif head.NUM_CLASSES != n:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {head.NUM_CLASSES} but {source} names {n} classes: set "
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES {NUM_CLASSES_FROM_FOLDER} to take the number from {what} (as "
            "configs/folder/*.yaml do), or make them agree")


def register_folder(cfg) -> None:
    """Register the datasets of ``DATASETS.FOLDER.ROOT`` (nothing when it is empty):
    ``folder_sem_seg_{train,val}`` when the folder has a classes.txt or the config trains or
    tests on them, the instance and panoptic ones (:mod:`.folder_coco`) when the config trains or
    tests on them; and set or check ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` from the classes of the
    datasets the config uses. ``cfg`` must not be frozen."""
    from .folder_coco import COCO_FOLDER_DATASETS, register_coco_folder

    tasks = {**{name: "semantic" for name in FOLDER_DATASETS.values()}, **COCO_FOLDER_DATASETS}
    used = [n for n in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST) if n in tasks]
    if not cfg.DATASETS.FOLDER.ROOT:
        if used:
            raise ValueError(f"the config trains or tests on {used} but DATASETS.FOLDER.ROOT is empty: give the "
                             "folder of your data (DATASETS.FOLDER.ROOT /path/to/folder; docs/own_data.md)")
        return
    options = _options(cfg)
    if not os.path.isdir(options.root):
        raise FileNotFoundError(f"DATASETS.FOLDER.ROOT {cfg.DATASETS.FOLDER.ROOT!r} is not a folder "
                                f"({options.root} does not exist); expected a folder with classes.txt, "
                                "images/{train,val}/ and masks/{train,val}/, or COCO-format annotations/ "
                                "(docs/own_data.md)")
    used_tasks = {tasks[n] for n in used}
    classes = None
    if "semantic" in used_tasks or os.path.isfile(os.path.join(options.root, "classes.txt")):
        classes = read_classes(options.root, options.mask_format, options.ignore_label)
        if "semantic" in used_tasks:
            set_num_classes(cfg, len(classes.names), classes.path, "classes.txt")
        for split, name in FOLDER_DATASETS.items():
            meta = dict(
                stuff_classes=list(classes.names),
                image_root=os.path.join(options.root, "images", split),
                sem_seg_root=(os.path.join(options.root, "masks", split) if options.mask_format == "ids"
                              else os.path.join(options.cache, "masks", split)),
                classes_file=classes.path,
                evaluator_type="sem_seg",
                ignore_label=options.ignore_label,
                instance_source=INSTANCE_FROM_COMPONENTS,
            )
            if classes.colors:
                meta["stuff_colors"] = [list(c) for c in classes.colors]
            replace_dataset(name, functools.partial(load_folder_split, split, options, classes), meta)
    register_coco_folder(cfg, options, used_tasks, classes)


def load_folder_split(split: str, options: _Options, classes: FolderClasses) -> List[dict]:
    """The dataset dicts of ``split`` (``file_name``, ``sem_seg_file_name``), once the whole
    folder has passed :func:`scan_folder`'s checks."""
    return scan_folder(options, classes)[split]


# ----------------------------------------------------------------------------- the scan
def _listing(root: str, split: str):
    """(images: stem -> [file names], masks: stem -> file name) of one split (empty for a missing folder)."""
    def entries(sub):
        folder = os.path.join(root, sub, split)
        return sorted(e.name for e in os.scandir(folder) if e.is_file()) if os.path.isdir(folder) else None

    images, masks = {}, {}
    for name in entries("images") or ():
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTS:
            images.setdefault(stem, []).append(name)
    for name in entries("masks") or ():
        stem, ext = os.path.splitext(name)
        if ext.lower() == ".png":
            masks[stem] = name
    return images, masks


def _stat(path: str) -> List[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _image_size(path: str) -> List[int]:
    """[height, width] as detectron2's ``read_image`` will return it (EXIF orientation applied),
    from the header only."""
    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112)
        except Exception:  # detectron2 ignores unreadable EXIF too
            orientation = None
    return [w, h] if orientation in (5, 6, 7, 8) else [h, w]


def _codes(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _color(code: int) -> Tuple[int, int, int]:
    return (code >> 16) & 255, (code >> 8) & 255, code & 255


def image_record(path: str) -> dict:
    """What the checks need of an image: its ``stat``, and its ``size`` or the read ``error``."""
    rec = {"stat": _stat(path)}
    try:
        rec["size"] = _image_size(path)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        rec["error"] = f"{type(e).__name__}: {e}"
    return rec


class _Scanner:
    """Reads one file and returns its record (what the checks need)."""

    def __init__(self, options: _Options, classes: FolderClasses):
        self.options = options
        self.key = options.key(classes)
        top = max(len(classes.names) - 1, options.ignore_label)
        self.dtype = np.uint8 if top <= 255 else np.uint16
        if options.mask_format == "colors":
            # colour code (r << 16 | g << 8 | b) -> class id, -1: not in the palette; a gather
            # through this table is several times faster than np.unique (bench/folder_scan.py)
            self.table = np.full(1 << 24, -1, np.int16 if top < 2 ** 15 else np.int32)
            for c in options.ignore_colors:
                self.table[_codes(np.array(c))] = options.ignore_label
            for k, c in enumerate(classes.colors or ()):
                self.table[_codes(np.array(c))] = k

    def image(self, path: str) -> dict:
        return image_record(path)

    def mask(self, path: str, converted: Optional[str]) -> dict:
        rec = {"stat": _stat(path)}
        colors = self.options.mask_format == "colors"
        try:
            mask = utils.read_image(path, format="RGB" if colors else None)
        except Exception as e:  # as for images
            rec["error"] = f"{type(e).__name__}: {e}"
            return rec
        rec["size"] = list(mask.shape[:2])
        if colors:
            self._colors(mask, rec, converted)
            return rec
        rec["channels"] = 1 if mask.ndim == 2 else int(mask.shape[2])
        if mask.ndim == 2:
            flat = mask.ravel()
            if flat.dtype == bool:
                flat = flat.astype(np.uint8)
            # bincount: one pass, several times faster than np.unique's sort (bench/folder_scan.py)
            values = np.flatnonzero(np.bincount(flat)) if flat.dtype.kind == "u" and flat.itemsize <= 2 \
                else np.unique(flat)
            rec["values"] = [int(v) for v in values]
        return rec

    def _colors(self, rgb: np.ndarray, rec: dict, converted: str) -> None:
        codes = _codes(rgb)
        labels = self.table[codes]
        rec["key"] = self.key  # the palette it was converted with (or found colours outside of)
        unknown = labels < 0
        if unknown.any():  # an error, listed by the checks; nothing to convert
            found, counts = np.unique(codes[unknown], return_counts=True)
            rec["unknown"] = [[int(c), int(n)] for c, n in zip(found, counts)]
            return
        rec["unknown"] = []
        ok, png = cv2.imencode(".png", labels.astype(self.dtype))
        if not ok:  # pragma: no cover
            raise OSError(f"cannot encode {converted}")
        atomic_write(converted, lambda f: f.write(png.tobytes()))
        rec["converted"] = True


def _converted_path(options: _Options, split: str, stem: str) -> str:
    return os.path.join(options.cache, "masks", split, f"{stem}.png")


def cached_scan(options: _Options, kind: str, wanted: Dict[str, Tuple[Optional[str], Optional[str]]],
                reader: Callable[[], Callable[[str], dict]], desc: str) -> Dict[str, dict]:
    """The records of the files ``wanted`` (paths under the folder -> (key, output)), reading
    (``reader()(rel)``, in threads, with a progress bar) only those that are not in
    ``<ROOT>/.sgr_d2_cache/scan-<kind>.json`` as they are now: same size and modification time
    and, for a record that wrote a derived file (``"converted"``), the same ``key`` (what the
    output depends on besides the file) and its ``output`` still there. One process scans while
    the others wait (the cache's lock)."""
    os.makedirs(options.cache, exist_ok=True)
    cache_file = os.path.join(options.cache, f"scan-{kind}.json")
    with exclusive_lock(os.path.join(options.cache, ".lock")):
        try:
            with open(cache_file) as f:
                cached = json.load(f)
            records = cached["files"] if cached.get("version") == CACHE_VERSION else {}
        except (OSError, ValueError, KeyError, TypeError):  # none yet, or damaged: scan again
            records = {}
        todo = []
        for rel, (key, output) in wanted.items():
            rec = records.get(rel)
            fresh = rec is not None and rec.get("stat") == _stat(os.path.join(options.root, rel))
            if fresh and output and "error" not in rec:
                # read again when what the output depends on changed, or the output is gone
                fresh = rec.get("key") == key and (not rec.get("converted") or os.path.isfile(output))
            if not fresh:
                todo.append(rel)
        if todo:
            read = reader()
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                for rel, rec in tqdm(zip(todo, pool.map(read, todo)), total=len(todo), desc=desc, unit="file"):
                    records[rel] = rec
        if todo or set(records) != set(wanted):
            records = {rel: records[rel] for rel in wanted}
            atomic_write_text(cache_file, json.dumps({"version": CACHE_VERSION, "files": records}))
    return records


def scan_folder(options: _Options, classes: FolderClasses) -> Dict[str, List[dict]]:
    """The dataset dicts of both splits, after reading every image header and mask that is not
    in the cache as it is now (:func:`cached_scan`) and checking all of them; every problem in
    one :class:`FolderDatasetError`."""
    root = options.root
    listings = {split: _listing(root, split) for split in FOLDER_DATASETS}
    colors = options.mask_format == "colors"
    key = options.key(classes) if colors else None
    wanted = {}
    for split, (images, masks) in listings.items():
        for stem, names in images.items():
            for name in names:
                wanted[f"images/{split}/{name}"] = (None, None)
        for stem, name in masks.items():
            wanted[f"masks/{split}/{name}"] = (key, _converted_path(options, split, stem) if colors else None)

    def reader():
        scanner = _Scanner(options, classes)

        def read(rel):
            path = os.path.join(root, rel)
            return scanner.image(path) if rel.startswith("images/") else scanner.mask(path, wanted[rel][1])
        return read

    desc = f"sgr_d2: {'reading and converting' if colors else 'reading'} the folder dataset {root}"
    records = cached_scan(options, options.mask_format, wanted, reader, desc)
    problems = _problems(options, classes, listings, records)
    if problems:
        raise _error(root, problems)
    out = {}
    for split, (images, masks) in listings.items():
        out[split] = [
            {"file_name": os.path.join(root, "images", split, images[stem][0]),
             "sem_seg_file_name": (_converted_path(options, split, stem) if colors
                                   else os.path.join(root, "masks", split, masks[stem]))}
            for stem in sorted(images)
        ]
    return out


# ----------------------------------------------------------------------------- the checks
def _some(items: List[str], what: str) -> str:
    more = f", ... and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more if items else what


def _listed(problems: List[str], found: List[str], more: str) -> None:
    problems.extend(found[:SHOWN])
    if len(found) > SHOWN:
        problems.append(f"... and {len(found) - SHOWN} more {more}")


def size_mismatch(label: str, label_size: List[int], image: str, image_size: List[int]) -> str:
    """The problem of a label file (a mask, a panoptic PNG) whose [height, width] is not its image's."""
    (h, w), (ih, iw) = label_size, image_size
    return f"{label} is {w}x{h} (WxH) but its image {image} is {iw}x{ih}"


def _problems(options: _Options, classes: FolderClasses, listings, records) -> List[str]:
    problems: List[str] = []
    n, ignore = len(classes.names), options.ignore_label
    unreadable, sizes, values, channels, colors = [], [], [], [], []
    for split, (images, masks) in listings.items():
        if not images:
            folder = os.path.join("images", split)
            where = "does not exist" if not os.path.isdir(os.path.join(options.root, folder)) else \
                "holds no .jpg, .jpeg or .png image"
            problems.append(f"the {split} split is empty: {folder}/ {where}; each of train and val needs images "
                            f"with their masks")
        lone_images = sorted(set(images) - set(masks))
        lone_masks = sorted(set(masks) - set(images))
        if images and lone_images:
            problems.append(f"{len(lone_images)} image{'s' if len(lone_images) > 1 else ''} of images/{split}/ "
                            f"without a mask masks/{split}/<stem>.png: {_some(lone_images, '')}")
        if lone_masks:
            problems.append(f"{len(lone_masks)} mask{'s' if len(lone_masks) > 1 else ''} of masks/{split}/ "
                            f"without an image images/{split}/<stem>.jpg/.png: {_some(lone_masks, '')}")
        twins = [f"{stem} ({', '.join(names)})" for stem, names in images.items() if len(names) > 1]
        if twins:
            problems.append(f"images/{split}/ has several images with the same stem, which one mask cannot "
                            f"label: {_some(twins, '')}")
        for rel in [f"images/{split}/{nm}" for names in images.values() for nm in names] + \
                [f"masks/{split}/{nm}" for nm in masks.values()]:
            if "error" in records[rel]:
                unreadable.append(f"{rel} cannot be read ({records[rel]['error']})")
        for stem in sorted(set(images) & set(masks)):
            image_rel, mask_rel = f"images/{split}/{images[stem][0]}", f"masks/{split}/{masks[stem]}"
            img, mask = records[image_rel], records[mask_rel]
            if "error" in img or "error" in mask:
                continue
            if img["size"] != mask["size"]:
                sizes.append(size_mismatch(mask_rel, mask["size"], image_rel, img["size"]))
            if options.mask_format == "ids" and mask["channels"] != 1:
                channels.append(mask_rel)
            elif options.mask_format == "ids":
                bad = [v for v in mask["values"] if not (0 <= v < n or v == ignore)]
                if bad:
                    shown = bad[:10] + (["..."] if len(bad) > 10 else [])
                    values.append(f"{mask_rel} holds values [{', '.join(map(str, shown))}]: expected class ids "
                                  f"0..{n - 1} (the {n} classes of classes.txt) or the ignore label {ignore} "
                                  "(MODEL.SEM_SEG_HEAD.IGNORE_VALUE)")
            else:
                unknown = sorted(mask["unknown"], key=lambda ck: -ck[1])
                if unknown:
                    shown = ", ".join(f"{_color(c)} in {k} pixel{'s' if k > 1 else ''}" for c, k in unknown[:3])
                    more = f" and {len(unknown) - 3} more colours" if len(unknown) > 3 else ""
                    colors.append(f"{mask_rel} holds colour{'s' if len(unknown) > 1 else ''} {shown}{more}, "
                                  "not in the palette of classes.txt (nor DATASETS.FOLDER.IGNORE_COLORS)")
    _listed(problems, unreadable, "files that cannot be read")
    _listed(problems, sizes, "masks whose size differs from their image's")
    _listed(problems, values, "masks with such values")
    _listed(problems, colors, "masks with colours outside the palette")
    if channels:
        problems.append(f"{len(channels)} mask{'s' if len(channels) > 1 else ''} with several channels "
                        f"({_some(channels, '')}), but DATASETS.FOLDER.MASK_FORMAT is 'ids' (one channel of "
                        "class ids): masks painted in the colours of classes.txt need "
                        "DATASETS.FOLDER.MASK_FORMAT colors")
    return problems
