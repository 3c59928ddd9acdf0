"""Preemption: a signal ends training at an iteration boundary, with a checkpoint to resume from.

Clusters warn a job before they stop it: SLURM sends SIGTERM (and, with ``--signal``, SIGUSR1
or another signal some time before), submitit sends SIGUSR2 (docs/multi_gpu.md#cluster).
While ``Trainer.train`` runs, :class:`PreemptionHook` catches SIGTERM, SIGUSR1 and SIGUSR2
(:data:`SIGNALS`) in every worker and only records them; training goes on to a boundary that
every worker agrees on. There it saves one checkpoint through ``Trainer.save_checkpoint``,
exactly as the periodic ones (``model_<iteration>.pth``, atomic, tagged in ``last_checkpoint``,
with the weights, optimizer, LR schedule, data position and every worker's random states), waits
until the save is complete, and raises :class:`Preempted`, a ``SystemExit`` with
:data:`EXIT_CODE` (75, ``EX_TEMPFAIL`` of ``sysexits.h``: "temporary failure, run me again").
The same command with ``--resume`` then continues as if the run had never stopped.

**Agreement.** A signal may reach one worker only, or the workers at different moments. The
workers decide together, once per iteration, whether any of them has one: the decision must be
the same on all of them, or one would wait forever in a collective the others never join. In a
run of several workers the decision rides on the NaN guard's per-iteration object gather
(:class:`~sgr_d2.engine.hooks.NonFiniteLossGuard` gathers ``(loss not finite, preemption
requested)`` instead of one flag), so it costs no collective of its own (``bench/preemption_agreement.py``: a gather of its own
costs about 1.8 ms per iteration on two CPU workers, against 0.27 s for a small toy iteration;
carrying the flag in the guard's gather costs nothing measurable). An iteration
whose forward pass gave the guard nothing to check falls back to a ``comm.all_gather`` of the
flag. Both are detectron2's object collectives, on its gloo group (the NCCL rule,
docs/multi_gpu.md). A signal that arrives after a worker's forward pass of iteration ``i`` is
seen by all of them at iteration ``i + 1``, so the boundary is the end of that iteration, after
all its hooks: an evaluation running when the signal came finishes, its results are written to
``metrics.json`` and are not run again. In a one-process run the boundary is the end of the
iteration during which the signal came.

**What is not a boundary.** The last iteration: ``model_final.pth`` is saved there anyway; the
run goes on to its final evaluation and exits 0 (a kill during that evaluation leaves
``model_final.pth``, and ``--resume`` runs the evaluation again). Before the first iteration and
after training (building the model, loading weights, ``--eval-only``) no handler is installed:
the signal's default action ends the process, which has nothing to save. Nor do the handlers
hold in a process forked while they are set (a DataLoader worker, panopticapi's process pool):
there a signal has its default action.

**A second signal** (during the save, or after the boundary is agreed) is recorded, or ignored, and changes
nothing: the save is not interrupted, and even a SIGKILL during it leaves the previous
checkpoint and tag intact (``sgr_d2.files.atomic_write``).
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

# what a resumable stop exits with (sysexits.h EX_TEMPFAIL)
EXIT_CODE = 75
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
    """Training stopped at ``iteration`` for a preemption signal, after saving ``checkpoint``
    (``None`` on the workers that do not write): exit with :data:`EXIT_CODE` and resume."""

    def __init__(self, iteration: int, signals, checkpoint=None):
        super().__init__(EXIT_CODE)
        self.iteration = iteration
        self.signals = tuple(signals)
        self.checkpoint = checkpoint


def _names(signums) -> str:
    return ", ".join(dict.fromkeys(signal.Signals(s).name for s in signums)) or "none here"


class PreemptionHook(HookBase):
    """The hook of the module docstring; the trainer registers it last, so that its
    ``after_step`` runs after every other hook's (the checkpointer, the evaluation, the writers).

    Once it has stopped training (``stopped``), the signals are ignored until the process exits:
    when one worker exits, torchrun and ``torch.multiprocessing`` send SIGTERM to the others, which
    must still finish their own exit (log, lock, process groups) with code 75. (Ignored, not
    handled: Python puts the default action back for the signals it handles when it shuts down.)"""

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
        if not self.stopped:  # after a stop they stay: see the class docstring
            for s, previous in self._previous.items():  # (None: a handler not set from Python)
                signal.signal(s, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        t = self.trainer
        if _received and t.iter >= t.max_iter - 1:
            logger.warning("preemption signal(s) %s arrived after the last iteration had started: the run "
                           "was completed instead", _names(_received))

    def _agreed(self) -> bool:
        mine = requested()
        if comm.get_world_size() == 1:
            return mine
        guard = getattr(self.trainer, "loss_guard", None)
        if guard is not None and guard.agreed_at == self.trainer.iter:
            return guard.stop_requested
        return any(comm.all_gather(mine))

    def after_step(self):
        t = self.trainer
        if t.iter >= t.max_iter - 1 or not self._agreed():
            return
        name = f"model_{t.iter:07d}"
        if comm.get_world_size() > 1:
            t.gather_worker_rng(t.iter)
        t.save_checkpoint(name, t.iter)
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
        raise Preempted(t.iter, signals, saved)
