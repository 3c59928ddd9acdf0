"""Preemption: a signal ends training at an iteration boundary, with a checkpoint to resume from
(docs/multi_gpu.md#preemption).

While ``Trainer.train`` runs, :class:`PreemptionHook` records SIGTERM, SIGUSR1 and SIGUSR2 in
every worker; at the first iteration boundary all workers agree on, it saves ``model_<iteration>.pth``
(atomic, tagged, every worker's random states), waits until it is complete and raises
:class:`Preempted` (exit :data:`EXIT_CODE`): ``--resume`` continues bit for bit. The decision must be
the same on every worker, or one would wait forever in a collective the others never join: it rides
on the NaN guard's per-iteration object gather (no collective of its own,
``bench/preemption_agreement.py``), else a ``comm.all_gather`` of the flag. A signal seen after a
worker's forward pass of iteration ``i`` is agreed at ``i + 1``, whose end, after all its hooks, is
the boundary. Not during the last iteration (the run completes), nor outside ``train``, nor in a
process forked during it (a DataLoader worker, panopticapi's pool): the default action holds there.
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
        # a process forked while the handler was set (a DataLoader worker, panopticapi's PQ pool): the
        # default action, else the SIGTERM its parent ends it with is only recorded and the parent waits
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
    """The hook of the module docstring, registered last (after the checkpointer, the evaluation and
    the writers). Once it has stopped training the signals stay ignored (not handled: Python restores
    the default action of handled ones at shutdown), so that a worker which torchrun or
    ``torch.multiprocessing`` sends SIGTERM when another exits still finishes its own exit with 75."""

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
