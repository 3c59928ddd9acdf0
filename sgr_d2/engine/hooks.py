"""Training-loop guards for long runs (see docs/reliability.md)."""
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

from ..files import read_weights
from . import preemption

__all__ = ["NonFiniteLossGuard", "FinalCheckpoint", "UnlabelledImagesMonitor", "state_problem",
           "MAX_NORM_GROWTH"]

logger = logging.getLogger(__name__)

# A state is kept as "last good" only if the L2 norm of all its parameters together is at most
# this many times the norm when the run started (toy runs stay within 1.1x; a diverging one
# passes 40x in one step at SOLVER.BASE_LR 1e2).
MAX_NORM_GROWTH = 10.0


def _param_norm(named_tensors, param_names) -> float:
    total = 0.0
    for name, t in named_tensors:
        if name in param_names:
            total += float(t.detach().double().pow(2).sum())
    return math.sqrt(total)


def state_problem(state: Mapping[str, torch.Tensor], param_names, reference_norm: float):
    """Why ``state`` (a model state dict) is not a sane state to resume from, or None when it is:
    every tensor (parameters and buffers) finite, and the parameters' joint L2 norm at most
    ``MAX_NORM_GROWTH`` times ``reference_norm``."""
    for name, t in state.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"{name} holds NaN or infinite values"
    norm = _param_norm(state.items(), param_names)
    if reference_norm > 0 and norm > MAX_NORM_GROWTH * reference_norm:
        return (f"the parameters' norm {norm:.4g} is {norm / reference_norm:.3g} times the norm at "
                f"the start of the run ({reference_norm:.4g}; at most {MAX_NORM_GROWTH:g} times is sane)")
    return None


class NonFiniteLossGuard:
    """Stops training at the first NaN or infinite loss, *before* that step changes anything.

    detectron2's ``SimpleTrainer`` notices a non-finite loss only in ``_write_metrics``, after
    ``backward`` (and, in newer versions, possibly after ``optimizer.step``), and raises without
    saving. This guard checks the loss dict as it leaves the model's forward pass (a forward hook
    on the trainer's model, so it works with DDP and whatever ``run_step`` does next):

    * before each training forward pass it keeps a copy of the model's buffers, because the
      forward pass itself updates BatchNorm's running statistics with the bad batch;
    * at the first training forward pass it records the parameters' norm (the reference of
      :func:`state_problem`);
    * when a loss term is not finite on any worker (the flag is all-reduced, so every worker
      stops at the same iteration instead of hanging in the next collective), it puts the
      buffers back and keeps a *sane* state (:func:`state_problem`) to resume from:

      - the state after the last iteration, if sane: saved (weights, buffers, optimizer, LR
        schedule, data position, ``iteration = bad - 1``) as ``<OUTPUT_DIR>/<filename>.pth``
        through the trainer's checkpointer, which tags it in ``last_checkpoint``;
      - otherwise the newest sane checkpoint this run saved (or resumed from) is tagged;
      - if there is none, ``last_checkpoint`` is removed (``--resume`` then starts from
        MODEL.WEIGHTS at iteration 0);

      and raises ``FloatingPointError`` naming the iteration, every loss term and what was kept.

    With several workers, the gather of the flag also carries whether the worker received a
    preemption signal (``stop_requested``: any worker did, at iteration ``agreed_at``), so that
    :class:`~sgr_d2.engine.preemption.PreemptionHook` needs no collective of its own.
    """

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

    def _restore_buffers(self) -> None:
        with torch.no_grad():
            for name, buf in self._module.named_buffers():
                if name in self._buffers:
                    buf.copy_(self._buffers[name])

    def _check(self, module, args, output) -> None:
        if not module.training or not isinstance(output, Mapping):
            return
        terms = {k: v for k, v in output.items() if torch.is_tensor(v)}
        if not terms:
            return
        values = torch.stack([v.detach().float().sum() for v in terms.values()])
        # The one host sync of the guard: it must decide before this step's backward and update.
        bad = not bool(torch.isfinite(values).all())
        if comm.get_world_size() > 1:
            # every worker learns whether any worker must stop (an object collective on
            # detectron2's gloo group: host-side code never puts a tensor on the default group,
            # which is NCCL on a cluster and refuses CPU tensors); with it, whether any worker
            # must stop for a preemption signal
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
        per_worker = comm.all_gather(local) if comm.get_world_size() > 1 else [local]

        def fmt(d):
            return ", ".join(f"{k}={v:.6g}" for k, v in d.items())

        if len(per_worker) == 1:
            terms = fmt(local)
        else:
            terms = "; ".join(f"worker {r}: {fmt(d)}" for r, d in enumerate(per_worker))
        self._restore_buffers()
        saved = "no checkpoint was written (the trainer is gone)"
        if trainer is not None:
            saved = self._save_last_good(trainer, iteration)
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
        if comm.get_world_size() > 1:
            msg = comm.all_gather(msg)[0]
        return msg

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
        older = self._newest_sane_checkpoint(checkpointer, iteration, reference)
        if older is not None:
            name, it = older
            checkpointer.tag_last_checkpoint(name)
            return (f"{msg}. last_checkpoint now names {name} (iteration {it}), the newest checkpoint "
                    "of this run that passed the sanity check, so `--resume` continues from it")
        tag = os.path.join(checkpointer.save_dir, "last_checkpoint")
        if os.path.exists(tag):
            os.unlink(tag)
        return (f"{msg}. No checkpoint of this run passed the sanity check, so {tag} was removed: "
                "`--resume` starts again from MODEL.WEIGHTS at iteration 0")

    def _newest_sane_checkpoint(self, checkpointer, iteration: int, reference: float):
        """(basename, iteration) of the newest sane checkpoint this run saved or resumed from."""
        candidates = list(checkpointer.saved)
        if checkpointer.resumed_from:
            candidates.append(checkpointer.resumed_from)
        found = []
        for path in dict.fromkeys(candidates):
            if os.path.dirname(os.path.abspath(path)) != os.path.abspath(checkpointer.save_dir):
                continue  # last_checkpoint can only name a file of save_dir
            try:
                ckpt = read_weights(path, mmap=True)
                it = int(ckpt.get("iteration", -1))
                if it >= iteration:
                    continue
                problem = state_problem(ckpt["model"], self._param_names, reference)
            except Exception as e:
                logger.warning("cannot check %s: %s: %s", path, type(e).__name__, e)
                continue
            if problem is None:
                found.append((it, os.path.basename(path)))
            else:
                logger.warning("not resuming from %s: %s", path, problem)
        if not found:
            return None
        it, name = max(found)
        return name, it


class FinalCheckpoint(HookBase):
    """Writes ``model_final.pth`` after a successful run that had no iteration left to do.

    detectron2's ``PeriodicCheckpointer`` writes it at the last iteration; a run killed during
    that write, when ``MAX_ITER`` is a multiple of ``CHECKPOINT_PERIOD``, leaves
    ``last_checkpoint`` naming ``model_<MAX_ITER - 1>.pth``, and ``--resume`` then starts at
    ``MAX_ITER``, runs no iteration and would never write ``model_final.pth``.
    """

    def __init__(self, name: str = "model_final"):
        self.name = name

    def after_train(self):
        t = self.trainer
        # Only when no iteration ran (start_iter == max_iter), and the loop ended without an
        # exception (after_train runs then too): TrainerBase.train sets iter = start_iter and adds
        # 1 after an empty loop.
        if t.start_iter == t.max_iter and t.iter == t.max_iter + 1:
            t.save_checkpoint(self.name, t.max_iter - 1)


class UnlabelledImagesMonitor:
    """Warns once when no training crop of the first ``window`` iterations has a labelled pixel.

    A training set whose label maps are all ignore trains at loss 0 (the heads' all-ignore
    batches give a zero loss, not NaN): the run looks healthy but learns nothing. A forward
    pre-hook on the trainer's model counts the images whose ``sem_seg`` target holds only the
    ignore label (summed over workers); after ``window`` iterations, or at the last one if the
    run is shorter, it warns if every image was so, naming the counts.
    """

    def __init__(self, trainer, window: int = 20):
        self._trainer = weakref.ref(trainer)
        self.window = window
        self.ignore = trainer.cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        self.images = self.unlabelled = self.iterations = 0
        self.unlabelled_files = set()
        self.warned = False
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
            name = x.get("file_name", id(x))
            self.images += 1
            if not bool((x["sem_seg"] != self.ignore).any()):
                self.unlabelled += 1
                self.unlabelled_files.add(name)
        self.iterations += 1
        trainer = self._trainer()
        last = trainer is not None and trainer.iter >= trainer.max_iter - 1
        if self.iterations >= self.window or last:
            self.done = True
            self._decide()

    def _decide(self) -> None:
        # host-side counts: an object collective (detectron2's gloo group), never a tensor one
        counts = [(self.images, self.unlabelled, self.unlabelled_files)]
        if comm.get_world_size() > 1:
            counts = comm.all_gather(counts[0])
        images = sum(c[0] for c in counts)
        unlabelled = sum(c[1] for c in counts)
        unlabelled_files = len(set().union(*(c[2] for c in counts)))
        if images and unlabelled == images and comm.is_main_process():
            self.warned = True
            logger.warning(
                "No training image has a labelled pixel: all %d images (%d files%s) of the first %d "
                "iteration(s) hold only the ignore label %d in their crops, so every loss is 0 and "
                "the model learns nothing. Check the label files of DATASETS.TRAIN and "
                "MODEL.SEM_SEG_HEAD.IGNORE_VALUE.", images, unlabelled_files,
                ", summed over workers" if comm.get_world_size() > 1 else "", self.iterations,
                self.ignore)
