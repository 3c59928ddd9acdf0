"""Training-loop guards for long runs (see docs/reliability.md)."""
from __future__ import annotations

import logging
import math
import os
import weakref
from typing import Dict, Mapping

import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.utils import comm

__all__ = ["NonFiniteLossGuard"]

logger = logging.getLogger(__name__)


class NonFiniteLossGuard:
    """Stops training at the first NaN or infinite loss, *before* that step changes anything.

    detectron2's ``SimpleTrainer`` notices a non-finite loss only in ``_write_metrics``, after
    ``backward`` (and, in newer versions, possibly after ``optimizer.step``), and raises without
    saving. This guard checks the loss dict as it leaves the model's forward pass (a forward hook
    on the trainer's model, so it works with DDP and whatever ``run_step`` does next):

    * before each training forward pass it keeps a copy of the model's buffers, because the
      forward pass itself updates BatchNorm's running statistics with the bad batch;
    * when a loss term is not finite on any worker (the flag is all-reduced, so every worker
      stops at the same iteration instead of hanging in the next collective), it puts the
      buffers back, saves the state after the last good iteration (weights, buffers, optimizer,
      LR schedule, ``iteration = bad - 1``) as ``<OUTPUT_DIR>/<filename>.pth`` through the
      trainer's checkpointer, which also tags it in ``last_checkpoint`` (so ``--resume`` continues
      from it), and raises ``FloatingPointError`` naming the iteration and every loss term.
    """

    def __init__(self, trainer, filename: str = "model_last_good"):
        self._trainer = weakref.ref(trainer)
        self.filename = filename
        model = trainer._trainer.model
        self._module = model.module if isinstance(model, DistributedDataParallel) else model
        self._buffers: Dict[str, torch.Tensor] = {}
        self._handles = [model.register_forward_pre_hook(self._snapshot),
                         model.register_forward_hook(self._check)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _snapshot(self, module, args) -> None:
        if module.training:
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
        bad = (~torch.isfinite(values)).any().to(torch.int32).reshape(1)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(bad)
        if int(bad.item()) == 0:
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
            f"{saved}. Lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS, or check the images "
            "of this iteration."
        )

    def _save_last_good(self, trainer, iteration: int) -> str:
        checkpointer = trainer.checkpointer
        if not checkpointer.save_dir:
            return "no checkpoint was written (the checkpointer has no save_dir: OUTPUT_DIR is empty)"
        path = os.path.join(checkpointer.save_dir, f"{self.filename}.pth")
        # The trainer's state_dict records trainer.iter as the iteration that *finished*.
        trainer.iter = iteration - 1
        try:
            checkpointer.save(self.filename, iteration=iteration - 1)
            msg = (f"the state after iteration {iteration - 1} (weights, BatchNorm statistics, "
                   f"optimizer, LR schedule) was saved to {path} and tagged in last_checkpoint, so "
                   "`--resume` continues from it")
        except Exception as e:  # keep the loss error; say why nothing was saved
            logger.exception("could not save %s", path)
            msg = (f"saving the state after iteration {iteration - 1} to {path} failed: "
                   f"{type(e).__name__}: {e}")
        finally:
            trainer.iter = iteration
        comm.synchronize()  # the main worker saves; the others wait for it
        return msg
