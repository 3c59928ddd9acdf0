"""The toy SGR models learn in float32, and bfloat16 training steps follow float32's.

``tools/amp_runs.py``'s routines, two at a time in two worker processes of one thread each:

* ``train_evaluate_export`` (train, evaluate on ``sgr_toy_sem_seg_val``, export to ONNX and
  evaluate that with onnxruntime), float32: Dilated-FCN R-18 + SGR for 60 iterations (34.7 mIoU
  here), far above the majority class (7.3), and the exported model segments as PyTorch does
  (MaskFormer's and Mask2Former's learning is ``make demo``'s, their export
  tests/test_deploy.py's);
* ``train_steps`` from the Dilated-FCN run's final weights: 3 iterations (batch 2, 64 px crops)
  in bfloat16 autocast and in float32 with the same images, augmentation and dropout. The total
  loss of every step and the parameter update of bfloat16 are within the tolerance of
  ``amp_runs.py`` (measured by bench/amp_steps.py, docs/benchmarks.md) of float32's; float32
  steps on other images are not, so the tolerance tells a run on the same data from another.
  (Whole schedules in both precisions are bench/amp_toy.py's table in docs/deploy.md: bfloat16
  is slow on a CPU without bfloat16 instructions, ~30 times float32 for a dilated convolution.)
"""
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
from conftest import REPO

from detectron2.data import DatasetCatalog

sys.path.insert(0, os.path.join(REPO, "tools"))
from amp_runs import (DIL_FCN_SGR, OTHER_SEED, STEP_LOSS_REL_TOL, STEP_UPDATE_MAX_DIST, STEP_UPDATE_MIN_COS,  # noqa: E402
                      step_differences, train_evaluate_export, train_steps)
from demo_toy import majority_class_miou  # noqa: E402

RUNS = {"dil_fcn": (DIL_FCN_SGR, 60)}  # name: (config, iterations), float32
SEED = 42  # the steps' images, augmentation and dropout (the toy config's SEED)


@pytest.mark.slow
def test_toy_models_learn_and_bf16_training_steps_follow_float32(tmp_path):
    for split in ("train", "val"):  # generate the toy data once, before the workers read it
        DatasetCatalog.get(f"sgr_toy_sem_seg_{split}")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {name: pool.submit(train_evaluate_export, config, False, iters, str(tmp_path / name))
                for name, (config, iters) in RUNS.items()}
        runs = {"dil_fcn": jobs["dil_fcn"].result()}
        start = str(tmp_path / "dil_fcn" / "model_final.pth")
        steps = {name: pool.submit(train_steps, DIL_FCN_SGR, start, amp, str(tmp_path / name), seed)
                 for name, amp, seed in (("bf16", True, SEED), ("fp32", False, SEED), ("other", False, SEED + OTHER_SEED))}
        runs.update({name: job.result() for name, job in jobs.items()})
        steps = {name: job.result() for name, job in steps.items()}
    chance = majority_class_miou("sgr_toy_sem_seg_train", "sgr_toy_sem_seg_val", 6)
    print("\n" + ", ".join(f"{n}: mIoU {r['miou']:.2f} ({r['seconds']:.0f} s)" for n, r in runs.items())
          + f"; majority class {chance:.2f}")
    for name, run in runs.items():
        iters = RUNS[name][1]
        assert run["losses"] and all(len(v) == iters and all(map(math.isfinite, v)) for v in run["losses"].values())
        assert run["miou"] > 3 * chance, (name, run["miou"], chance)  # it learned
        assert abs(run["onnx_miou"] - run["miou"]) <= 0.1, (name, run)  # the exported model segments as PyTorch

    for name, run in steps.items():
        assert all(len(v) == 3 and all(map(math.isfinite, v)) for v in run["losses"].values()), name
    same = step_differences(steps["fp32"], steps["bf16"])
    other = step_differences(steps["fp32"], steps["other"])
    print(f"bfloat16 steps: {same}; float32 on other images: {other}; "
          f"{steps['bf16']['seconds']:.0f} s / {steps['fp32']['seconds']:.0f} s")
    # bug caught: autocast never entered (identical losses), or bfloat16 forward/backward broken
    assert steps["bf16"]["losses"]["loss_sgr_union"] != steps["fp32"]["losses"]["loss_sgr_union"]
    assert same["total_rel"] <= STEP_LOSS_REL_TOL, same
    assert same["update_cos"] >= STEP_UPDATE_MIN_COS and same["update_dist"] <= STEP_UPDATE_MAX_DIST, same
    # the tolerance is tight enough to tell other data apart (bug caught: a comparison that ignores the update)
    assert other["total_rel"] > STEP_LOSS_REL_TOL and other["update_cos"] < STEP_UPDATE_MIN_COS, other
    assert other["update_dist"] > STEP_UPDATE_MAX_DIST, other
