"""The launcher of worker processes, and what makes them end cleanly (docs/reliability.md §4).

:func:`launch` is what ``train_net.py --num-gpus N`` starts its N workers with: detectron2's
``launch``, except on a machine without CUDA with detectron2 v0.6, whose launcher asserts CUDA
(``sgr_d2.compat``, shim 4: :func:`~sgr_d2.compat.launch_needs_cuda`); there it starts the
workers itself, through ``torch.multiprocessing``, in a gloo process group.

If the launcher is killed (SIGKILL, an OOM kill, a lost SSH session), nothing tells the workers,
and they keep training and writing checkpoints into the same folder. :func:`stop_with_launcher`,
called first thing in each worker, makes them exit with it.

:func:`run_then_release` is what :func:`launch` runs in each worker: the main function, then
:func:`release_process_groups`, so that a worker whose main function returned exits cleanly
instead of aborting in the interpreter's shutdown.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import multiprocessing
import os
import signal
import sys
import threading
from datetime import timedelta

from .. import compat

__all__ = ["launch", "release_process_groups", "run_then_release", "stop_with_launcher"]

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


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=(),
           timeout=timedelta(minutes=30)):
    """detectron2's ``launch`` (same arguments), with each worker's ``main_func`` run through
    :func:`run_then_release`; on a machine without CUDA whose detectron2 launcher needs it
    (v0.6), the workers are started here and join a gloo group (:func:`_cpu_worker`)."""
    import torch
    from detectron2.engine import launch as d2_launch

    world_size = num_machines * num_gpus_per_machine
    if world_size > 1:  # each worker destroys its process groups before exiting
        main_func = functools.partial(run_then_release, main_func)
    if world_size <= 1 or torch.cuda.is_available() or not compat.launch_needs_cuda():
        return d2_launch(main_func, num_gpus_per_machine, num_machines=num_machines,
                         machine_rank=machine_rank, dist_url=dist_url, args=args, timeout=timeout)
    import torch.multiprocessing as mp

    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url=auto is not supported for several machines")
        from detectron2.engine.launch import _find_free_port

        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.start_processes(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args,
                timeout):
    """One worker of :func:`launch` on the CPU: a gloo process group of ``world_size`` and
    detectron2's local group of this machine's workers, then ``main_func(*args)``."""
    import torch.distributed as dist
    from detectron2.utils import comm

    compat.apply()
    global_rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=global_rank,
                            timeout=timeout)
    num_machines = world_size // num_per_machine
    for i in range(num_machines):
        ranks = list(range(i * num_per_machine, (i + 1) * num_per_machine))
        group = dist.new_group(ranks)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    main_func(*args)
