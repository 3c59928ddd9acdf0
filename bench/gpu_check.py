#!/usr/bin/env python
"""GPU check of sgr_d2: every ADE20K model trains under AMP, the device tests pass on CUDA, what
SGR costs Mask2Former in step time, memory and inference speed, and the real ``Trainer`` trains,
checkpoints, resumes, evaluates and stops on a NaN loss on the device. Prints Markdown tables.

    python bench/gpu_check.py                        # on a machine with one CUDA GPU
    python bench/gpu_check.py --out gpu_check.md     # also write the tables to a file
    python bench/gpu_check.py --tiny                 # CPU smoke run (CI)

(a) Training check. Each ADE20K semantic config (``configs/ade20k/*.yaml`` without the
    ``Base-*`` files; ``finetune_*`` are skipped: they only change the weights and the schedule
    of a config that is checked) is built on the device with ``SOLVER.AMP.ENABLED True`` and
    ``MODEL.WEIGHTS ""`` and trained for a few iterations on ONE synthetic batch, repeated:
    random images with rectangular label regions of the config's classes, written to a temporary
    folder, registered in detectron2's ``DatasetCatalog`` and read through sgr_d2's
    ``SemSegDatasetMapper(cfg, True)`` (``image``, ``sem_seg``, ``components`` and, for
    MaskFormer / Mask2Former, ``instances``). The step is sgr_d2's own:
    ``build_step_trainer`` (detectron2's ``AMPTrainer`` on CUDA, bfloat16 ``CPUAutocastTrainer``
    on the CPU) with ``build_optimizer``: the config's optimizer, parameter groups and
    multipliers, at ``--lr-scale`` (default 0.1) times its ``SOLVER.BASE_LR``. A config passes
    when every loss term is finite at every iteration and the loss falls over the *applied*
    updates (:func:`judge`): float16's ``GradScaler`` skips the updates whose gradients
    overflow (its first ones, while its scale comes down from 65536; seen as a drop of the
    scale), and Mask2Former's point-sampled losses and Swin's drop-path make single losses
    noisy, so the mean total loss of the last ``window`` iterations whose update was applied
    must be below that of the first ``window``. (At the full learning rate a randomly
    initialised model on one batch oscillates: sem_fpn_r50_sgr went 9.0, 7.3, 14.2, 6.4, 5.2, 8.2
    over six CPU iterations at 64x64; at 0.1x it fell at every step.)
(b) Device tests: ``pytest -m "uses_device and (slow or not slow)" --device cuda`` (the tests
    that take the ``device`` fixture of tests/conftest.py); pass / fail counts. None collected
    is a FAIL (nothing was checked).
(c) Cost of SGR: Mask2Former R-50 and Swin-T with and without SGR, 512x512, batch 4, AMP:
    median training step (``torch.cuda.synchronize`` around each step, after warm-up), peak
    ``torch.cuda.max_memory_allocated`` over the training steps (reset before each model is
    built, so weights, gradients and optimizer state count), and inference images/s of what
    ``--eval-only`` runs: detectron2's ``inference_on_dataset`` with sgr_d2's test loader and
    evaluator (``Trainer.build_test_loader`` / ``build_evaluator``) on synthetic images, batch 1,
    in float32 (evaluation never runs under autocast), after a warm-up pass.
(d) The real ``Trainer`` on the device: ``train_net.py``'s body (``sgr_d2.engine.trainer.run``:
    run files, hooks, the NaN guard, the LR schedule, atomic checkpoints) trains
    ``--trainer-config`` (default mask2former_r50_sgr, AMP) on a synthetic dataset for 2
    iterations; ``--resume`` with ``SOLVER.MAX_ITER 4`` continues at iteration 2 and ends with
    ``model_final.pth`` and the evaluation (of the training images: mIoU in ``metrics.json``);
    a third run, whose loss is made NaN at iteration 2, stops with the guard's
    ``FloatingPointError`` after saving ``model_last_good.pth`` (iteration 1) and tagging it.

``--tiny`` runs all four on the CPU, small and in float32 (the CPU's AMP, bfloat16 autocast, is
many times slower on a CPU without bfloat16 instructions; tests/test_amp.py checks it): (a) for the
two toy configs ``configs/toy/dil_fcn_r18_sgr.yaml`` and ``mask2former_r18_sgr.yaml`` (the same
code at about a tenth of the ADE20K models' parameters) at 64x64, batch 2, 3 iterations, judged on the
first and the last iteration; (b) the device tests of ``tests/test_sgr_core.py`` with ``--device
cpu``; (c) the Mask2Former R-50 pair at 64x64, batch 1, 1 timed step without warm-up and 1
evaluation image, where the memory column is the growth of the process's peak resident memory
over the model's build and steps (the CPU has no allocator statistics); (d) with the toy
dil_fcn_r18_sgr at 64x64. The exit status is 1 when any check failed, 2 without CUDA and without
``--tiny``.
"""
import argparse
import contextlib
import copy
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # experiments.py

CONFIG_DIR = REPO / "configs" / "ade20k"
BENCH_PAIRS = ["mask2former_r50", "mask2former_swin_t"]
TINY_CONFIGS = ["toy/dil_fcn_r18_sgr", "toy/mask2former_r18_sgr"]  # configs/toy: CPU-sized models
TINY_PAIRS = ["mask2former_r50"]

# what each mode runs; the command line overrides any of these
SETTINGS = {
    "gpu": dict(device="cuda", size=256, batch=2, iters=12, window=3, tests=None,
                bench_size=512, bench_batch=4, warmup=3, steps=10, infer_iters=20,
                trainer_config="mask2former_r50_sgr", trainer_size=256, amp=True),
    "tiny": dict(device="cpu", size=64, batch=2, iters=3, window=1, tests=["tests/test_sgr_core.py"],
                 bench_size=64, bench_batch=1, warmup=0, steps=1, infer_iters=1,
                 trainer_config="toy/dil_fcn_r18_sgr", trainer_size=64, amp=False),
}


# ----------------------------------------------------------------------------- configs
def config_file(name: str) -> Path:
    """``name`` as given (a path), or ``configs/ade20k/<name>[.yaml]``, or ``configs/<name>[.yaml]``
    (e.g. ``toy/dil_fcn_r18_sgr``)."""
    for candidate in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml",
                      CONFIG_DIR.parent / name, CONFIG_DIR.parent / f"{name}.yaml"):
        if candidate.is_file():
            return candidate.resolve()
    raise SystemExit(f"gpu_check: no config {name!r} (neither a file nor configs/ade20k/{name}.yaml "
                     f"nor configs/{name}.yaml)")


def ade20k_configs():
    """(the configs that (a) checks by default, the finetune configs it leaves out)."""
    files = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("Base-"))
    return ([p for p in files if not p.name.startswith("finetune_")],
            [p for p in files if p.name.startswith("finetune_")])


def precision_name(device: str, amp: bool) -> str:
    """What SOLVER.AMP.ENABLED gives on ``device``: float16 AMP on CUDA, bfloat16 autocast on the CPU."""
    return ("float16 AMP" if device.startswith("cuda") else "bfloat16 autocast") if amp else "float32"


def overrides(device: str, size: int, batch: int, dataset: str = None, amp: bool = True):
    """``KEY VALUE`` overrides: AMP on, no weights, ``size`` crops of a single scale, ``batch``
    images, the training set ``dataset`` (no test set)."""
    over = ["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "SOLVER.AMP.ENABLED", str(amp),
            "SOLVER.IMS_PER_BATCH", str(batch), "DATALOADER.NUM_WORKERS", "0",
            "INPUT.CROP.SIZE", f"({size}, {size})", "INPUT.MIN_SIZE_TRAIN", f"({size},)",
            "INPUT.MAX_SIZE_TRAIN", str(4 * size), "INPUT.MIN_SIZE_TEST", str(size),
            "INPUT.MAX_SIZE_TEST", str(4 * size)]
    if dataset:
        over += ["DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", "()"]
    return over


def make_cfg(config: Path, device: str, size: int, batch: int, dataset: str = None, opts=(), amp: bool = True):
    """The config with :func:`overrides`, then ``opts``."""
    from sgr_d2.config import load_config

    return load_config(str(config), overrides(device, size, batch, dataset, amp) + list(opts))


# ----------------------------------------------------------------------------- synthetic data
class SyntheticData:
    """Tiny datasets of random images and rectangle label maps, written under ``root`` and
    registered in detectron2's catalogs (one per image size and class count)."""

    def __init__(self, root: str):
        self.root = Path(root)
        self.names = []

    def dataset(self, size: int, count: int, num_classes: int, seed: int = 0) -> str:
        from detectron2.data import DatasetCatalog, MetadataCatalog
        from PIL import Image

        name = f"gpu_check_{size}px_{count}img_{num_classes}cls_train"
        if name in self.names:
            return name
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        dicts = []
        for i in range(count):
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            label = rectangle_label_map(rng, size, num_classes)
            img_path, sem_path = folder / f"{i:03d}.jpg", folder / f"{i:03d}.png"
            Image.fromarray(image).save(img_path, quality=95)
            Image.fromarray(label).save(sem_path)
            dicts.append({"file_name": str(img_path), "sem_seg_file_name": str(sem_path),
                          "height": size, "width": size, "image_id": i})
        DatasetCatalog.register(name, lambda dicts=dicts: copy.deepcopy(dicts))
        MetadataCatalog.get(name).set(ignore_label=255, evaluator_type="sem_seg",
                                      stuff_classes=[f"class_{c}" for c in range(num_classes)])
        self.names.append(name)
        return name

    def close(self):
        from detectron2.data import DatasetCatalog, MetadataCatalog

        for name in self.names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        self.names = []


def rectangle_label_map(rng, size: int, num_classes: int, rectangles: int = 4) -> np.ndarray:
    """A background class, ``rectangles`` rectangles of other classes (they may overlap) and a
    small unlabelled (255) square; uint8, as ADE20K's prepared label maps."""
    classes = rng.choice(num_classes, size=min(num_classes, rectangles + 1), replace=False)
    sem = np.full((size, size), classes[0], dtype=np.uint8)
    for c in classes[1:]:
        h, w = rng.integers(size // 6, size // 2, 2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        sem[y:y + h, x:x + w] = c
    side = max(2, size // 10)
    y, x = rng.integers(0, size - side, 2)
    sem[y:y + side, x:x + side] = 255
    return sem


def repeated(batch):
    """An endless data loader of copies of one batch."""
    while True:
        yield copy.deepcopy(batch)


# ----------------------------------------------------------------------------- model and step
def build_training_model(cfg):
    """detectron2's ``build_model`` (a module-level hook: the test swaps it for a broken model)."""
    from detectron2.modeling import build_model

    return build_model(cfg).train()


def build_trainer(cfg, model, batch):
    """sgr_d2's optimizer and one-step trainer over the repeated ``batch``."""
    from sgr_d2.engine import build_optimizer
    from sgr_d2.engine.amp import build_step_trainer

    return build_step_trainer(cfg, model, repeated(batch), build_optimizer(cfg, model))


def record_losses(model, into: list):
    """A forward hook appending every training forward pass's losses (floats) to ``into``."""
    def hook(module, args, output):
        if module.training and isinstance(output, dict):
            into.append({k: float(v.detach().float().sum()) for k, v in output.items()})
    return model.register_forward_hook(hook)


def sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def release(device: str):
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def judge(losses, iters: int, error: str = "", applied=None, window: int = 1):
    """(ok, note) of a training check: ``iters`` iterations recorded, every term finite at every
    iteration, and the loss falling over the applied updates. ``applied``: whether each
    iteration's update was applied (default: all; the GradScaler skips some). Of the iterations
    whose update was applied, the mean total loss of the last ``window`` must be below that of
    the first ``window`` (each loss is measured before its iteration's update, so a skipped
    update's loss repeats the next one's weights and only adds noise)."""
    for i, terms in enumerate(losses, 1):
        bad = [k for k, v in terms.items() if not math.isfinite(v)]
        if bad:
            return False, f"non-finite {', '.join(sorted(bad))} at iteration {i}"
    if error:
        return False, error
    if len(losses) < iters:
        return False, f"{len(losses)} of {iters} iterations recorded"
    if not losses or not losses[0]:
        return False, "the model returned no losses"
    applied = [True] * len(losses) if applied is None else list(applied)
    totals = [sum(t.values()) for t, a in zip(losses, applied) if a]
    if len(totals) < 2 * window:
        return False, (f"{len(totals)} of {len(losses)} updates applied (the GradScaler skipped the others); "
                       f"judging needs {2 * window}")
    first, last = statistics.fmean(totals[:window]), statistics.fmean(totals[-window:])
    if not last < first:
        if window == 1:
            return False, f"the last total loss ({last:.4g}) is not below the first ({first:.4g})"
        return False, (f"the mean total loss of the last {window} applied updates ({last:.4g}) is not below "
                       f"that of the first {window} ({first:.4g})")
    return True, ""


def train_check(config: Path, device: str, size: int, batch: int, iters: int, data: SyntheticData,
                opts=(), lr_scale: float = 1.0, window: int = 1, amp: bool = True):
    """Train ``config`` for ``iters`` iterations on one repeated synthetic batch at ``lr_scale``
    times its base learning rate (``opts`` come last), judged by :func:`judge`; a result row."""
    import torch
    from detectron2.utils.events import EventStorage

    from sgr_d2.predict import training_batch

    start = time.perf_counter()
    losses, applied, error = [], [], ""
    model = trainer = None
    try:
        plain = make_cfg(config, device, size, batch, opts=opts, amp=amp)
        lr = ["SOLVER.BASE_LR", repr(plain.SOLVER.BASE_LR * lr_scale)]
        cfg = make_cfg(config, device, size, batch,
                       data.dataset(size, batch, plain.MODEL.SEM_SEG_HEAD.NUM_CLASSES), lr + list(opts), amp)
        torch.manual_seed(0)
        model = build_training_model(cfg)
        trainer = build_trainer(cfg, model, training_batch(cfg))
        handle = record_losses(model, losses)
        scaler = getattr(trainer, "grad_scaler", None)
        try:
            with EventStorage(0) as storage:
                trainer.storage = storage
                for i in range(iters):
                    storage.iter = i
                    scale = scaler.get_scale() if scaler is not None else None
                    trainer.run_step()
                    # the GradScaler lowers its scale exactly when it found inf/NaN gradients and
                    # skipped the optimizer's step
                    applied.append(scaler is None or not scaler.get_scale() < scale)
        finally:
            handle.remove()
    except Exception as e:  # a crash, an out-of-memory or detectron2's non-finite loss error
        first_line = (str(e).strip().splitlines() or [""])[0]
        error = f"{type(e).__name__}: {first_line[:160]}"
    ok, note = judge(losses, iters, error, applied + [True] * (len(losses) - len(applied)), window)
    skipped = applied.count(False)
    if skipped:
        note = "; ".join(filter(None, [note, f"{skipped} update(s) skipped by the GradScaler"]))
    totals = [sum(t.values()) for t, a in zip(losses, applied) if a]
    del model, trainer
    release(device)
    ends = (statistics.fmean(totals[:window]), statistics.fmean(totals[-window:])) if totals else (None, None)
    return {"config": config.stem, "device": device, "iters": len(losses), "applied": len(totals),
            "first": ends[0], "last": ends[1], "ok": ok, "note": note, "seconds": time.perf_counter() - start}


def check_table(rows, size, batch, device, lr_scale, window=1, amp=True):
    precision = precision_name(device, amp)
    ends = ("first", "last") if window == 1 else (f"first {window}", f"last {window}")
    lines = [f"### (a) Training check: {size}x{size}, batch {batch}, {device}, {precision}, one repeated "
             f"synthetic batch, MODEL.WEIGHTS \"\", {lr_scale:g} x SOLVER.BASE_LR", "",
             f"Pass: every loss finite, and the mean total loss of the {ends[1]} applied updates below that "
             f"of the {ends[0]}.", "",
             f"| config | iterations | updates applied | total loss, {ends[0]} | total loss, {ends[1]} | result "
             "| time (s) | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = (lambda v: "n/a" if v is None else f"{v:.4f}")
        lines.append(f"| {r['config']} | {r['iters']} | {r['applied']} | {fmt(r['first'])} | {fmt(r['last'])} | "
                     f"{'OK' if r['ok'] else 'FAIL'} | {r['seconds']:.1f} | {r['note']} |")
    return lines


# ----------------------------------------------------------------------------- (b) device tests
def device_tests(device: str, paths, timeout: int, cwd=REPO):
    """pytest (run in ``cwd``) on the tests that take the ``device`` fixture, slow ones included,
    of ``paths`` (None: the whole suite; tiny mode: one file, whose collection is quick). A
    summary dict."""
    start = time.perf_counter()
    res = {"selection": "uses_device tests of " + (" ".join(paths) if paths else "the suite"),
           "collected": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "ok": False, "note": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", device,
           "-m", "uses_device and (slow or not slow)", *(paths or [])]
    with tempfile.TemporaryDirectory(prefix="gpu_check_pytest_") as tmp:
        xml = os.path.join(tmp, "junit.xml")
        try:
            proc = subprocess.run(cmd + [f"--junitxml={xml}"], cwd=cwd, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            res.update(note=f"pytest timed out after {timeout} s (--tests-timeout)",
                       seconds=time.perf_counter() - start)
            return res
        if os.path.isfile(xml):
            root = ET.parse(xml).getroot()
            suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
            n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            res.update(collected=n["tests"], failed=n["failures"], errors=n["errors"], skipped=n["skipped"],
                       passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"])
    summary = " ".join(proc.stdout.strip().splitlines()[-1:])
    res["ok"] = proc.returncode == 0 and res["failed"] == 0 and res["errors"] == 0 and res["passed"] > 0
    if proc.returncode == 5:
        res["note"] = "no test takes the device fixture: nothing ran on the device"
    elif proc.returncode != 0:
        res["note"] = f"pytest exit {proc.returncode}: {summary}"
    elif res["skipped"]:
        res["note"] = f"{res['skipped']} skipped"
    res["seconds"] = time.perf_counter() - start
    return res


def tests_table(res, device):
    return [f"### (b) Device tests: pytest -m \"uses_device ...\" --device {device}", "",
            "| selection | collected | passed | failed | errors | skipped | result | time (s) | note |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {res['selection']} | {res['collected']} | {res['passed']} | {res['failed']} | {res['errors']} | "
            f"{res['skipped']} | {'OK' if res['ok'] else 'FAIL'} | {res['seconds']:.1f} | {res['note']} |"]


# ----------------------------------------------------------------------------- (c) cost of SGR
class PeakMemory:
    """Peak memory (MiB) of what runs between ``start()`` and ``peak()``: on CUDA the allocator's
    maximum; on the CPU the growth of peak resident memory (VmHWM, reset through
    /proc/self/clear_refs) above the resident memory at ``start()``."""

    def __init__(self, device: str):
        self.device = device
        self.rss0 = 0.0

    def start(self):
        import torch

        release(self.device)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back first
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        from experiments import proc_status_mib

        self.rss0 = proc_status_mib("VmRSS")

    def peak(self) -> float:
        import torch

        if self.device.startswith("cuda"):
            return torch.cuda.max_memory_allocated() / 2**20
        from experiments import proc_status_mib

        return proc_status_mib("VmHWM") - self.rss0


def eval_only_images_per_second(cfg, model, data: SyntheticData, count: int) -> float:
    """Images/s of what ``--eval-only`` runs (``Trainer.test``): detectron2's
    ``inference_on_dataset`` over sgr_d2's test loader (batch 1, the test-time resize) with its
    evaluator, the model in eval mode under ``torch.no_grad`` and in float32, on ``count``
    synthetic images of the config's size; timed on a second pass (the first warms up)."""
    from detectron2.evaluation import inference_on_dataset

    from sgr_d2.engine import Trainer

    size = cfg.INPUT.MIN_SIZE_TEST
    name = data.dataset(size, count, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = (name,)
    seconds = []
    for _ in range(2):
        loader = Trainer.build_test_loader(cfg, name)
        evaluator = Trainer.build_evaluator(cfg, name, output_folder=str(data.root / "eval"))
        sync(cfg.MODEL.DEVICE)
        t = time.perf_counter()
        inference_on_dataset(model, loader, evaluator)
        sync(cfg.MODEL.DEVICE)
        seconds.append(time.perf_counter() - t)
    return count / seconds[-1]


def bench_model(config: Path, device: str, s, data: SyntheticData):
    """Median training step (s), peak training memory (MiB) and inference images/s of one model."""
    import torch
    from detectron2.utils.events import EventStorage

    from sgr_d2.predict import training_batch

    size, batch = s["bench_size"], s["bench_batch"]
    memory = PeakMemory(device)
    memory.start()
    classes = make_cfg(config, device, size, batch).MODEL.SEM_SEG_HEAD.NUM_CLASSES
    cfg = make_cfg(config, device, size, batch, data.dataset(size, batch, classes), amp=s["amp"])
    torch.manual_seed(0)
    model = build_training_model(cfg)
    images = training_batch(cfg)
    trainer = build_trainer(cfg, model, images)
    times = []
    with EventStorage(0) as storage:
        trainer.storage = storage
        for i in range(s["warmup"] + s["steps"]):
            storage.iter = i
            sync(device)
            t = time.perf_counter()
            trainer.run_step()
            sync(device)
            if i >= s["warmup"]:
                times.append(time.perf_counter() - t)
    peak = memory.peak()
    ips = eval_only_images_per_second(cfg, model, data, s["infer_iters"])
    del model, trainer, images
    release(device)
    return statistics.median(times), peak, ips


def bench_pairs(pairs, device, s, data):
    """One row per model: (name, step s, step ratio, peak MiB, memory ratio, img/s, error)."""
    rows = []
    for name in pairs:
        base = None
        for config in (config_file(name), config_file(f"{name}_sgr")):
            try:
                step, peak, ips = bench_model(config, device, s, data)
            except Exception as e:
                rows.append((config.stem, None, None, None, None, None, f"{type(e).__name__}: {str(e)[:160]}"))
                release(device)
                base = None
                continue
            if base is None and not config.stem.endswith("_sgr"):
                base = (step, peak)
                rows.append((config.stem, step, None, peak, None, ips, ""))
            else:
                ratio_t = step / base[0] if base else None
                ratio_m = peak / base[1] if base and base[1] > 0 else None
                rows.append((config.stem, step, ratio_t, peak, ratio_m, ips, ""))
    return rows


def bench_table(rows, device, s):
    cuda = device.startswith("cuda")
    mem = ("peak torch.cuda.max_memory_allocated over the training steps (weights, gradients and "
           "optimizer state included)" if cuda else
           "growth of the process's peak resident memory over the model's build and steps (CPU)")
    fmt = (lambda v, spec: "—" if v is None else format(v, spec))
    lines = [f"### (c) Cost of SGR: {s['bench_size']}x{s['bench_size']}, batch {s['bench_batch']}, {device}, "
             f"training in {precision_name(device, s['amp'])}, evaluation in float32", "",
             f"Step: median of {s['steps']} training steps after {s['warmup']} warm-up (synchronised). "
             f"Memory: {mem}. Evaluation: what --eval-only runs (inference_on_dataset with sgr_d2's test "
             f"loader and evaluator, batch 1, eval mode, torch.no_grad, float32) over {s['infer_iters']} "
             "images, after a warm-up pass.", "",
             "| model | step (ms) | SGR/baseline step | peak train mem (MiB) | SGR/baseline mem "
             "| evaluation img/s (float32, as --eval-only) |",
             "|---|---|---|---|---|---|"]
    for name, step, rt, peak, rm, ips, err in rows:
        if err:
            lines.append(f"| {name} | FAIL: {err} | — | — | — | — |")
            continue
        lines.append(f"| {name} | {1000 * step:.1f} | {fmt(rt, '.3f')} | {peak:.0f} | {fmt(rm, '.3f')} | "
                     f"{ips:.2f} |")
    return lines


# ----------------------------------------------------------------------------- (d) the Trainer
def trainer_check(config: Path, device: str, size: int, amp: bool, data: SyntheticData, out: Path,
                  lr_scale: float = 0.1):
    """``train_net.py``'s body (:func:`sgr_d2.engine.trainer.run`) on the device: train 2
    iterations, ``--resume`` to 4 with the final evaluation, and a run whose loss turns NaN at
    iteration 2. One row ``(step, ok, note, seconds)`` per run."""
    import torch

    from sgr_d2.config import setup_cfg
    from sgr_d2.engine import Trainer
    from sgr_d2.engine.trainer import argument_parser, run

    plain = make_cfg(config, device, size, 2)
    train = data.dataset(size, 4, plain.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    opts = overrides(device, size, 2, train, amp) + [
        "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "1",
        "SOLVER.BASE_LR", repr(plain.SOLVER.BASE_LR * lr_scale), "SOLVER.WARMUP_ITERS", "0"]

    def args(folder, max_iter, *flags, test=()):
        return argument_parser().parse_args(["--config-file", str(config), *flags, *opts, "SOLVER.MAX_ITER",
                                             str(max_iter), "DATASETS.TEST", repr(tuple(test)),
                                             "OUTPUT_DIR", str(folder)])

    def final_iteration(folder):
        return torch.load(folder / "model_final.pth", map_location="cpu", weights_only=True)["iteration"]

    def step(name, body):
        start = time.perf_counter()
        try:
            note = body()
            ok = not note
        except Exception as e:
            ok, note = False, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
        release(device)
        return (name, ok, note, time.perf_counter() - start)

    run_dir = out / "run"

    def first():
        run(args(run_dir, 2))
        if final_iteration(run_dir) != 1 or (run_dir / "last_checkpoint").read_text() != "model_final.pth":
            return "model_final.pth is not iteration 1, or not tagged in last_checkpoint"
        return ""

    def resumed():
        run(args(run_dir, 4, "--resume", test=[train]))  # the training images as the test set
        log = (run_dir / "log.txt").read_text()
        metrics = [json.loads(line) for line in (run_dir / "metrics.json").read_text().splitlines() if line.strip()]
        evaluations = [m for m in metrics if "sem_seg/mIoU" in m]
        if "Starting training from iteration 2" not in log:
            return "the resumed run did not start at iteration 2"
        if final_iteration(run_dir) != 3:
            return f"model_final.pth holds iteration {final_iteration(run_dir)}, not 3"
        mious = [m["sem_seg/mIoU"] for m in evaluations]
        if len(mious) != 1 or not math.isfinite(mious[0]):
            return f"metrics.json does not hold one finite evaluation (mIoU: {mious})"
        return ""

    def nan_guard():
        folder = out / "nan"
        cfg = setup_cfg(args(folder, 4))
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)

        def nan_at_2(module, inputs, output):  # runs before the guard's own hook
            if module.training and trainer.iter == 2:
                key = next(iter(output))
                return {**output, key: output[key] * math.nan}
        trainer.model.register_forward_hook(nan_at_2, prepend=True)
        try:
            trainer.train()
        except FloatingPointError as e:
            message = str(e)
        else:
            return "a NaN loss at iteration 2 did not stop training"
        kept = torch.load(folder / "model_last_good.pth", map_location="cpu", weights_only=True)["iteration"]
        if "at iteration 2" not in message or kept != 1:
            return f"the guard's message or model_last_good.pth (iteration {kept}) is wrong: {message[:160]}"
        if (folder / "last_checkpoint").read_text() != "model_last_good.pth":
            return "model_last_good.pth is not tagged in last_checkpoint"
        return ""

    return [step("train 2 iterations (checkpoint after each)", first),
            step("--resume to 4 iterations, then the evaluation", resumed),
            step("NaN loss at iteration 2: the guard stops, keeps iteration 1", nan_guard)]


def trainer_table(rows, config: Path, size: int, device: str, amp: bool):
    precision = precision_name(device, amp)
    lines = [f"### (d) The Trainer: {config.stem}, {size}x{size}, batch 2, {device}, {precision}, synthetic data", "",
             "| run | result | time (s) | note |", "|---|---|---|---|"]
    for name, ok, note, seconds in rows:
        lines.append(f"| {name} | {'OK' if ok else 'FAIL'} | {seconds:.1f} | {note} |")
    return lines


# ----------------------------------------------------------------------------- main
def environment_lines(device: str, tiny: bool):
    import detectron2
    import torch

    lines = []
    if device.startswith("cuda"):
        lines.append(f"GPU: {torch.cuda.get_device_name()}")
    else:
        lines.append("device: cpu (--tiny: a smoke run of the script, not GPU figures)" if tiny else "device: cpu")
    lines.append(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
                 f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}, "
                 f"detectron2 {detectron2.__version__}")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a small run on the CPU (CI)")
    p.add_argument("--out", help="also write the tables to this Markdown file")
    p.add_argument("--configs", nargs="+",
                   help="(a): config names of configs/ade20k (e.g. dil_fcn_r50_sgr) or of configs/ "
                        "(e.g. toy/dil_fcn_r18_sgr) or files "
                        "(default: every ADE20K semantic config; --tiny: " + " ".join(TINY_CONFIGS) + ")")
    p.add_argument("--pairs", nargs="+", help="(c): baseline names whose _sgr config exists "
                                              f"(default {' '.join(BENCH_PAIRS)}; --tiny {' '.join(TINY_PAIRS)})")
    p.add_argument("--iters", type=int, help="(a): training iterations per config")
    p.add_argument("--lr-scale", type=float, default=0.1,
                   help="(a): the learning rate is this times the config's SOLVER.BASE_LR (default 0.1)")
    p.add_argument("--size", type=int, help="(a): image size")
    p.add_argument("--batch", type=int, help="(a): images per batch")
    p.add_argument("--bench-size", type=int, help="(c): image size")
    p.add_argument("--bench-batch", type=int, help="(c): training images per batch")
    p.add_argument("--steps", type=int, help="(c): timed training steps")
    p.add_argument("--skip-check", action="store_true", help="skip (a)")
    p.add_argument("--skip-tests", action="store_true", help="skip (b)")
    p.add_argument("--skip-bench", action="store_true", help="skip (c)")
    p.add_argument("--trainer-config", help="(d): the config the Trainer runs (default mask2former_r50_sgr; "
                                            "--tiny toy/dil_fcn_r18_sgr)")
    p.add_argument("--skip-trainer", action="store_true", help="skip (d)")
    p.add_argument("--tests-timeout", type=int, default=None, help="(b): seconds (default 3600; --tiny 120)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DETECTRON2_DATASETS", str(REPO / "datasets"))
    import sgr_d2  # noqa: F401  (before detectron2's modules: sgr_d2's compatibility shims)
    import torch

    s = dict(SETTINGS["tiny" if args.tiny else "gpu"])
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here. Run it on a machine with a CUDA GPU, or use "
              "`python bench/gpu_check.py --tiny` for the small CPU run.", file=sys.stderr)
        return 2
    for key in ("iters", "size", "batch", "bench_size", "bench_batch", "steps"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    device = s["device"]
    if args.configs:
        configs, left_out = [config_file(c) for c in args.configs], []
    elif args.tiny:
        configs, left_out = [config_file(c) for c in TINY_CONFIGS], []
    else:
        configs, left_out = ade20k_configs()
    pairs = args.pairs or (TINY_PAIRS if args.tiny else BENCH_PAIRS)

    report = ["## sgr_d2 GPU check (bench/gpu_check.py" + (" --tiny" if args.tiny else "") + ")", ""]
    report += environment_lines(device, args.tiny) + [""]
    print("\n".join(report), flush=True)
    failed = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_data_") as tmp:
        data = SyntheticData(tmp)
        try:
            if not args.skip_check:
                rows = []
                for config in configs:
                    rows.append(train_check(config, device, s["size"], s["batch"], s["iters"], data,
                                            lr_scale=args.lr_scale, window=s["window"], amp=s["amp"]))
                    r = rows[-1]
                    print(f"  (a) {r['config']}: {'OK' if r['ok'] else 'FAIL'} {r['note']}", flush=True)
                part = check_table(rows, s["size"], s["batch"], device, args.lr_scale, s["window"], s["amp"])
                if left_out:
                    part += ["", "Not checked (they only change the weights and schedule of a checked config): "
                             + ", ".join(p.stem for p in left_out) + "."]
                report += part + [""]
                print("\n" + "\n".join(part) + "\n", flush=True)
                failed += [f"(a) {r['config']}" for r in rows if not r["ok"]]
            if not args.skip_tests:
                timeout = args.tests_timeout or (120 if args.tiny else 3600)
                res = device_tests(device, s["tests"], timeout)
                part = tests_table(res, device)
                report += part + [""]
                print("\n".join(part) + "\n", flush=True)
                if not res["ok"]:
                    failed.append("(b) device tests")
            if not args.skip_bench:
                rows = bench_pairs(pairs, device, s, data)
                part = bench_table(rows, device, s)
                report += part + [""]
                print("\n".join(part) + "\n", flush=True)
                failed += [f"(c) {r[0]}" for r in rows if r[6]]
            if not args.skip_trainer:
                config = config_file(args.trainer_config or s["trainer_config"])
                rows = trainer_check(config, device, s["trainer_size"], s["amp"], data, Path(tmp) / "trainer",
                                     lr_scale=args.lr_scale)
                part = trainer_table(rows, config, s["trainer_size"], device, s["amp"])
                report += part + [""]
                print("\n".join(part) + "\n", flush=True)
                failed += [f"(d) {r[0]}" for r in rows if not r[1]]
        finally:
            data.close()
    verdict = "gpu_check: FAIL: " + ", ".join(failed) if failed else "gpu_check: all checks OK"
    report.append(verdict)
    print(verdict)
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
