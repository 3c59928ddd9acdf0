"""Starting the workers of a run, and making them end cleanly (docs/reliability.md#4-several-workers).

:func:`launch` starts the workers: detectron2's ``launch`` (each worker's main function through
:func:`run_then_release`), or, without CUDA under detectron2 v0.6, whose launcher asserts CUDA
(:func:`sgr_d2.compat.launch_needs_cuda`), ``torch.multiprocessing`` in a gloo group. Under ``torchrun``
or ``srun`` this process is the worker and joins by torch's ``env://`` rendezvous; :func:`cluster_world`
refuses, naming the variables and arguments, every mix of launchers that would start duplicates
(docs/multi_gpu.md#launchers). :func:`stop_with_launcher` makes a worker exit with a killed launcher.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Mapping, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.engine import default_argument_parser, launch as d2_launch
from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm

from .. import compat
from .preemption import EXIT_CODE, SIGNALS, Preempted

__all__ = ["LaunchConflict", "World", "cluster_world", "expand_nodelist", "launch", "release_process_groups",
           "run_then_release", "stop_with_launcher"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_started = False


def _watch(launcher_pid: int, period_s: float) -> None:
    while os.getppid() == launcher_pid:
        time.sleep(period_s)
    try:
        print(f"sgr_d2 worker {os.getpid()}: its launcher (pid {launcher_pid}) is gone", file=sys.stderr, flush=True)
    finally:
        os._exit(1)


def stop_with_launcher(period_s: float = 1.0) -> bool:
    """In a process started by ``multiprocessing`` (a worker): exit as soon as the parent dies (on
    Linux the kernel's SIGKILL, ``prctl(PR_SET_PDEATHSIG)``; everywhere a daemon thread checking the
    parent's pid every ``period_s`` s). Elsewhere (a one-process run) False, doing nothing."""
    global _started
    parent = multiprocessing.parent_process()
    if parent is None:
        return False
    if _started:
        return True
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the thread below still works
            pass
    # its first check catches a launcher that died before prctl took effect
    threading.Thread(target=_watch, args=(parent.pid, period_s), daemon=True, name="sgr_d2-launcher-watch").start()
    _started = True
    return True


def release_process_groups() -> bool:
    """Destroy every process group and let their gloo threads end while Python is alive: one that
    drops its last collective during the interpreter's shutdown cannot take the GIL, and the worker
    aborts (SIGABRT) after its work is done (``bench/worker_exit.py``). detectron2's handles and
    reference cycles (a finished trainer's DDP model) keep groups alive, so this drops those and
    collects garbage: the groups' destructors join their threads here. False: no group initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.destroy_process_group()
    comm._LOCAL_PROCESS_GROUP = None
    for cached in ("_get_global_gloo_group", "create_local_process_group"):
        clear = getattr(getattr(comm, cached, None), "cache_clear", None)
        if clear is not None:
            clear()
    gc.collect()
    return True


def run_then_release(main_func, *args):
    """``main_func(*args)``, then :func:`release_process_groups`, also after a preemption (every
    worker has left its collectives behind a barrier), not after another error: a collective may be
    in flight (DDP's all-reduce), which joining the threads would wait for until the timeout."""
    try:
        result = main_func(*args)
    except Preempted:
        release_process_groups()
        raise
    release_process_groups()
    return result


# ----------------------------------------------------------------------------- cluster launchers
class LaunchConflict(ValueError):
    """The environment (a cluster launcher's variables) and the arguments describe different runs."""


@dataclass(frozen=True)
class World:
    """The worker this process is, as a cluster launcher started it."""

    launcher: str  # "torchrun" or "srun"
    rank: int
    size: int
    local_rank: int
    local_size: int
    master_addr: str
    master_port: int


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise LaunchConflict(f"{name}={environ[name]!r} is not an integer") from None


def expand_nodelist(nodelist: str, *, use_scontrol: bool = True) -> List[str]:
    """The host names of a SLURM node list (``"gpu[01-03,07],login1"``): ``scontrol show hostnames``
    where it is on PATH, else sgr_d2's reading of one bracket group per host name, zero-padded."""
    scontrol = shutil.which("scontrol") if use_scontrol else None
    if scontrol:
        out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=60).stdout
        return out.split()
    hosts = []
    for entry in filter(None, map(str.strip, re.split(r",(?![^\[]*\])", nodelist))):  # commas outside [..]
        m = re.fullmatch(r"([^\[\]]*)(?:\[(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)\])?([^\[\]]*)", entry)
        if not m:
            raise ValueError(f"cannot expand the SLURM host list entry {entry!r} (one [N-M,...] group per "
                             "host name is understood; put scontrol on PATH or set MASTER_ADDR)")
        prefix, ranges, suffix = m.groups()
        if ranges is None:
            hosts.append(entry)
            continue
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            hosts += [f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi or lo) + 1)]
    return hosts


def _slurm_tasks_per_node(env: Mapping[str, str], ntasks: int) -> int:
    """The tasks on each node of SLURM's list (``"4(x2),3"``: 4, 4, 3), which must be the same."""
    name = "SLURM_STEP_TASKS_PER_NODE" if "SLURM_STEP_TASKS_PER_NODE" in env else "SLURM_TASKS_PER_NODE"
    text, per_node = env.get(name, str(ntasks)), []
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LaunchConflict(f"{name}={text!r} is not a SLURM task count list such as '4(x2)' or '4,4'")
        per_node += [int(m.group(1))] * int(m.group(2) or 1)
    if len(set(per_node)) != 1 or sum(per_node) != ntasks:
        raise LaunchConflict(
            f"{name}={env.get(name)} with SLURM_NTASKS={ntasks}: sgr_d2 (as detectron2) needs the same "
            "number of tasks on every node, ranks numbered node by node; use --ntasks-per-node")
    return per_node[0]


def _d2_flags(num_gpus_per_machine, num_machines, machine_rank, dist_url) -> dict:
    """detectron2's launcher arguments that differ from its parser's defaults."""
    parser = default_argument_parser()
    given = {"--num-gpus": num_gpus_per_machine, "--num-machines": num_machines, "--machine-rank": machine_rank,
             "--dist-url": dist_url}
    return {k: v for k, v in given.items() if v not in (None, parser.get_default(k[2:].replace("-", "_")))}


def _fmt(items: Mapping) -> str:
    return ", ".join(f"{k}={v}" if k.isupper() else f"{k} {v}" for k, v in items.items())


def cluster_world(num_gpus_per_machine=1, num_machines=1, machine_rank=0, dist_url=None,
                  environ: Optional[Mapping[str, str]] = None) -> Optional[World]:
    """The :class:`World` that torchrun or srun made this process part of, or None (detectron2's
    arguments then decide); :class:`LaunchConflict` when the environment and the arguments disagree."""
    env = os.environ if environ is None else environ
    flags = _d2_flags(num_gpus_per_machine, num_machines, machine_rank, dist_url)
    torch_vars = {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE") if k in env}
    srun = "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1
    slurm = {k: env[k] for k in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID") if k in env} if srun else {}

    if torch_vars:
        missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                   if k not in env]
        if missing:
            raise LaunchConflict(
                f"{_fmt(torch_vars)} are set (a launcher such as torchrun started this process), but "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: torch's env:// rendezvous "
                "needs RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Start "
                "train_net.py with torchrun, or unset these variables and use --num-gpus.")
        world = World("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK"),
                      _int(env, "LOCAL_WORLD_SIZE"), env["MASTER_ADDR"], _int(env, "MASTER_PORT"))
        if flags:
            raise LaunchConflict(
                f"torchrun (or another launcher) started this process as worker {world.rank} of "
                f"{world.size} ({_fmt(torch_vars)}), and {_fmt(flags)} asks detectron2's launcher to "
                "start workers too: each process would start a run of its own. Leave out --num-gpus, "
                "--num-machines, --machine-rank and --dist-url under torchrun (its --nproc_per_node and "
                "--nnodes say how many workers run).")
        if srun:
            ntasks = _int(env, "SLURM_NTASKS")
            per_task = world.size == ntasks * world.local_size  # one torchrun per task, joined
            # or SLURM's variables exported as torch's, one process per task
            exported = (world.size, world.rank, world.local_size) == (ntasks, _int(env, "SLURM_PROCID"),
                                                                     _slurm_tasks_per_node(env, ntasks))
            if not (per_task or exported):
                raise LaunchConflict(
                    f"torchrun started this process inside an srun step of SLURM_NTASKS={ntasks} tasks "
                    f"({_fmt(slurm)}), but its group ({_fmt(torch_vars)}) holds only "
                    f"{world.size} workers, not the {ntasks} x {world.local_size} that the step's "
                    "torchrun agents start together: the tasks would train separate runs. Either let srun "
                    "start the workers (`srun --ntasks-per-node <GPUs> python train_net.py ...`, no "
                    "torchrun), or run one torchrun per node joined by --nnodes and --rdzv_endpoint.")
        return world

    if not srun:
        return None
    ntasks, procid, localid = (_int(env, k) for k in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"))
    if flags:
        if num_machines == ntasks and machine_rank == procid and "--dist-url" in flags:
            return None  # one task per machine; detectron2's launcher starts each machine's workers
        raise LaunchConflict(
            f"srun started this process as task {procid} of SLURM_NTASKS={ntasks} ({_fmt(slurm)}), and "
            f"{_fmt(flags)} asks detectron2's launcher to start workers too: each task would start a "
            "run of its own. Either let srun start one task per GPU and leave out --num-gpus, "
            "--num-machines, --machine-rank and --dist-url, or start one task per machine "
            "(`srun --ntasks-per-node 1`) with --num-machines $SLURM_NTASKS --machine-rank $SLURM_PROCID "
            "--dist-url tcp://<first host>:<port>.")
    local_size = _slurm_tasks_per_node(env, ntasks)
    node = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else procid // local_size
    if procid != node * local_size + localid:
        raise LaunchConflict(
            f"SLURM_PROCID={procid}, SLURM_NODEID={node} and SLURM_LOCALID={localid} with {local_size} tasks "
            "per node: the ranks are not numbered node by node (srun --distribution=block, the default, "
            "numbers them so)")
    nodelist_var = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST") if k in env), None)
    if "MASTER_ADDR" in env:
        master = env["MASTER_ADDR"]
    elif nodelist_var is None:
        raise LaunchConflict("srun started this process but neither SLURM_STEP_NODELIST nor SLURM_NODELIST "
                             "is set: set MASTER_ADDR to the host of task 0")
    else:
        master = expand_nodelist(env[nodelist_var])[0]
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000
    return World("srun", procid, ntasks, localid, local_size, master, port)


def _join(backend, init_method, world_size, rank, local_size, timeout):
    """This worker's default process group and detectron2's local group of its machine's workers,
    as detectron2's ``_distributed_worker`` creates them."""
    dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank, timeout=timeout)
    for i in range(world_size // local_size):
        group = dist.new_group(list(range(i * local_size, (i + 1) * local_size)))
        if i == rank // local_size:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()


def _run_in_world(main_func, world: World, args, timeout):
    if world.size == 1:
        return main_func(*args)
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count < world.local_size and count != 1:
            raise LaunchConflict(
                f"{world.launcher} runs {world.local_size} workers on this machine, which sees {count} GPUs "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): one GPU per worker")
        torch.cuda.set_device(world.local_rank if count > 1 else 0)
    os.environ.setdefault("MASTER_ADDR", world.master_addr)
    os.environ.setdefault("MASTER_PORT", str(world.master_port))
    _join("nccl" if torch.cuda.is_available() else "gloo", "env://", world.size, world.rank, world.local_size, timeout)
    return run_then_release(main_func, *args)


@contextlib.contextmanager
def _forwarding_signals():
    """In the launcher of spawned workers: pass the preemption signals on to the workers; a
    worker's exit code 75 becomes the launcher's."""
    def forward(signum, frame):
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in SIGNALS}
    try:
        yield
    except mp.ProcessExitedException as e:
        if e.exit_code == EXIT_CODE:
            raise SystemExit(EXIT_CODE) from e
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=(),
           timeout=timedelta(minutes=30)):
    """detectron2's ``launch`` (same arguments), as the module docstring says; under torchrun or
    srun, this process joins the launcher's group (gloo on the CPU, NCCL with CUDA)."""
    world = cluster_world(num_gpus_per_machine, num_machines, machine_rank, dist_url)
    if world is not None:
        return _run_in_world(main_func, world, args, timeout)
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        return main_func(*args)
    main_func = functools.partial(run_then_release, main_func)  # each worker destroys its groups before exiting
    with _forwarding_signals():
        if torch.cuda.is_available() or not compat.launch_needs_cuda():
            return d2_launch(main_func, num_gpus_per_machine, num_machines=num_machines,
                             machine_rank=machine_rank, dist_url=dist_url, args=args, timeout=timeout)
        if dist_url == "auto":
            if num_machines != 1:
                raise ValueError("dist_url=auto is not supported for several machines")
            dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
        mp.start_processes(_cpu_worker, nprocs=num_gpus_per_machine, daemon=False,
                           args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout))


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout):
    compat.apply()
    _join("gloo", dist_url, world_size, machine_rank * num_per_machine + local_rank, num_per_machine, timeout)
    main_func(*args)
