#!/usr/bin/env python
"""Inference on the CPU: PyTorch float32, PyTorch bfloat16 autocast and onnxruntime, with and
without SGR. Prints a markdown table.

    python bench/inference.py                                   # the three models below, 512x512
    python bench/inference.py --models dil_fcn_r50 --size 256 --runs 3

Models are ``configs/<dataset>/<name>.yaml`` and ``<name>_sgr.yaml`` (default: Dilated-FCN R-50,
Mask2Former R-50, Mask2Former Swin-T on ADE20K, 150 classes), randomly initialised (seed 0) and
in eval mode; the input is one ``--size`` x ``--size`` synthetic image. Each model is exported to
ONNX (``sgr_d2.export.export_onnx``); the table gives the largest difference between onnxruntime's
and PyTorch's ``sem_seg`` on the image and their argmax agreement.

Latency: the three runtimes of a model with and without SGR (six runners) take turns in this
process (fp32, bf16, onnxruntime, SGR fp32, SGR bf16, SGR onnxruntime, fp32, ...), ``--warmup``
then ``--runs`` rounds, so a change of machine load hits all six alike; the table gives each
one's median, its ratio to float32 and, for SGR, its ratio to the model without SGR. All use ``--threads``
threads. Peak memory: each runtime alone in a subprocess, which imports everything, notes its
resident memory, loads the model (builds it, or opens the ONNX session) and runs it twice; the
figure is the peak resident memory (``VmHWM``) minus that baseline, i.e. weights plus
activations.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tools"))  # experiments.py

from experiments import peak_rss_mib, proc_status_mib  # noqa: E402

RUNTIMES = ("fp32", "bf16", "onnxruntime")




def _build(config, size=128):
    """The config's model, randomly initialised (seed 0), with BatchNorm statistics taken from two
    synthetic images (without them a random deep ResNet's activations grow layer after layer),
    in eval mode."""
    import torch
    from detectron2.modeling import build_model

    from sgr_d2.config import load_config

    torch.manual_seed(0)
    cfg = load_config(config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # the cumulative average of what it sees
            m.train()
    with torch.no_grad():  # a batch of two: ASPP's pooled branch normalises 1x1 maps
        model([{"image": _image(size, seed)[0]} for seed in (1, 2)])
    return model.eval()


def _image(size, seed=0):
    from sgr_d2.export import synthetic_image

    return synthetic_image(size, size, seed=seed)


def _runner(runtime, config, onnx_path, threads):
    """A function of the image for ``runtime`` (and what keeps its model alive)."""
    import torch

    if runtime == "onnxruntime":
        from sgr_d2.export import onnxruntime_session, run_onnxruntime

        session = onnxruntime_session(onnx_path, num_threads=threads)
        return lambda image: run_onnxruntime(session, image.numpy())
    from sgr_d2.export import SemanticSegmentationExport

    wrapper = SemanticSegmentationExport(_build(config))
    if runtime == "fp32":
        def run(image):
            with torch.no_grad():
                return wrapper(image)
    else:
        def run(image):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                return wrapper(image)
    return run


def worker(args):
    """Peak memory of one runtime alone in this process (printed as JSON)."""
    import onnxruntime  # noqa: F401  (imported before the baseline by every runtime alike)
    import torch

    import sgr_d2  # noqa: F401
    import sgr_d2.export  # noqa: F401

    torch.set_num_threads(args.threads)
    image = _image(args.size)
    baseline = proc_status_mib("VmRSS")
    run = _runner(args.runtime, args.config, args.onnx, args.threads)
    for _ in range(2):
        run(image)
    print(json.dumps({"peak_mib": peak_rss_mib() - baseline}))


def bench(args):
    import torch

    import sgr_d2  # noqa: F401

    torch.set_num_threads(args.threads)
    image = _image(args.size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sgr_d2_bench_onnx_") as tmp:  # the .onnx files go with it
        for name in args.models:
            rows.extend(_measure_pair(args, name, image, tmp))
    print(f"\n### Inference, {args.size}x{args.size}, batch 1, CPU, {args.threads} threads, median of {args.runs} "
          f"interleaved runs after {args.warmup} warm-up ({datetime.date.today().isoformat()})\n")
    print("| model (configs/" + args.dataset + "/) | fp32 (s) | bf16 (s) | onnxruntime (s) | bf16 / fp32 | ort / fp32 "
          "| SGR / no SGR: fp32, bf16, ort | peak mem fp32 (MiB) | bf16 / fp32 | ort / fp32 | SGR / no SGR: fp32 "
          "| ort vs PyTorch: max abs diff, argmax agreement | export (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    by_name = {name: (t, m) for name, t, m, _, _ in rows}
    for name, t, m, diff, export_s in rows:
        base = by_name.get(name[: -len("_sgr")]) if name.endswith("_sgr") else None
        sgr_t = ", ".join(f"{t[r] / base[0][r]:.3f}" for r in RUNTIMES) if base else "–"
        sgr_m = f"{m['fp32'] / base[1]['fp32']:.3f}" if base else "–"
        print(f"| {name} | {t['fp32']:.3f} | {t['bf16']:.3f} | {t['onnxruntime']:.3f} | {t['bf16'] / t['fp32']:.3f} "
              f"| {t['onnxruntime'] / t['fp32']:.3f} | {sgr_t} | {m['fp32']:.0f} | {m['bf16'] / m['fp32']:.3f} "
              f"| {m['onnxruntime'] / m['fp32']:.3f} | {sgr_m} | {diff[0]:.1e}, {100 * diff[1]:.2f}% | {export_s:.0f} |")


def _measure_pair(args, name, image, tmp):
    """Rows of ``name`` and ``name_sgr``: median times, peak memory, ort vs PyTorch, export seconds."""
    from sgr_d2.export import SemanticSegmentationExport, compare_with_onnxruntime, export_onnx, onnxruntime_session

    rows = []
    # the model with and without SGR: exported and checked one after the other, then all six
    # (variant, runtime) runners take turns, so SGR / no SGR is a ratio within one run too
    variants = {}
    for suffix in ("", "_sgr"):
        config = str(REPO / "configs" / args.dataset / f"{name}{suffix}.yaml")
        onnx_path = os.path.join(tmp, f"{name}{suffix}.onnx")
        model = _build(config)
        t0 = time.perf_counter()
        export_onnx(model, onnx_path, args.size, args.size, verify=False)
        export_s = time.perf_counter() - t0
        sem = compare_with_onnxruntime(SemanticSegmentationExport(model), onnxruntime_session(onnx_path),
                                       image)["sem_seg"]
        variants[suffix] = (config, onnx_path, (sem["max_abs_diff"], sem["argmax_agreement"]), export_s)
        del model
    runners = {(suffix, r): _runner(r, config, onnx_path, args.threads)
               for suffix, (config, onnx_path, _, _) in variants.items() for r in RUNTIMES}
    times = {key: [] for key in runners}
    for i in range(args.warmup + args.runs):
        for key, run in runners.items():
            t = time.perf_counter()
            run(image)
            if i >= args.warmup:
                times[key].append(time.perf_counter() - t)
    del runners
    for suffix, (config, onnx_path, diff, export_s) in variants.items():
        mem = {}
        for r in RUNTIMES:
            cmd = [sys.executable, __file__, "--worker", "--runtime", r, "--config", config, "--onnx", onnx_path,
                   "--size", str(args.size), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            mem[r] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
        median = {r: statistics.median(times[(suffix, r)]) for r in RUNTIMES}
        rows.append((f"{name}{suffix}", median, mem, diff, export_s))
        print(f"# {name}{suffix}: " + ", ".join(f"{r} {t:.3f} s" for r, t in median.items()),
              file=sys.stderr, flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["dil_fcn_r50", "mask2former_r50", "mask2former_swin_t"])
    p.add_argument("--dataset", default="ade20k")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--runtime", choices=RUNTIMES, help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--onnx", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    bench(args)


if __name__ == "__main__":
    os.environ.setdefault("DETECTRON2_DATASETS", str(REPO / "datasets"))
    main()
