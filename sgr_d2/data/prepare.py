"""What the ``datasets/prepare_*.py`` scripts share: the command line, the missing-file error,
reading and atomically writing label maps, the up-to-date test and the conversion loop."""
from __future__ import annotations

import argparse
import functools
import os
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..files import atomic_write

__all__ = ["missing_error", "read_label_png", "write_label_png", "up_to_date", "run_conversions",
           "prepare_main"]


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


def up_to_date(src: Path, dst: Path) -> bool:
    """``dst`` exists, is not empty and is not older than ``src`` (the scripts are idempotent)."""
    return dst.is_file() and dst.stat().st_size > 0 and dst.stat().st_mtime >= src.stat().st_mtime


def _unpacked(convert: Callable, task: Sequence) -> None:
    convert(*task)


def run_conversions(convert: Callable, todo: Sequence[Sequence], total: int, desc: str, workers: int = 1,
                    unit: str = "img") -> None:
    """Run ``convert(*task)`` for every task in ``todo`` (in ``workers`` processes when > 1), with
    a progress bar over ``total`` tasks of which ``total - len(todo)`` are already done."""
    call = functools.partial(_unpacked, convert)
    with tqdm(total=total, initial=total - len(todo), desc=desc, unit=unit) as bar:
        if workers > 1 and len(todo) > 1:
            with Pool(workers) as pool:
                for _ in pool.imap_unordered(call, todo, chunksize=16):
                    bar.update()
        else:
            for task in todo:
                call(task)
                bar.update()


def prepare_main(argv: Optional[Sequence[str]], description: str, dataset: str,
                 check_root: Callable[[Path], None], collect: Callable[[Path, str], list],
                 splits: Sequence[str], convert: Callable, destination: Callable[[Path, str], str],
                 unit: str = "img") -> int:
    """The body of every ``datasets/prepare_*.py``: parse ``--root`` / ``--workers``, check the
    dataset folder, collect every split's tasks ``(src, dst, *more)`` before writing anything
    (a missing file stops the script with nothing written), then convert what is not up to date.
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
        todo = [t for t in tasks if not up_to_date(t[0], t[1])]
        for folder in sorted({t[1].parent for t in todo}):
            folder.mkdir(parents=True, exist_ok=True)
        desc = f"{dataset} {split}"
        run_conversions(convert, todo, len(tasks), desc, args.workers, unit=unit)
        print(f"{desc}: {len(todo)} written, {len(tasks) - len(todo)} up to date "
              f"-> {destination(root, split)}")
    return 0
