#!/usr/bin/env python
"""float32 vs bfloat16 autocast training of a toy SGR model, the rows of docs/deploy.md's table.

    python bench/amp_toy.py --model dil_fcn --iters 300 --seed 43
    python bench/amp_toy.py --model mask2former --iters 60 --seed 42

Runs ``tools/amp_runs.py::train_evaluate_export`` (``train_evaluate``, the routine
``tests/test_toy_training.py`` trains its float32 model with, then the ONNX export) twice, side by side in two processes of one thread each: same
seed, weights and data order, float32 and bfloat16 autocast; prints one JSON line with both
mIoUs (and the onnxruntime mIoU of each trained model). ``--seed`` and ``--iters`` override the
config's ``SEED`` (42) and ``SOLVER.MAX_ITER`` (300). Whole schedules in bfloat16 take hours on a
CPU without bfloat16 instructions; the test compares a few steps instead (bench/amp_steps.py).
"""
import argparse
import json
import multiprocessing
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))  # amp_runs.py

from amp_runs import DIL_FCN_SGR, MASK2FORMER_SGR, train_evaluate_export  # noqa: E402


def _run(model, amp, iters, seed, out):
    config = {"dil_fcn": DIL_FCN_SGR, "mask2former": MASK2FORMER_SGR}[model]
    return train_evaluate_export(config, amp, iters, out, seed=seed)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("dil_fcn", "mask2former"), default="dil_fcn")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output", default=None, help="folder of the two runs (default: a temporary one)")
    args = p.parse_args()
    if args.output:
        return _compare(args, args.output)
    with tempfile.TemporaryDirectory(prefix="sgr_d2_amp_toy_") as out:  # checkpoints and .onnx go with it
        return _compare(args, out)


def _compare(args, out):
    import sgr_d2  # noqa: F401  (compat shims before any detectron2 import)
    from detectron2.data import DatasetCatalog

    for split in ("train", "val"):  # generate the toy data once, before the workers read it
        DatasetCatalog.get(f"sgr_toy_sem_seg_{split}")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {amp: pool.submit(_run, args.model, amp, args.iters, args.seed, os.path.join(out, f"amp_{amp}"))
                for amp in (False, True)}
        runs = {amp: job.result() for amp, job in jobs.items()}
    print(json.dumps({"model": args.model, "iters": args.iters, "seed": args.seed, "float32": runs[False]["miou"],
                      "bfloat16": runs[True]["miou"],
                      "onnxruntime": [runs[False]["onnx_miou"], runs[True]["onnx_miou"]]}))


if __name__ == "__main__":
    main()
