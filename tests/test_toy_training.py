"""The toy SGR models learn, and training in bfloat16 ends where float32 does.

Four runs of ``tools/amp_runs.py::train_evaluate_export`` (train on one thread, evaluate on
``sgr_toy_sem_seg_val``, export to ONNX and evaluate that with onnxruntime), two at a time in two
worker processes, the two long ones first:

* Dilated-FCN R-18 + SGR for its config's whole schedule (300 iterations, SEED 42), in float32
  and under bfloat16 autocast (same seed, weights and data order): both far above the majority
  class, and their mIoUs within 3 of each other (docs/deploy.md: 59.2 / 58.7, float32 /
  bfloat16; early in a schedule the two differ by as much as two seeds do);
* MaskFormer R-18 + SGR and Mask2Former R-18 + SGR, 40 iterations each, float32: far above the
  majority class (30 iterations reached 30.6 and 30.7 mIoU; the majority class gives 7.3).
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
from amp_runs import DIL_FCN_SGR, TOY, train_evaluate_export  # noqa: E402
from demo_toy import majority_class_miou  # noqa: E402

RUNS = {  # name: (config, bfloat16, iterations)
    "dil_fcn_fp32": (DIL_FCN_SGR, False, 300),
    "dil_fcn_bf16": (DIL_FCN_SGR, True, 300),
    "mask2former": (os.path.join(TOY, "mask2former_r18_sgr.yaml"), False, 40),
    "maskformer": (os.path.join(TOY, "maskformer_r18_sgr.yaml"), False, 40),
}


@pytest.mark.slow
def test_toy_models_learn_and_bf16_training_ends_where_float32_does(tmp_path):
    for split in ("train", "val"):  # generate the toy data once, before the workers read it
        DatasetCatalog.get(f"sgr_toy_sem_seg_{split}")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {name: pool.submit(train_evaluate_export, config, amp, iters, str(tmp_path / name))
                for name, (config, amp, iters) in RUNS.items()}
        runs = {name: job.result() for name, job in jobs.items()}
    chance = majority_class_miou("sgr_toy_sem_seg_train", "sgr_toy_sem_seg_val", 6)
    print("\n" + ", ".join(f"{n}: mIoU {r['miou']:.2f} ({r['seconds']:.0f} s)" for n, r in runs.items())
          + f"; majority class {chance:.2f}")
    for name, run in runs.items():
        iters = RUNS[name][2]
        assert run["losses"] and all(len(v) == iters and all(map(math.isfinite, v)) for v in run["losses"].values())
        assert run["miou"] > 3 * chance, (name, run["miou"], chance)  # it learned
        assert abs(run["onnx_miou"] - run["miou"]) <= 0.1, (name, run)  # the exported model segments as PyTorch
    fp32, bf16 = runs["dil_fcn_fp32"], runs["dil_fcn_bf16"]
    assert abs(bf16["miou"] - fp32["miou"]) <= 3.0, (fp32["miou"], bf16["miou"])
    # the bfloat16 run really differed (autocast was on): its losses are not float32's
    assert bf16["losses"]["loss_sgr_union"] != fp32["losses"]["loss_sgr_union"]
