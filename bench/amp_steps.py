#!/usr/bin/env python
"""bfloat16 training steps against float32 ones from the same weights: the tolerance of
``tests/test_toy_training.py``'s step check, measured.

    python bench/amp_steps.py --seeds 8

Trains the test's starting point (``configs/toy/dil_fcn_r18_sgr.yaml`` in float32 for
``--start-iters`` iterations, default 60 as the test; or ``--weights FILE``), then for each batch
seed runs ``tools/amp_runs.py::train_steps`` from those weights three times: float32 and
bfloat16 autocast with that seed (the same images, augmentation and dropout), and float32 with
another seed (other images: the control). Prints one row per seed (``step_differences``: the
largest relative difference of the total loss and of one loss term at any step, the cosine
similarity and relative distance of the parameter updates) and the extremes, against the test's
tolerance (``STEP_LOSS_REL_TOL``, ``STEP_UPDATE_MIN_COS``, ``STEP_UPDATE_MAX_DIST``). Two
processes of one thread each.
"""
import argparse
import multiprocessing
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))  # amp_runs.py

from amp_runs import (DIL_FCN_SGR, OTHER_SEED, STEP_LOSS_REL_TOL, STEP_OPTS, STEP_UPDATE_MAX_DIST,  # noqa: E402
                      STEP_UPDATE_MIN_COS, step_differences, train_evaluate, train_steps)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=8, help="batch seeds 42, 43, ... (42: the test's)")
    p.add_argument("--start-iters", type=int, default=60)
    p.add_argument("--weights", help="start from this checkpoint instead of training one")
    p.add_argument("--output", default=None, help="folder of the runs (default: a temporary one)")
    args = p.parse_args()
    os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))  # the toy is generated there
    if args.output:
        return _measure(args, args.output)
    with tempfile.TemporaryDirectory(prefix="sgr_d2_amp_steps_") as out:
        return _measure(args, out)


def _measure(args, out):
    import sgr_d2  # noqa: F401  (compat shims before any detectron2 import)
    from detectron2.data import DatasetCatalog

    for split in ("train", "val"):  # generate the toy data once, before the workers read it
        DatasetCatalog.get(f"sgr_toy_sem_seg_{split}")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        weights = args.weights
        if not weights:
            start = os.path.join(out, "start")
            run = pool.submit(train_evaluate, DIL_FCN_SGR, False, args.start_iters, start).result()
            weights = os.path.join(start, "model_final.pth")
            print(f"start: {args.start_iters} float32 iterations, mIoU {run['miou']:.2f}", flush=True)
        rows = []
        for seed in range(42, 42 + args.seeds):
            jobs = {name: pool.submit(train_steps, DIL_FCN_SGR, weights, amp, os.path.join(out, f"{name}_{seed}"), s)
                    for name, amp, s in (("bf16", True, seed), ("fp32", False, seed),
                                         ("control", False, seed + OTHER_SEED))}
            runs = {name: job.result() for name, job in jobs.items()}
            rows.append((seed, step_differences(runs["fp32"], runs["bf16"]),
                         step_differences(runs["fp32"], runs["control"]), runs["bf16"]["seconds"],
                         runs["fp32"]["seconds"]))
            print(f"  seed {seed} done", flush=True)
    print(f"\n### bfloat16 vs float32 training steps ({' '.join(STEP_OPTS)}), from "
          f"{args.weights or f'{args.start_iters} float32 iterations'}\n")
    print("| batch seed | bf16: total loss, max diff | bf16: one term, max diff | bf16: update cosine "
          "| bf16: update distance | fp32 on other batches: total loss, max diff | update cosine "
          "| update distance | time bf16, fp32 (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seed, d, c, t_bf16, t_fp32 in rows:
        print(f"| {seed} | {100 * d['total_rel']:.2f}% | {100 * d['term_rel']:.1f}% = {d['term_abs']:.1e} "
              f"({d['term']}) | {d['update_cos']:.4f} | {d['update_dist']:.3f} | {100 * c['total_rel']:.1f}% "
              f"| {c['update_cos']:.3f} | {c['update_dist']:.3f} | {t_bf16:.1f}, {t_fp32:.1f} |")
    bf16, control = [r[1] for r in rows], [r[2] for r in rows]
    print(f"\nbfloat16: largest total-loss difference {100 * max(d['total_rel'] for d in bf16):.2f}% (the test "
          f"allows {100 * STEP_LOSS_REL_TOL:g}%), update cosine >= {min(d['update_cos'] for d in bf16):.4f} (the "
          f"test: >= {STEP_UPDATE_MIN_COS:g}), update distance <= {max(d['update_dist'] for d in bf16):.3f} (the "
          f"test: <= {STEP_UPDATE_MAX_DIST:g}); float32 on other batches: total-loss difference >= "
          f"{100 * min(d['total_rel'] for d in control):.1f}%, update cosine <= "
          f"{max(d['update_cos'] for d in control):.3f}, update distance >= {min(d['update_dist'] for d in control):.3f}")

if __name__ == "__main__":
    main()
