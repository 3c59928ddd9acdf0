"""Training-loop guards for long runs (docs/reliability.md)."""
from __future__ import annotations

import logging
import math
import os
import weakref
from typing import Dict, Mapping

import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.engine import HookBase
from detectron2.utils import comm

from . import preemption
from .checkpoint import newest_checkpoint

__all__ = ["NonFiniteLossGuard", "FinalCheckpoint", "UnlabelledImagesMonitor", "state_problem", "MAX_NORM_GROWTH"]

logger = logging.getLogger(__name__)

# A state is kept as "last good" only if the L2 norm of all its parameters together is at most
# this many times the norm when the run started (toy runs stay within 1.1x; a diverging one
# passes 40x in one step at SOLVER.BASE_LR 1e2).
MAX_NORM_GROWTH = 10.0


def _param_norm(named_tensors, param_names) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for n, t in named_tensors if n in param_names))


def state_problem(state: Mapping[str, torch.Tensor], param_names, reference_norm: float):
    """Why ``state`` (a model state dict) is not sane to resume from, or None: every tensor finite and
    the parameters' joint L2 norm at most ``MAX_NORM_GROWTH`` times ``reference_norm``."""
    for name, t in state.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"{name} holds NaN or infinite values"
    norm = _param_norm(state.items(), param_names)
    if reference_norm > 0 and norm > MAX_NORM_GROWTH * reference_norm:
        return (f"the parameters' norm {norm:.4g} is {norm / reference_norm:.3g} times the norm at "
                f"the start of the run ({reference_norm:.4g}; at most {MAX_NORM_GROWTH:g} times is sane)")
    return None


class NonFiniteLossGuard:
    """Stops training at the first NaN or infinite loss, *before* that step changes anything
    (docs/reliability.md#nan-or-infinite-losses; detectron2 notices it after ``backward``, and saves
    nothing). A forward hook on the trainer's model (DDP or not, any ``run_step``): it copies the
    buffers before each training forward pass (which updates BatchNorm's statistics with the bad
    batch); at a non-finite term on any worker it puts them back, keeps a sane state
    (:func:`state_problem`) to resume from, and raises ``FloatingPointError`` naming the iteration,
    the terms and what was kept. Its per-iteration gather also carries whether any worker received a
    preemption signal (``stop_requested`` at iteration ``agreed_at``): ``PreemptionHook``'s agreement."""

    def __init__(self, trainer, filename: str = "model_last_good"):
        self._trainer = weakref.ref(trainer)
        self.filename = filename
        model = trainer._trainer.model
        self._module = model.module if isinstance(model, DistributedDataParallel) else model
        self._buffers: Dict[str, torch.Tensor] = {}
        self._param_names = {n for n, _ in self._module.named_parameters()}
        self.reference_norm = None
        self.agreed_at, self.stop_requested = None, False
        model.register_forward_pre_hook(self._snapshot)
        model.register_forward_hook(self._check)

    def _snapshot(self, module, args) -> None:
        if module.training:
            if self.reference_norm is None:
                self.reference_norm = _param_norm(self._module.named_parameters(), self._param_names)
            self._buffers = {n: b.detach().clone() for n, b in self._module.named_buffers()}

    def _check(self, module, args, output) -> None:
        if not module.training or not isinstance(output, Mapping):
            return
        terms = {k: v for k, v in output.items() if torch.is_tensor(v)}
        if not terms:
            return
        values = torch.stack([v.detach().float().sum() for v in terms.values()])
        # The one host sync of the guard: it must decide before this step's backward and update.
        bad = not bool(torch.isfinite(values).all())
        # every worker learns whether any must stop (a bad loss, a preemption signal): an object collective
        # on detectron2's gloo group, never a tensor on the default group (NCCL on a cluster: GPU only)
        flags = comm.all_gather((bad, preemption.requested()))
        bad = any(b for b, _ in flags)
        trainer = self._trainer()
        self.agreed_at = trainer.iter if trainer is not None else None
        self.stop_requested = any(p for _, p in flags)
        if not bad:
            return
        self._stop({k: float(v) for k, v in zip(terms, values.tolist())})

    def _stop(self, local: Dict[str, float]) -> None:
        trainer = self._trainer()
        iteration = trainer.iter if trainer is not None else -1
        per_worker = comm.all_gather(local)
        terms = "; ".join(("" if len(per_worker) == 1 else f"worker {r}: ")
                          + ", ".join(f"{k}={v:.6g}" for k, v in d.items()) for r, d in enumerate(per_worker))
        with torch.no_grad():  # the buffers as they were before this forward pass
            for name, buf in self._module.named_buffers():
                if name in self._buffers:
                    buf.copy_(self._buffers[name])
        saved = ("no checkpoint was written (the trainer is gone)" if trainer is None
                 else self._save_last_good(trainer, iteration))
        bad_terms = sorted({k for d in per_worker for k, v in d.items() if not math.isfinite(v)})
        raise FloatingPointError(
            f"Loss became infinite or NaN at iteration {iteration} (non-finite: "
            f"{', '.join(bad_terms)}): {terms}. The update of this iteration was not applied; "
            f"{saved}. Lower SOLVER.BASE_LR (given with --resume, it replaces the checkpoint's "
            "learning rates), enable SOLVER.CLIP_GRADIENTS, or check the images of this iteration."
        )

    def _save_last_good(self, trainer, iteration: int) -> str:
        checkpointer = trainer.checkpointer
        if not checkpointer.save_dir:
            return "no checkpoint was written (the checkpointer has no save_dir: OUTPUT_DIR is empty)"
        msg = None
        if comm.is_main_process():  # it alone writes; the others learn the outcome below
            try:
                msg = self._keep_sane_state(trainer, checkpointer, iteration)
            except Exception as e:  # keep the loss error; say why nothing was kept
                logger.exception("could not keep a last good state")
                msg = f"keeping a last good state failed: {type(e).__name__}: {e}"
        return comm.all_gather(msg)[0]

    def _keep_sane_state(self, trainer, checkpointer, iteration: int) -> str:
        path = os.path.join(checkpointer.save_dir, f"{self.filename}.pth")
        reference = self.reference_norm or 0.0
        problem = state_problem(self._module.state_dict(), self._param_names, reference)
        if problem is None:
            trainer.save_checkpoint(self.filename, iteration - 1)
            return (f"the state after iteration {iteration - 1} (weights, BatchNorm statistics, "
                    f"optimizer, LR schedule, data position) passed the sanity check (finite, "
                    f"parameter norm within {MAX_NORM_GROWTH:g}x the start's) and was saved to "
                    f"{path} and tagged in last_checkpoint, so `--resume` continues from it")
        msg = f"the state after iteration {iteration - 1} was not kept: {problem}"
        # the checkpoints this run saved or resumed from (all before this iteration) that the tag can
        # name (files of save_dir)
        save_dir = os.path.abspath(checkpointer.save_dir)
        ours = [p for p in [*checkpointer.saved, checkpointer.resumed_from]
                if p and os.path.dirname(os.path.abspath(p)) == save_dir]
        older = newest_checkpoint(ours, lambda ckpt: state_problem(ckpt["model"], self._param_names, reference))
        if older is not None:
            name, it = os.path.basename(older[0]), older[1]
            checkpointer.tag_last_checkpoint(name)
            return (f"{msg}. last_checkpoint now names {name} (iteration {it}), the newest checkpoint "
                    "of this run that passed the sanity check, so `--resume` continues from it")
        tag = os.path.join(checkpointer.save_dir, "last_checkpoint")
        if os.path.exists(tag):
            os.unlink(tag)
        return (f"{msg}. No checkpoint of this run passed the sanity check, so {tag} was removed: "
                "`--resume` starts again from MODEL.WEIGHTS at iteration 0")


class FinalCheckpoint(HookBase):
    """Writes ``model_final.pth`` after a successful run that had no iteration left: a run killed
    while ``PeriodicCheckpointer`` wrote it (``MAX_ITER`` a multiple of ``CHECKPOINT_PERIOD``) leaves
    ``last_checkpoint`` naming ``model_<MAX_ITER - 1>.pth``, and ``--resume`` runs no iteration."""

    def after_train(self):
        t = self.trainer
        # Only when no iteration ran and the loop ended without an exception (after_train runs then
        # too): TrainerBase.train sets iter = start_iter and adds 1 after an empty loop.
        if t.start_iter == t.max_iter and t.iter == t.max_iter + 1:
            t.save_checkpoint("model_final", t.max_iter - 1)


class UnlabelledImagesMonitor:
    """Warns once when no training crop of the first ``window`` iterations (or of a shorter run) has
    a labelled pixel, summed over workers: such a run trains at loss 0 (not NaN) and learns nothing.
    A forward pre-hook on the trainer's model counts the crops whose ``sem_seg`` is all ignore."""

    def __init__(self, trainer, window: int = 20):
        self._trainer = weakref.ref(trainer)
        self.window = window
        self.ignore = trainer.cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        self.images = self.unlabelled = self.iterations = 0
        self.unlabelled_files = set()
        self.done = False
        trainer._trainer.model.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        if self.done or not module.training or not args or not isinstance(args[0], (list, tuple)):
            return
        batch = [x for x in args[0] if isinstance(x, Mapping) and "sem_seg" in x]
        if not batch:
            self.done = True  # detection: no semantic labels to check
            return
        for x in batch:
            self.images += 1
            if not bool((x["sem_seg"] != self.ignore).any()):
                self.unlabelled += 1
                self.unlabelled_files.add(x.get("file_name", id(x)))
        self.iterations += 1
        trainer = self._trainer()
        if self.iterations >= self.window or (trainer is not None and trainer.iter >= trainer.max_iter - 1):
            self.done = True
            self._decide()

    def _decide(self) -> None:
        # host-side counts: an object collective (detectron2's gloo group), never a tensor one
        counts = comm.all_gather((self.images, self.unlabelled, self.unlabelled_files))
        images, unlabelled = (sum(c[i] for c in counts) for i in (0, 1))
        unlabelled_files = len(set().union(*(c[2] for c in counts)))
        if images and unlabelled == images and comm.is_main_process():
            logger.warning(
                "No training image has a labelled pixel: all %d images (%d files%s) of the first %d "
                "iteration(s) hold only the ignore label %d in their crops, so every loss is 0 and "
                "the model learns nothing. Check the label files of DATASETS.TRAIN and "
                "MODEL.SEM_SEG_HEAD.IGNORE_VALUE.", images, unlabelled_files,
                ", summed over workers" if comm.get_world_size() > 1 else "", self.iterations,
                self.ignore)
