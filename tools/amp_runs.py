"""float32 against bfloat16 autocast on the toy SGR models: the routines that ``tests/test_amp.py``
and ``tests/test_toy_training.py`` assert on and ``bench/amp_toy.py`` / ``bench/amp_loss_spread.py``
tabulate (a module, not a script: the tests and the benches import it, with ``tools/`` on
``sys.path``).

* :func:`float32_and_bf16_losses` — one training forward of a batch in both precisions, and the
  tolerance (:data:`REL_TOL`, :data:`ABS_TOL`) within which the test wants the SGR terms;
* :func:`train_evaluate` — a toy run on one thread: train, evaluate (tests/test_toy_training.py);
  :func:`train_evaluate_export` also exports it to ONNX and evaluates that with onnxruntime;
* :func:`train_steps` and :func:`step_differences` — a few training steps from given weights, in
  float32 or bfloat16, and how far two such runs are apart (their losses and parameter updates).
"""
from __future__ import annotations

import copy
import os
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "configs", "toy")
DIL_FCN_SGR = os.path.join(TOY, "dil_fcn_r18_sgr.yaml")
MASK2FORMER_SGR = os.path.join(TOY, "mask2former_r18_sgr.yaml")
SGR_KEYS = ("loss_sgr_union", "loss_sgr_cls", "loss_sgr_div")

# The batch is seeded (sgr_d2.predict.training_batch), so it does not follow the RNG state left
# by earlier tests. Over 20 augmented batches (bench/amp_loss_spread.py, docs/benchmarks.md) the
# largest differences were 0.5% (union), 1.6% (class) and 6.3% = 1.3e-3 (diversity, a term
# ~0.02): 0.66 of the tolerance; the seed-0 batch uses at most 0.32 of it.
REL_TOL, ABS_TOL = 0.05, 2e-3

# A few training steps from the same weights in both precisions (tests/test_toy_training.py,
# bench/amp_steps.py): 3 iterations of 2 images cropped to 64 px, so that the bfloat16 steps stay
# cheap on a CPU without bfloat16 instructions (there a dilated convolution takes ~30 times
# float32's time). What the test requires of the bfloat16 run against the float32 one, from
# bench/amp_steps.py (docs/benchmarks.md): over 8 batch seeds from the test's starting weights,
# bfloat16 differed from float32 by at most 1.6% in the total loss of a step, and its update had
# a cosine of 0.945-0.984 and a relative distance of 0.18-0.33 to float32's; float32 on other
# batches differs by 13-127% in the loss, cosine <= 0.29, distance >= 1.2.
STEP_OPTS = ("SOLVER.IMS_PER_BATCH", "2", "INPUT.CROP.SIZE", "(64, 64)", "SOLVER.MAX_ITER", "3")
STEP_LOSS_REL_TOL = 0.05  # the total loss of every step within 5% of float32's,
STEP_UPDATE_MIN_COS = 0.8  # the parameter update (after - before) of cosine >= 0.8 with float32's
STEP_UPDATE_MAX_DIST = 0.6  # and |u_bf16 - u_fp32| <= 0.6 |u_fp32| (a scaled update has cosine 1)
OTHER_SEED = 1000  # added to the seed: float32 steps on other images (the control)


def float32_and_bf16_losses(model, batch):
    """The loss dicts of one training forward of ``batch`` in float32 and under bfloat16
    autocast, each on its own copy of ``model`` (BatchNorm's running statistics move with each
    forward) with the same random draws (torch seed 1)."""
    import torch

    ref_model, low_model = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(1)
    ref = ref_model(batch)
    torch.manual_seed(1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = low_model(batch)
    return ref, got


def train_evaluate(config: str, amp: bool, iters: int, out: str, seed: Optional[int] = None) -> dict:
    """One toy run on one thread (a worker process, or the caller's: the thread count is left at
    1): train ``config`` for ``iters`` iterations (``SOLVER.AMP.ENABLED amp``; ``seed``: the
    config's ``SEED`` overridden) and evaluate it. Returns ``{"miou", "losses", "seconds"}``."""
    return _train_evaluate(config, amp, iters, out, seed)[0]


def train_evaluate_export(config: str, amp: bool, iters: int, out: str, seed: Optional[int] = None) -> dict:
    """:func:`train_evaluate`, then the trained model exported to ONNX and evaluated with
    onnxruntime: ``{"miou", "onnx_miou", "losses", "seconds"}``."""
    import sgr_d2  # noqa: F401  (compat shims before any detectron2 import)
    import torch

    from detectron2.evaluation import inference_on_dataset

    from sgr_d2.engine import Trainer
    from sgr_d2.export import export_onnx, onnxruntime_session, run_onnxruntime

    run, cfg, model = _train_evaluate(config, amp, iters, out, seed)
    val = "sgr_toy_sem_seg_val"
    path = os.path.join(out, "model.onnx")
    size = cfg.INPUT.MIN_SIZE_TEST  # the toy scenes are 128x128: the test mapper keeps them as they are
    export_onnx(model, path, size, size)
    session = onnxruntime_session(path, num_threads=1)

    def onnx_model(inputs):
        return [{"sem_seg": torch.from_numpy(run_onnxruntime(session, x["image"].float()[None].numpy())["sem_seg"][0])}
                for x in inputs]

    onnx_miou = inference_on_dataset(onnx_model, Trainer.build_test_loader(cfg, val),
                                     Trainer.build_evaluator(cfg, val, os.path.join(out, "eval_onnx")))["sem_seg"]["mIoU"]
    return {**run, "onnx_miou": onnx_miou}


def _train_evaluate(config, amp, iters, out, seed):
    """:func:`train_evaluate`'s figures, its config and its trained model (eval mode)."""
    import sgr_d2  # noqa: F401  (compat shims before any detectron2 import)
    import torch

    torch.set_num_threads(1)
    from detectron2.evaluation import inference_on_dataset
    from detectron2.utils.env import seed_all_rng

    from sgr_d2.config import load_config
    from sgr_d2.engine import Trainer

    opts = ["MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", str(amp), "SOLVER.MAX_ITER", str(iters),
            "OUTPUT_DIR", out, "SOLVER.CHECKPOINT_PERIOD", "100000", "DATALOADER.NUM_WORKERS", "0",
            "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"]
    if seed is not None:
        opts += ["SEED", str(seed)]
    cfg = load_config(config, opts)
    cfg.freeze()
    seed_all_rng(cfg.SEED)  # the same initial weights and data order in both precisions
    t0 = time.time()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    seconds = time.time() - t0
    losses = {k: [v for v, _ in h.values()] for k, h in trainer.storage.histories().items() if k.startswith("loss")}
    val = "sgr_toy_sem_seg_val"
    model = trainer.model.eval()
    miou = inference_on_dataset(model, Trainer.build_test_loader(cfg, val),
                                Trainer.build_evaluator(cfg, val, os.path.join(out, "eval")))["sem_seg"]["mIoU"]
    return {"miou": miou, "losses": losses, "seconds": seconds}, cfg, model


def train_steps(config: str, weights: str, amp: bool, out: str, seed: int, opts=STEP_OPTS) -> dict:
    """Train ``config`` from ``weights`` (a fresh optimizer and LR schedule) for the iterations of
    ``opts`` (default :data:`STEP_OPTS`), ``SOLVER.AMP.ENABLED amp``, ``SEED seed`` (which draws
    the images, their augmentation and the dropout), on one thread. Returns ``{"losses": {term:
    [value per iteration]}, "update": {parameter: after - before}, "seconds"}``."""
    import sgr_d2  # noqa: F401  (compat shims before any detectron2 import)
    import torch

    torch.set_num_threads(1)
    from detectron2.utils.env import seed_all_rng

    from sgr_d2.config import load_config
    from sgr_d2.engine import Trainer

    cfg = load_config(config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", weights, "SOLVER.AMP.ENABLED", str(amp),
                               "OUTPUT_DIR", out, "SOLVER.CHECKPOINT_PERIOD", "100000", "DATALOADER.NUM_WORKERS", "0",
                               "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "SEED", str(seed), *opts])
    cfg.freeze()
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    losses = {k: [v for v, _ in h.values()] for k, h in trainer.storage.histories().items() if k.startswith("loss")}
    update = {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}
    return {"losses": losses, "update": update, "seconds": seconds}


def step_differences(ref: dict, got: dict) -> dict:
    """How far the :func:`train_steps` run ``got`` is from ``ref``: ``total_rel``, the largest
    relative difference of the total loss at any iteration; ``term_rel``, the largest relative
    difference of one loss term at any iteration (``term``, ``term_abs``: which, and by how much);
    and the cosine similarity (``update_cos``) and relative distance ``|u_got - u_ref| / |u_ref|``
    (``update_dist``) of their parameter updates, all parameters as one vector."""
    import torch

    keys = sorted(ref["losses"])
    totals = [(sum(a), sum(b)) for a, b in zip(zip(*(ref["losses"][k] for k in keys)),
                                                zip(*(got["losses"][k] for k in keys)), strict=True)]
    worst = (0.0, 0.0, None)
    for k in keys:
        for a, b in zip(ref["losses"][k], got["losses"][k], strict=True):
            rel = abs(a - b) / abs(a) if a else abs(b)
            worst = max(worst, (rel, abs(a - b), k), key=lambda w: w[0])
    names = sorted(ref["update"])
    u = torch.cat([ref["update"][n].flatten().double() for n in names])
    v = torch.cat([got["update"][n].flatten().double() for n in names])
    return {"total_rel": max(abs(a - b) / abs(a) for a, b in totals), "term_rel": worst[0], "term_abs": worst[1],
            "term": worst[2], "update_cos": float(u @ v / (u.norm() * v.norm())),
            "update_dist": float((v - u).norm() / u.norm())}
