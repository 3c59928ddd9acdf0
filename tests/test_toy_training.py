"""The toy SGR models learn in float32, and bfloat16 training steps follow float32's.

``tools/amp_runs.py``'s routines, one after the other in this process, on one thread (worker
processes would each pay the imports again; pytest-xdist already runs one test process per core):

* ``train_evaluate`` (train, evaluate on ``sgr_toy_sem_seg_val``),
  float32: Dilated-FCN R-18 + SGR for 60 iterations (34.7 mIoU here; 25.2 after 50 and 24.3
  after 30, each a run of its own), far above the majority class (7.3). That onnxruntime
  segments as PyTorch does is tests/test_deploy.py's (every toy meta-architecture, this one
  included, output by output); MaskFormer's and Mask2Former's learning is ``make demo``'s;
* ``train_steps`` from the Dilated-FCN run's final weights: 3 iterations (batch 2, 64 px crops)
  in bfloat16 autocast and in float32 with the same images, augmentation and dropout. The total
  loss of every step and the parameter update of bfloat16 are within the tolerance of
  ``amp_runs.py`` (measured by bench/amp_steps.py, docs/benchmarks.md) of float32's; float32
  steps on other images are not, so the tolerance tells a run on the same data from another.
  (Whole schedules in both precisions are bench/amp_toy.py's table in docs/deploy.md: bfloat16
  is slow on a CPU without bfloat16 instructions, ~30 times float32 for a dilated convolution.)
"""
import math
import os
import sys

import pytest
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
from amp_runs import (DIL_FCN_SGR, OTHER_SEED, STEP_LOSS_REL_TOL, STEP_UPDATE_MAX_DIST, STEP_UPDATE_MIN_COS,  # noqa: E402
                      step_differences, train_evaluate, train_steps)
from demo_toy import majority_class_miou  # noqa: E402

ITERS = 60  # float32 training iterations of the Dilated-FCN run (the steps start from its weights)
SEED = 42  # the steps' images, augmentation and dropout (the toy config's SEED)


@pytest.mark.slow
def test_toy_models_learn_and_bf16_training_steps_follow_float32(tmp_path, one_thread):
    run = train_evaluate(DIL_FCN_SGR, False, ITERS, str(tmp_path / "dil_fcn"))
    start = str(tmp_path / "dil_fcn" / "model_final.pth")
    steps = {name: train_steps(DIL_FCN_SGR, start, amp, str(tmp_path / name), seed)
             for name, amp, seed in (("bf16", True, SEED), ("fp32", False, SEED), ("other", False, SEED + OTHER_SEED))}
    chance = majority_class_miou("sgr_toy_sem_seg_train", "sgr_toy_sem_seg_val", 6)
    print(f"\ndil_fcn: mIoU {run['miou']:.2f} ({run['seconds']:.0f} s); majority class {chance:.2f}")
    assert run["losses"] and all(len(v) == ITERS and all(map(math.isfinite, v)) for v in run["losses"].values())
    assert run["miou"] > 3 * chance, (run["miou"], chance)  # it learned

    for name, r in steps.items():
        assert all(len(v) == 3 and all(map(math.isfinite, v)) for v in r["losses"].values()), name
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
