"""Worker processes stop when the process that launched them dies (docs/reliability.md §4).

``train_net.py --num-gpus N`` runs ``run`` in N processes that a launcher started
(detectron2's ``launch`` or ``sgr_d2.compat.launch``, both through ``torch.multiprocessing``).
If the launcher is killed (SIGKILL, an OOM kill, a lost SSH session), nothing tells them, and
they keep training and writing checkpoints into the same folder. :func:`stop_with_launcher`,
called first thing in each worker, makes them exit with it.

:func:`run_then_release` is what ``sgr_d2.compat.launch`` runs in each worker: the main function,
then :func:`release_process_groups`, so that a worker whose main function returned exits cleanly
instead of aborting in the interpreter's shutdown.
"""
from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import sys
import threading

__all__ = ["release_process_groups", "run_then_release", "stop_with_launcher"]

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


def release_process_groups() -> bool:
    """Destroy every process group and let their gloo threads end while Python is still alive.

    A gloo process group keeps worker threads, and each of them drops its last finished
    collective a moment after the collective returns. If the process is already shutting down
    the interpreter then, dropping the collective's tensors needs the GIL, which a thread can
    no longer take during shutdown: the worker dies of SIGABRT ("terminate called without an
    active exception") after its work is done, and the launcher reports it as failed (torch
    2.14; ``bench/worker_exit.py`` counts how often). ``destroy_process_group`` alone does not
    end those threads while detectron2 still holds the groups (``comm._LOCAL_PROCESS_GROUP`` and
    the cached global gloo group) or a reference cycle does (a finished trainer's DDP model), so
    this drops those handles too and collects garbage: the groups' destructors then join their
    threads here, with the GIL released. Returns False, doing nothing, when no process group is
    initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.destroy_process_group()
    from detectron2.utils import comm

    comm._LOCAL_PROCESS_GROUP = None
    for cached in ("_get_global_gloo_group", "create_local_process_group"):
        clear = getattr(getattr(comm, cached, None), "cache_clear", None)
        if clear is not None:
            clear()
    gc.collect()
    return True


def run_then_release(main_func, *args):
    """``main_func(*args)``, then, once it has returned, :func:`release_process_groups`.

    Not when it raises: a failing worker may leave a collective in flight (DDP's gradient
    all-reduce), which joining the group's threads would wait for until the collective timeout,
    while the launcher should learn of the failure at once; it reports the worker's own error
    (written before the process exits) even if an abort follows."""
    result = main_func(*args)
    release_process_groups()
    return result
