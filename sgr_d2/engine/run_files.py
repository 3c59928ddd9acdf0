"""The files a run writes into ``OUTPUT_DIR`` (``config.yaml``, ``log.txt``, ``metrics.json``, the
TensorBoard events), written only once the run has done something (docs/reliability.md §3).

detectron2's ``default_setup`` and trainer write them first thing, so a run refused a moment later
has overwritten the earlier run's. :class:`RunFiles` does what ``default_setup`` does but keeps the
log in memory until :meth:`RunFiles.commit` (after the first iteration, or an ``--eval-only``
evaluation), which first takes the run's :class:`~sgr_d2.engine.output_lock.OutputLock`.
"""
from __future__ import annotations

import contextlib
import logging
import os
from logging.handlers import MemoryHandler
from typing import Callable, List

import torch

from detectron2.utils import comm
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventWriter
from detectron2.utils.logger import setup_logger

from ..files import atomic_write_text

__all__ = ["RunFiles", "DeferredWriters"]

# the loggers default_setup gives an output file (and sgr_d2's own)
LOGGERS = ("detectron2", "fvcore", "sgr_d2")


class RunFiles(contextlib.AbstractContextManager):
    """``default_setup(cfg, args)`` with its files deferred to :meth:`commit`; on exit its log handlers
    are detached (the log of a run that never committed is dropped: the console had it)."""

    def __init__(self, cfg, args, lock=None):
        self.cfg = cfg
        self.lock = lock
        self.committed = False
        self._handler = None
        rank = comm.get_rank()
        # the log until commit: a MemoryHandler without a target keeps every record
        self._buffer = MemoryHandler(capacity=1 << 62, flushLevel=logging.CRITICAL + 1)
        for name in LOGGERS:
            setup_logger(None, distributed_rank=rank, name=name)
            logging.getLogger(name).addHandler(self._buffer)
        log = logging.getLogger("detectron2")
        log.info("Rank of current process: %d. World size: %d", rank, comm.get_world_size())
        log.info("Environment info:\n%s", collect_env_info())
        log.info("Command line arguments: %s", args)
        if getattr(args, "config_file", ""):
            with open(args.config_file) as f:
                log.info("Contents of args.config_file=%s:\n%s", args.config_file, f.read())
        log.info("Running with full config:\n%s", cfg.dump())
        seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
        if not getattr(args, "eval_only", False):
            torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK

    def commit(self) -> None:
        """Write ``config.yaml`` (main process) and the log so far to ``log.txt`` (``.rank<r>``: the others)."""
        if self.committed:
            return
        if self.lock is not None:
            self.lock.acquire()
        self.committed = True
        out = self.cfg.OUTPUT_DIR
        loggers = [logging.getLogger(name) for name in LOGGERS]
        for log in loggers:
            log.removeHandler(self._buffer)
        if not out:
            return
        os.makedirs(out, exist_ok=True)
        if comm.is_main_process():
            atomic_write_text(os.path.join(out, "config.yaml"), self.cfg.dump())
        rank = comm.get_rank()
        handler = logging.FileHandler(os.path.join(out, "log.txt" + (f".rank{rank}" if rank else "")), mode="a")
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s",
                                               datefmt="%m/%d %H:%M:%S"))
        self._buffer.setTarget(handler)
        self._buffer.flush()
        for log in loggers:
            log.addHandler(handler)
        self._handler = handler
        logging.getLogger("sgr_d2").info("Full config saved to %s; the log goes to %s",
                                         os.path.join(out, "config.yaml"), handler.baseFilename)

    def __exit__(self, *exc):
        for name in LOGGERS:  # (removing a handler a logger does not have does nothing)
            logging.getLogger(name).removeHandler(self._buffer)
            logging.getLogger(name).removeHandler(self._handler)
        if self._handler is not None:
            self._handler.close()


class DeferredWriters(EventWriter):
    """detectron2's event writers (``metrics.json``, TensorBoard, the console), made by ``make`` at
    the first write after ``run_files`` committed; writes before that (nothing trained) are dropped."""

    def __init__(self, make: Callable[[], List[EventWriter]], run_files: RunFiles):
        self._make = make
        self._run_files = run_files
        self._writers = None

    def write(self):
        if not self._run_files.committed:
            return
        if self._writers is None:
            self._writers = self._make()
        for w in self._writers:
            w.write()

    def close(self):
        for w in self._writers or ():
            w.close()
