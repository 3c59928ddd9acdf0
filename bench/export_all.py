#!/usr/bin/env python
"""Which semantic-segmentation configs export to ONNX, and how closely onnxruntime follows PyTorch.
Prints a markdown table.

    python bench/export_all.py                       # every semantic config of configs/ade20k, 128x128
    python bench/export_all.py --dataset cityscapes --size 256

For each config (``MODEL.META_ARCHITECTURE`` a semantic one; the three datasets' copies differ
only in NUM_CLASSES), the model is built with random weights and BatchNorm statistics from two
synthetic images (``bench/inference.py``'s ``_build``), exported at ``--size`` x ``--size``
(``sgr_d2.export.export_onnx`` without its own check), and run by onnxruntime and PyTorch on
another synthetic image: the table gives the largest difference of ``sem_seg`` and
``sgr_regions``, the argmax agreement, and whether ``--dynamic`` is available (or the part that
refuses it, from ``check_exportable``). For scale, it also gives PyTorch's own difference between
one and two threads on the same image: randomly initialised deep networks amplify rounding
differences, so the onnxruntime figures are to be read against that floor.
"""
import argparse
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SEMANTIC = ("SGRSemanticSegmentor", "MaskFormer")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ade20k")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    import sgr_d2  # noqa: F401
    from sgr_d2.config import load_config

    torch.set_num_threads(args.threads)
    configs = sorted(c for c in glob.glob(str(REPO / "configs" / args.dataset / "*.yaml"))
                     if not os.path.basename(c).startswith("Base-")
                     and load_config(c).MODEL.META_ARCHITECTURE in SEMANTIC)
    with tempfile.TemporaryDirectory(prefix="sgr_d2_export_all_") as tmp:  # the .onnx files go with it
        _export_all(args, configs, tmp)


def _export_all(args, configs, tmp):
    from inference import _build
    from sgr_d2.export import (ExportError, SemanticSegmentationExport, check_exportable, compare_with_onnxruntime,
                               export_onnx, onnxruntime_session, synthetic_image)

    image = synthetic_image(args.size, args.size, seed=5)
    print(f"\n### ONNX export, configs/{args.dataset}, {args.size}x{args.size}, random weights\n")
    print("| config | export (s) | sem_seg: ort vs PyTorch (PyTorch 1 vs 2 threads) | argmax agreement "
          "| sgr_regions: ort vs PyTorch (PyTorch 1 vs 2 threads) | --dynamic |")
    print("|---|---|---|---|---|---|")
    for config in configs:
        name = os.path.basename(config)[:-5]
        model = _build(config, args.size)
        path = os.path.join(tmp, name + ".onnx")
        t0 = time.perf_counter()
        try:
            export_onnx(model, path, args.size, args.size, verify=False)
        except ExportError as e:
            print(f"| {name} | failed: {e} | | | | |", flush=True)
            continue
        seconds = time.perf_counter() - t0
        wrapper = SemanticSegmentationExport(model)
        report = compare_with_onnxruntime(wrapper, onnxruntime_session(path), image)
        floor = _thread_floor(wrapper, image, args.threads)
        sem = report["sem_seg"]
        regions = (f"{report['sgr_regions']['max_abs_diff']:.1e} ({floor[1]:.1e})" if "sgr_regions" in report
                   else "—")
        try:
            check_exportable(model, dynamic=True)
            dynamic = "yes"
        except ExportError as e:
            dynamic = "no: " + str(e).split(":")[1].split("(")[0].strip()
        print(f"| {name} | {seconds:.0f} | {sem['max_abs_diff']:.1e} ({floor[0]:.1e}) | {100 * sem['argmax_agreement']:.2f}% "
              f"| {regions} | {dynamic} |", flush=True)


def _thread_floor(wrapper, image, threads):
    """Largest differences of each output of PyTorch itself, on one thread against two."""
    import torch

    outs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        with torch.no_grad():
            outs.append(wrapper(image))
    torch.set_num_threads(threads)
    return [float((a - b).abs().max()) for a, b in zip(*outs)]


if __name__ == "__main__":
    os.environ.setdefault("DETECTRON2_DATASETS", str(REPO / "datasets"))
    main()
