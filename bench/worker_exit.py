#!/usr/bin/env python
"""How often two gloo workers abort at exit, with and without releasing their process groups.

    python bench/worker_exit.py --runs 100

Each run starts two CPU workers the way ``sgr_d2.engine.workers.launch`` does on a machine
without CUDA (``workers._cpu_worker``: a gloo group, detectron2's local group), whose main
function does three collectives (detectron2's ``all_gather`` of a dict, an all-reduce, an
``all_gather`` of None) and returns at once. The two arms differ only in what runs in the worker:
the main function alone, or the main function through ``sgr_d2.engine.workers.run_then_release``
(what ``workers.launch`` runs). A run fails when a worker exits non-zero (the abort is SIGABRT,
"terminate called without an active exception", in the interpreter's shutdown). The arms
alternate run by run, so both see the same machine load. Prints a table.
"""
import argparse
import functools
import os
import sys
import tempfile
import time
from datetime import timedelta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _collectives_then_return():
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    torch.set_num_threads(1)
    comm.all_gather({"rank": comm.get_rank(), "payload": [1.0] * 100})
    t = torch.ones(1)
    dist.all_reduce(t)
    comm.all_gather(None)


def _one_run(main_func, timeout_s: float) -> str:
    """'' when both workers exit cleanly, else the launcher's error."""
    import torch.multiprocessing as mp

    from sgr_d2.engine import workers

    with tempfile.TemporaryDirectory() as d:
        try:
            mp.start_processes(workers._cpu_worker, nprocs=2, daemon=False,
                               args=(main_func, 2, 2, 0, f"file://{d}/init", (),
                                     timedelta(seconds=timeout_s)))
        except Exception as e:  # noqa: BLE001  (ProcessExitedException / ProcessRaisedException)
            return f"{type(e).__name__}: {e}"
    return ""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=100, help="runs of each arm")
    p.add_argument("--timeout", type=float, default=60.0, help="collective timeout, seconds")
    args = p.parse_args()

    from sgr_d2.engine.workers import run_then_release

    arms = {
        "main function only": _collectives_then_return,
        "then run_then_release (workers.launch)": functools.partial(run_then_release, _collectives_then_return),
    }
    failed = {name: [] for name in arms}
    start = time.time()
    for i in range(args.runs):
        for name, fn in arms.items():
            err = _one_run(fn, args.timeout)
            if err:
                failed[name].append(err)
                print(f"run {i}, {name}: {err}", file=sys.stderr, flush=True)
    minutes = (time.time() - start) / 60
    print(f"\n{args.runs} runs of each arm, {minutes:.1f} min\n")
    print("| Worker runs | Runs | Failed | Failure messages |")
    print("|---|---:|---:|---|")
    for name, errors in failed.items():
        kinds = sorted({e.rsplit("terminated with ", 1)[-1] for e in errors})  # "signal SIGABRT"
        print(f"| {name} | {args.runs} | {len(errors)} | {'; '.join(kinds) or '-'} |")


if __name__ == "__main__":
    main()
