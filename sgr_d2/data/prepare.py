"""What the ``datasets/prepare_*.py`` scripts share: the command line, the missing-file error,
reading and atomically writing label maps (and panoptic PNGs, JSON files), the up-to-date test
and the conversion loop."""
from __future__ import annotations

import argparse
import functools
import json
import os
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..files import atomic_write, atomic_write_text
from .labels import id2rgb

__all__ = ["missing_error", "read_label_png", "write_label_png", "write_panoptic_png", "write_json",
           "mask_bbox", "images_with_files", "up_to_date", "run_conversions", "prepare_main", "SplitSummary"]


def missing_error(dataset: str, path: Path, what: str, layout: str, holder: str) -> FileNotFoundError:
    """The error of a missing input: what and where, the expected layout, and where to look."""
    return FileNotFoundError(
        f"{dataset}: {what} not found: {str(path)!r}.\nExpected layout:\n{layout}\n"
        f"See datasets/README.md (set DETECTRON2_DATASETS to the folder holding {holder})."
    )


def read_label_png(src: Path) -> np.ndarray:
    """A single-channel label map as an array; other image modes are refused, naming the file."""
    with Image.open(src) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{src}: expected a single-channel label map, got PIL mode {im.mode!r}")
        return np.asarray(im)


def write_label_png(labels: np.ndarray, dst: Path) -> None:
    """Write a uint8 label map as PNG, atomically (:func:`sgr_d2.files.atomic_write`)."""
    image = Image.fromarray(labels, mode="L")
    atomic_write(str(dst), lambda f: image.save(f, format="PNG"))


def write_panoptic_png(ids: np.ndarray, dst: Path) -> None:
    """Write segment ids (H, W) as a COCO-format panoptic PNG (RGB, :func:`~.labels.id2rgb`), atomically."""
    image = Image.fromarray(id2rgb(ids), mode="RGB")
    atomic_write(str(dst), lambda f: image.save(f, format="PNG"))


def write_json(obj, dst: Path) -> None:
    """Write ``obj`` as JSON, atomically."""
    atomic_write_text(str(dst), json.dumps(obj))


def mask_bbox(mask: np.ndarray) -> List[int]:
    """The COCO box ``[x, y, width, height]`` (whole pixels) of a non-empty (H, W) bool mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def images_with_files(image_dir: Path, folders: Sequence[Tuple[Path, str]], split: str,
                      missing: Callable[[Path, str], Exception]) -> List[Tuple[Path, List[Path]]]:
    """Every ``*.jpg`` of ``image_dir`` (sorted) with the ``<same name>.png`` of each folder of
    ``folders`` ((folder, what it holds) pairs). The folders, at least one image and every file
    must exist, else ``missing(path, description)`` is raised, before anything is written."""
    for path, what in [(image_dir, "image folder"), *folders]:
        if not path.is_dir():
            raise missing(path, f"{what} of split {split!r}")
    images = sorted(image_dir.glob("*.jpg"))
    if not images:
        raise missing(image_dir / "*.jpg", f"images of split {split!r}")
    out = []
    for image in images:
        files = [folder / (image.stem + ".png") for folder, _ in folders]
        for path, (_, what) in zip(files, folders):
            if not path.is_file():
                raise missing(path, f"{what} of image {str(image)!r}")
        out.append((image, files))
    return out


def up_to_date(src: Path, dst: Path) -> bool:
    """``dst`` exists, is not empty and is not older than ``src`` (the scripts are idempotent)."""
    return dst.is_file() and dst.stat().st_size > 0 and dst.stat().st_mtime >= src.stat().st_mtime


def _unpacked(convert: Callable, task: Sequence) -> None:
    return convert(*task)


def run_conversions(convert: Callable, todo: Sequence[Sequence], total: int, desc: str, workers: int = 1,
                    unit: str = "img") -> list:
    """Run ``convert(*task)`` for every task in ``todo`` (in ``workers`` processes when > 1), with
    a progress bar over ``total`` tasks of which ``total - len(todo)`` are already done; returns
    the results in the order of ``todo``."""
    call = functools.partial(_unpacked, convert)
    results = []
    with tqdm(total=total, initial=total - len(todo), desc=desc, unit=unit) as bar:
        if workers > 1 and len(todo) > 1:
            with Pool(workers) as pool:
                for result in pool.imap(call, todo, chunksize=16):
                    results.append(result)
                    bar.update()
        else:
            for task in todo:
                results.append(call(task))
                bar.update()
    return results


class SplitSummary:
    """For the scripts that also write one file per split (a COCO-format JSON) from what every
    image's conversion returns. ``path(root, split)`` is that file; ``write(root, split, tasks,
    results)`` writes it. When the file exists, is not empty and is not older than any file a
    task names (its ``Path`` entries), the whole split is up to date and nothing runs;
    otherwise every task runs (``convert`` itself skips rewriting an up-to-date per-image
    output) and the file is rewritten."""

    def __init__(self, path: Callable[[Path, str], Path], write: Callable[[Path, str, list, list], None]):
        self.path, self.write = path, write

    def up_to_date(self, root: Path, split: str, tasks: Sequence[Sequence]) -> bool:
        out = self.path(root, split)
        if not (out.is_file() and out.stat().st_size > 0):
            return False
        newest = max((p.stat().st_mtime for t in tasks for p in t if isinstance(p, Path) and p.exists()),
                     default=0.0)
        return out.stat().st_mtime >= newest


def prepare_main(argv: Optional[Sequence[str]], description: str, dataset: str,
                 check_root: Callable[[Path], None], collect: Callable[[Path, str], list],
                 splits: Sequence[str], convert: Callable, destination: Callable[[Path, str], str],
                 unit: str = "img", summary: Optional[SplitSummary] = None) -> int:
    """The body of every ``datasets/prepare_*.py``: parse ``--root`` / ``--workers``, check the
    dataset folder, collect every split's tasks ``(src, dst, *more)`` before writing anything
    (a missing file stops the script with nothing written), then convert what is not up to date:
    ``dst`` older than ``src`` or than another file (``Path``) of ``more`` (with a ``summary``:
    see :class:`SplitSummary`).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--root", default=None,
                        help="datasets root (default: $DETECTRON2_DATASETS, else ./datasets)")
    parser.add_argument("--workers", type=int, default=1, help="processes to convert with")
    args = parser.parse_args(argv)
    root = Path(args.root or os.environ.get("DETECTRON2_DATASETS") or "datasets")
    check_root(root)
    plan: Dict[str, list] = {split: collect(root, split) for split in splits}
    for split, tasks in plan.items():
        desc = f"{dataset} {split}"
        if summary is None:  # an output is up to date when newer than every file its task names
            todo = [t for t in tasks if not all(up_to_date(p, t[1]) for p in t[:1] + t[2:] if isinstance(p, Path))]
        else:
            todo = [] if summary.up_to_date(root, split, tasks) else list(tasks)
        for folder in sorted({t[1].parent for t in todo if isinstance(t[1], Path)}):
            folder.mkdir(parents=True, exist_ok=True)
        results = run_conversions(convert, todo, len(tasks), desc, args.workers, unit=unit)
        if summary is not None and todo:
            summary.write(root, split, tasks, results)
        print(f"{desc}: {len(todo)} written, {len(tasks) - len(todo)} up to date "
              f"-> {destination(root, split)}")
    return 0
