"""``SOLVER.AMP.ENABLED`` on any device: float16 with gradient scaling on CUDA, bfloat16 on the CPU.

detectron2's ``AMPTrainer`` asserts CUDA and its autocast leaves CPU tensors alone, so a model on
the CPU gets :class:`CPUAutocastTrainer`. The parts that must stay float32 (SGR's region softmax,
token average, matching and losses; the MaskFormer criterion; the per-pixel cross-entropy) switch
autocast off themselves (``sgr_d2.sgr.autocast_off``).
"""
from __future__ import annotations

import logging

import torch

from detectron2.engine import AMPTrainer, SimpleTrainer

__all__ = ["CPUAutocastTrainer", "build_step_trainer"]

logger = logging.getLogger(__name__)


class CPUAutocastTrainer(SimpleTrainer):
    """detectron2's ``SimpleTrainer`` (its own ``run_step``, whichever version) whose model call, and
    only that, runs under CPU autocast in ``precision``: entered by a forward pre-hook, left by the
    forward hook, so backward, the optimiser step and evaluation run outside it, as PyTorch recommends.
    The parameters stay float32; no gradient scaling (bfloat16 has float32's exponent range)."""

    def __init__(self, model, data_loader, optimizer, *args, precision: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(model, data_loader, optimizer, *args, **kwargs)
        self.precision = precision
        self._in_step = False
        self._autocast = None
        model.register_forward_pre_hook(self._enter_autocast)
        model.register_forward_hook(self._leave_autocast)

    def _enter_autocast(self, module, args) -> None:
        if self._in_step and self._autocast is None:
            self._autocast = torch.autocast(device_type="cpu", dtype=self.precision)
            self._autocast.__enter__()

    def _leave_autocast(self, module=None, args=None, output=None) -> None:
        if self._autocast is not None:
            ctx, self._autocast = self._autocast, None
            ctx.__exit__(None, None, None)

    def run_step(self):
        self._in_step = True
        try:
            return super().run_step()
        finally:
            self._in_step = False
            self._leave_autocast()  # when the forward pass raised


def build_step_trainer(cfg, model, data_loader, optimizer):
    """The step trainer that ``Trainer`` composes, logged: detectron2's ``SimpleTrainer``, or with
    ``SOLVER.AMP.ENABLED`` its ``AMPTrainer`` on CUDA and :class:`CPUAutocastTrainer` on the CPU."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if not cfg.SOLVER.AMP.ENABLED:
        trainer, what = SimpleTrainer(model, data_loader, optimizer), "float32 (detectron2's SimpleTrainer)"
    elif device.type == "cuda":
        trainer = AMPTrainer(model, data_loader, optimizer)
        what = ("mixed precision, SOLVER.AMP.ENABLED: float16 autocast with gradient scaling "
                "(detectron2's AMPTrainer); SGR's region softmax, matching and losses in float32")
    else:
        trainer = CPUAutocastTrainer(model, data_loader, optimizer)
        what = ("mixed precision, SOLVER.AMP.ENABLED: bfloat16 autocast without gradient scaling "
                "(sgr_d2's CPUAutocastTrainer); SGR's region softmax, matching and losses in float32")
    logger.info("Training on %s in %s", device, what)
    return trainer
