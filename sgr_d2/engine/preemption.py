"""Preemption: a signal ends training at an iteration boundary, with a checkpoint to resume from
(docs/multi_gpu.md#preemption).

While ``Trainer.train`` runs, :class:`PreemptionHook` records SIGTERM, SIGUSR1 and SIGUSR2
(:data:`SIGNALS`) in every worker. At the first iteration boundary every worker agrees on, it
saves ``model_<iteration>.pth`` through ``Trainer.save_checkpoint`` (atomic, tagged, every
worker's random states), waits until the save is complete and raises :class:`Preempted`, a
``SystemExit`` with :data:`EXIT_CODE` (75, ``EX_TEMPFAIL``): ``--resume`` continues bit for bit.

**Agreement.** The decision must be the same on every worker, or one would wait forever in a
collective the others never join. It rides on the NaN guard's per-iteration object gather
(:class:`~sgr_d2.engine.hooks.NonFiniteLossGuard` gathers ``(loss not finite, preemption
requested)``), so it costs no collective of its own (``bench/preemption_agreement.py``); an
iteration without that gather falls back to a ``comm.all_gather`` of the flag (detectron2's gloo
group: the NCCL rule). A signal seen after a worker's forward pass of iteration ``i`` is agreed
at ``i + 1``, so the boundary is the end of that iteration, after all its hooks (an evaluation
running then finishes and is written to ``metrics.json``).

Not a boundary: the last iteration (``model_final.pth`` is saved there anyway; the run exits 0),
nor anything before the first iteration or after training, where no handler is installed and the
signal's default action ends a process that has nothing to save; nor do the handlers hold in a
process forked while they are set (a DataLoader worker, panopticapi's process pool). A second
signal changes nothing: the save is not interrupted, and even a SIGKILL during it leaves the
previous checkpoint and tag intact (``sgr_d2.files.atomic_write``).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Dict, List

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["EXIT_CODE", "SIGNALS", "Preempted", "PreemptionHook", "requested"]

logger = logging.getLogger(__name__)

EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: "temporary failure, run me again"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

_received: List[int] = []  # the preemption signals this process received while training
_owner: List[int] = [0]  # the pid of the training process, which installed the handlers


def _record(signum, frame) -> None:
    if os.getpid() != _owner[0]:
        # a process forked while the handler was set (a DataLoader worker, the process pool of
        # panopticapi's PQ): the signal's default action, as if no handler had been set; else the
        # SIGTERM its parent ends it with is only recorded, and the parent waits for it forever
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received.append(signum)


def requested() -> bool:
    """Whether this process received a preemption signal while training."""
    return bool(_received)


class Preempted(SystemExit):
    """Training stopped after ``iteration`` for the preemption ``signals`` this worker received,
    after a complete checkpoint: exit with :data:`EXIT_CODE` and resume."""

    def __init__(self, iteration: int, signals):
        super().__init__(EXIT_CODE)
        self.iteration = iteration
        self.signals = tuple(signals)


def _names(signums) -> str:
    return ", ".join(dict.fromkeys(signal.Signals(s).name for s in signums)) or "none here"


class PreemptionHook(HookBase):
    """The hook of the module docstring, registered last: its ``after_step`` runs after every
    other hook's (the checkpointer, the evaluation, the writers).

    After it has stopped training, the signals stay ignored until the process exits: when one
    worker exits, torchrun and ``torch.multiprocessing`` send SIGTERM to the others, which must
    still finish their own exit (log, lock, process groups) with code 75. (Ignored, not handled:
    Python puts the default action back for the signals it handles when it shuts down.)"""

    def __init__(self):
        self._previous: Dict[int, object] = {}
        self.stopped = False

    def before_train(self):
        del _received[:]
        _owner[0] = os.getpid()
        if threading.current_thread() is not threading.main_thread():
            logger.warning("training runs outside the main thread: preemption signals are not caught")
            return
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, _record)

    def after_train(self):
        if not self.stopped:
            for s, previous in self._previous.items():  # (None: a handler not set from Python)
                signal.signal(s, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        t = self.trainer
        if _received and t.iter >= t.max_iter - 1:
            logger.warning("preemption signal(s) %s arrived after the last iteration had started: the run "
                           "was completed instead", _names(_received))

    def _agreed(self) -> bool:
        if comm.get_world_size() == 1:
            return requested()
        guard = getattr(self.trainer, "loss_guard", None)
        if guard is not None and guard.agreed_at == self.trainer.iter:
            return guard.stop_requested
        return any(comm.all_gather(requested()))

    def after_step(self):
        t = self.trainer
        if t.iter >= t.max_iter - 1 or not self._agreed():
            return
        t.gather_worker_rng(t.iter)
        t.save_checkpoint(f"model_{t.iter:07d}", t.iter)
        comm.synchronize()  # every worker leaves once the checkpoint is complete
        signals = list(_received)
        saved = t.checkpointer.get_checkpoint_file() if comm.is_main_process() else None
        logger.warning(
            "Preempted (signals received by this worker: %s): stopped after iteration %d%s; the same "
            "command with --resume continues at iteration %d; exiting with code %d",
            _names(signals), t.iter, f", saved to {saved}" if saved else "", t.iter + 1, EXIT_CODE)
        self.stopped = True
        for s in self._previous:  # ignored, not recorded: an ignored signal stays so while Python exits
            signal.signal(s, signal.SIG_IGN)
        raise Preempted(t.iter, signals)
