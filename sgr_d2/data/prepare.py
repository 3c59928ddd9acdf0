"""What the ``datasets/prepare_*.py`` scripts share: the up-to-date test and the conversion loop."""
from __future__ import annotations

from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

__all__ = ["up_to_date", "run_conversions"]


def up_to_date(src: Path, dst: Path) -> bool:
    """``dst`` exists, is not empty and is not older than ``src`` (the scripts are idempotent)."""
    return dst.is_file() and dst.stat().st_size > 0 and dst.stat().st_mtime >= src.stat().st_mtime


def run_conversions(convert: Callable, todo: Sequence, total: int, desc: str, workers: int = 1,
                    unit: str = "img") -> None:
    """Run ``convert`` on every task in ``todo`` (in ``workers`` processes when > 1), with a
    progress bar over ``total`` tasks of which ``total - len(todo)`` are already done."""
    with tqdm(total=total, initial=total - len(todo), desc=desc, unit=unit) as bar:
        if workers > 1 and len(todo) > 1:
            with Pool(workers) as pool:
                for _ in pool.imap_unordered(convert, todo, chunksize=16):
                    bar.update()
        else:
            for task in todo:
                convert(task)
                bar.update()
