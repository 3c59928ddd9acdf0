"""What a training checkpoint holds besides the weights, and how ``--resume`` puts it back
(docs/reliability.md#what-a-checkpoint-holds): the sampler's stream position (:class:`ResumableSampler`),
the random states (by rank with several workers), and the config's optimizer hyperparameters over
the checkpoint's (:func:`apply_config_hyperparameters`).
"""
from __future__ import annotations

import itertools
import logging
import random
from typing import Dict, Optional

import numpy as np
import torch
from torch.utils.data import Sampler, get_worker_info

from detectron2.data import build_detection_train_loader
from detectron2.utils import comm

__all__ = ["ResumableSampler", "resumable_train_loader", "rng_state", "set_rng_state", "own_rng_state",
           "configured_hyperparameters", "apply_config_hyperparameters", "restart_data_loader"]

logger = logging.getLogger(__name__)


class ResumableSampler(Sampler):
    """A detectron2 training sampler (an infinite stream of dataset indices, of which worker ``r``
    of ``W`` takes positions ``r, r + W, ...``) that starts at position ``start`` of the whole
    stream (each worker skips ``start // W`` indices of its share), shuffled with ``seed``."""

    def __init__(self, sampler: Sampler):
        super().__init__()
        self.sampler = sampler
        self.start = 0
        # the saved run's random states, restored when the stream yields its first index (NUM_WORKERS 0)
        self.rng_state: Optional[Dict] = None

    @property
    def seed(self) -> Optional[int]:
        seed = getattr(self.sampler, "_seed", None)
        return None if seed is None else int(seed)

    @seed.setter
    def seed(self, value: int) -> None:
        if hasattr(self.sampler, "_seed"):
            self.sampler._seed = int(value)

    def __iter__(self):
        stream = itertools.islice(iter(self.sampler), self.start // comm.get_world_size(), None)
        if self.rng_state is None or get_worker_info() is not None:
            return stream
        return self._restoring(stream)

    def _restoring(self, stream):
        first = next(stream)
        state, self.rng_state = self.rng_state, None
        set_rng_state(state)
        yield first
        yield from stream


def resumable_train_loader(cfg, mapper=None):
    """detectron2's ``build_detection_train_loader(cfg, mapper)`` whose sampler, a
    :class:`ResumableSampler`, the loader carries as ``resumable_sampler``."""
    kwargs = build_detection_train_loader.from_config(cfg, mapper)
    sampler = kwargs.get("sampler")
    if sampler is not None:
        kwargs["sampler"] = ResumableSampler(sampler)
    loader = build_detection_train_loader(**kwargs)
    loader.resumable_sampler = kwargs["sampler"]
    return loader


def restart_data_loader(simple_trainer) -> None:
    """Make detectron2's ``SimpleTrainer`` read its data loader from the start, now (v0.6 keeps
    the iterator in ``_data_loader_iter``, upstream main in ``_data_loader_iter_obj``), so that
    the iterator's draw of its base seed happens before the random states are restored."""
    lazy = isinstance(getattr(type(simple_trainer), "_data_loader_iter", None), property)
    setattr(simple_trainer, "_data_loader_iter_obj" if lazy else "_data_loader_iter", iter(simple_trainer.data_loader))


def rng_state() -> Dict:
    """Python's, NumPy's and torch's random states (and the current CUDA device's once CUDA is in
    use), in types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def own_rng_state(saved) -> Optional[Dict]:
    """This worker's random states in a checkpoint's ``rng`` (one process's dict, or a list by
    rank), or None with a warning when the checkpoint was written by another number of workers."""
    world, by_rank = comm.get_world_size(), isinstance(saved, (list, tuple))
    count = len(saved) if by_rank else 1
    if count == world:
        return saved[comm.get_rank()] if by_rank else saved
    logger.warning("resume: the checkpoint holds the random states of %d worker(s), this run has %d: "
                   "the images continue where they stopped, their augmentations from fresh random "
                   "states", count, world)
    return None


def configured_hyperparameters(optimizer, scheduler):
    """The optimizer's per-group hyperparameters and the scheduler's base LRs, before a checkpoint's replace them."""
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in optimizer.param_groups]
    return groups, list(getattr(scheduler, "base_lrs", []))


def apply_config_hyperparameters(optimizer, scheduler, configured, iteration: int) -> None:
    """After the optimizer's and scheduler's ``load_state_dict`` (the checkpoint's LRs, momentum,
    weight decay ...), put the config's values back, with a warning, keeping the checkpoint's state
    (momentum buffers, moments). A changed base LR rescales each group's current LR by new / old
    base, so the schedule continues at ``iteration`` from the new base."""
    groups, base_lrs = configured
    changed = {}
    for i, (g, c) in enumerate(zip(optimizer.param_groups, groups)):
        for k, v in c.items():
            if k in g and g[k] != v:
                changed.setdefault(k, []).append((g.get("name", f"group {i}"), g[k], v))
                g[k] = v
    for k, items in changed.items():
        logger.warning("resume: %s of %d parameter group(s) set from the config, not the checkpoint "
                       "(e.g. %s: %s -> %s)", k, len(items), *items[0])
    loaded = list(getattr(scheduler, "base_lrs", []))
    if base_lrs and len(loaded) == len(base_lrs) and loaded != base_lrs:
        moved = []
        for i, (g, old, new) in enumerate(zip(optimizer.param_groups, loaded, base_lrs)):
            if old == new:
                continue
            before = g["lr"]
            g["lr"] = before * new / old if old else new
            g["initial_lr"] = new
            moved.append((g.get("name", f"group {i}"), old, new, before, g["lr"]))
        scheduler.base_lrs = list(base_lrs)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        name, old, new, before, after = moved[0]
        logger.warning(
            f"resume: the config's learning rates replace the checkpoint's (SOLVER.BASE_LR and its "
            f"multipliers) in {len(moved)} of {len(base_lrs)} parameter groups, e.g. {name}: base LR "
            f"{old:.6g} -> {new:.6g}; the LR schedule continues at iteration {iteration} with that "
            f"group's LR {before:.6g} -> {after:.6g}")
