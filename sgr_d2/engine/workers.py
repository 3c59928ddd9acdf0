"""Worker processes stop when the process that launched them dies (docs/reliability.md §4).

``train_net.py --num-gpus N`` runs ``run`` in N processes that a launcher started
(detectron2's ``launch`` or ``sgr_d2.compat.launch``, both through ``torch.multiprocessing``).
If the launcher is killed (SIGKILL, an OOM kill, a lost SSH session), nothing tells them, and
they keep training and writing checkpoints into the same folder. :func:`stop_with_launcher`,
called first thing in each worker, makes them exit with it.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading

__all__ = ["stop_with_launcher"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_started = False


def _exit_now(launcher_pid: int) -> None:
    try:
        sys.stderr.write(f"sgr_d2 worker {os.getpid()}: its launcher (pid {launcher_pid}) is gone; exiting\n")
        sys.stderr.flush()
    finally:
        os._exit(1)


def _watch(launcher_pid: int, period_s: float) -> None:
    stop = threading.Event()
    while not stop.wait(period_s):
        if os.getppid() != launcher_pid:
            _exit_now(launcher_pid)


def stop_with_launcher(period_s: float = 1.0) -> bool:
    """In a process started by ``multiprocessing`` (a training worker): exit as soon as the
    parent dies. On Linux the kernel sends SIGKILL (``prctl(PR_SET_PDEATHSIG)``); everywhere, a
    daemon thread checks the parent's pid every ``period_s`` seconds. Returns False, doing
    nothing, in a process that no ``multiprocessing`` parent started (a one-process run, whose
    parent is the user's shell)."""
    global _started
    parent = multiprocessing.parent_process()
    if parent is None:
        return False
    if _started:
        return True
    launcher_pid = parent.pid
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the thread below still works
            pass
    if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
        _exit_now(launcher_pid)
    threading.Thread(target=_watch, args=(launcher_pid, period_s), daemon=True,
                     name="sgr_d2-launcher-watch").start()
    _started = True
    return True
