#!/usr/bin/env python
"""What SGR costs: training-step time and peak memory with vs without SGR, and the time of
connected components + matching per label map. Prints markdown tables.

    python bench/sgr_overhead.py                      # every per-pixel head, 512x512, batch 1
    python bench/sgr_overhead.py --pairs dil_fcn_r50 deeplabv3_r101 --size 256
    python bench/sgr_overhead.py --skip-models        # only components + matching

Step time: both models of a pair are built in this process and their training steps on the
same random images (scene-like label maps and their connected components) are interleaved,
``--warmup`` then ``--steps`` each; the median is reported. Peak memory: each model alone in a
subprocess for two steps, its peak RSS (VmHWM) on the CPU or ``torch.cuda.max_memory_allocated`` on a GPU. Pairs are ``configs/<dataset>/<name>.yaml``
against ``<name>_sgr.yaml``; a pair whose configs do not exist yet is built from the toy config
with the overrides in ``FALLBACK``.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # experiments.py

# Dilated-FCN on a dilated ResNet-50 (OS 8, multi-grid 1-2-4), ADE20K-sized head, paper SGR sizes.
FALLBACK = {
    "dil_fcn_r50": [
        "MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256",
        "MODEL.RESNETS.STEM_OUT_CHANNELS", "64", "MODEL.RESNETS.MULTI_GRID", "[1, 2, 4]",
        "MODEL.RESNETS.STRIDE_IN_1X1", "True",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "150", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "512",
        "MODEL.SEM_SEG_HEAD.NUM_CONVS", "2",
        "MODEL.SGR.NUM_TOKENS", "128", "MODEL.SGR.NUM_MATCHED", "64", "MODEL.SGR.TOKEN_DIM", "256",
        "MODEL.SGR.NUM_HEADS", "8", "MODEL.SGR.FFN_DIM", "1024",
    ],
}


def _config_pair(name: str, dataset: str):
    base = REPO / "configs" / dataset / f"{name}.yaml"
    sgr = REPO / "configs" / dataset / f"{name}_sgr.yaml"
    if base.is_file() and sgr.is_file():
        return [(str(base), []), (str(sgr), [])], f"configs/{dataset}/{name}[_sgr].yaml"
    if name not in FALLBACK:
        raise SystemExit(f"no configs/{dataset}/{name}.yaml and no fallback recipe for {name!r}")
    toy = REPO / "configs" / "toy"
    return ([(str(toy / "dil_fcn_r18.yaml"), FALLBACK[name]), (str(toy / "dil_fcn_r18_sgr.yaml"), FALLBACK[name])],
            f"toy config + {name} overrides")


def _random_batch(batch, size, num_classes, seed=0):
    import torch

    from sgr_d2.sgr import component_label_map

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batch):
        sem = ade_like_label_map(rng, size, num_classes)
        labels, classes = component_label_map(sem)
        out.append({"image": torch.as_tensor(rng.integers(0, 255, (3, size, size)), dtype=torch.uint8),
                    "sem_seg": torch.as_tensor(sem.astype(np.int64)),
                    "components": {"labels": torch.from_numpy(labels), "classes": torch.from_numpy(classes)},
                    "height": size, "width": size})
    return out


def ade_like_label_map(rng, size=512, num_classes=150, regions=40, classes_in_image=15):
    """A scene-like label map: ``regions`` Voronoi cells over ``classes_in_image`` classes drawn
    from ``num_classes``, and one unlabelled (ignore) rectangle."""
    import cv2

    classes = rng.choice(num_classes, size=classes_in_image, replace=False)
    small = 64
    pts = rng.integers(0, small, (regions, 2))
    yy, xx = np.mgrid[:small, :small]
    d = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    cell = d.argmin(-1)
    sem = classes[rng.integers(0, classes_in_image, regions)][cell].astype(np.uint8)
    sem = cv2.resize(sem, (size, size), interpolation=cv2.INTER_NEAREST)
    y, x = rng.integers(0, size - size // 8, 2)
    sem[y:y + size // 8, x:x + size // 8] = 255
    return sem


def _build(config, opts, device):
    import torch
    from detectron2.modeling import build_model

    from sgr_d2.engine import build_optimizer
    from sgr_d2.config import load_config

    torch.manual_seed(0)
    cfg = load_config(config, opts + ["MODEL.DEVICE", device, "MODEL.WEIGHTS", ""])
    model = build_model(cfg).train()
    return cfg, model, build_optimizer(cfg, model)


def _step(model, opt, batch, device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    losses = model(batch)
    sum(losses.values()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def worker(args):
    """Peak memory of one model over two training steps, alone in this process."""
    import torch

    import sgr_d2  # noqa: F401
    from experiments import peak_rss_mib

    cfg, model, opt = _build(args.config, json.loads(args.opts), args.device)
    batch = _random_batch(args.batch, args.size, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    for _ in range(2):
        _step(model, opt, batch, args.device)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_mib()
    print(json.dumps({"peak_mib": peak}))


def bench_models(args):
    """Step time: both models in this process, steps interleaved (A, B, A, B, ...) so that a
    change of machine load hits both alike; peak memory: each model alone in a subprocess."""
    import sgr_d2  # noqa: F401

    rows = []
    for name in args.pairs:
        pair, source = _config_pair(name, args.dataset)
        built = [_build(config, opts, args.device) for config, opts in pair]
        batch = _random_batch(args.batch, args.size, built[0][0].MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        times = [[], []]
        for i in range(args.warmup + args.steps):
            for j, (_, model, opt) in enumerate(built):
                t = _step(model, opt, batch, args.device)
                if i >= args.warmup:
                    times[j].append(t)
        del built
        mems = []
        for config, opts in pair:
            cmd = [sys.executable, __file__, "--worker", "--config", config, "--opts", json.dumps(opts),
                   "--size", str(args.size), "--batch", str(args.batch), "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            mems.append(json.loads(out.strip().splitlines()[-1])["peak_mib"])
        rows.append((name, source, [statistics.median(t) for t in times], mems))
    print(f"\n### Training step, {args.size}x{args.size}, batch {args.batch}, device {args.device}, "
          f"median of {args.steps} interleaved steps after {args.warmup} warm-up\n")
    print("| model | configs | step w/o SGR (s) | step with SGR (s) | time ratio | peak mem w/o (MiB) | peak mem with (MiB) | mem ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, source, (tb, ts), (mb, ms) in rows:
        print(f"| {name} | {source} | {tb:.3f} | {ts:.3f} | {ts / tb:.3f} | {mb:.0f} | {ms:.0f} | {ms / mb:.3f} |")


def bench_components(args):
    import cv2
    import torch

    import sgr_d2  # noqa: F401
    from sgr_d2.sgr import (SGRCriterion, component_label_map, connected_components, downsample_component_labels,
                            match_tokens, pairwise_cost)

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    maps = [ade_like_label_map(rng, 512, 150) for _ in range(args.maps)]
    worst = [cv2.resize(rng.integers(0, 150, (24, 24)).astype(np.uint8), (512, 512),
                        interpolation=cv2.INTER_NEAREST) for _ in range(args.maps)]
    crit = SGRCriterion(num_matched=64)

    def per_map(fn, items):
        fn(items[0])
        t = time.perf_counter()
        for m in items:
            fn(m)
        return 1000 * (time.perf_counter() - t) / len(items)

    rows = []
    for label, items in (("scene-like (15 of 150 classes, ~40 regions)", maps),
                         ("worst case (all 150 classes, 24x24 grid of blocks)", worst)):
        n = np.mean([len(component_label_map(m)[1]) for m in items])
        t_lab = per_map(lambda m: component_label_map(m), items)
        t_cc = per_map(lambda m: connected_components(m), items)
        comps = [component_label_map(m) for m in items]
        regions = torch.rand(128, 64, 64).softmax(0)

        def match(comp):
            labels, classes = comp
            soft, w = downsample_component_labels(torch.from_numpy(labels), len(classes), (64, 64))
            match_tokens(pairwise_cost(regions.flatten(1), soft, w), crit.num_matched, crit.matching)

        t_match = per_map(match, comps)
        rows.append((label, n, t_lab, t_cc, t_match))
    print("\n### Connected components and matching per 512x512 label map (one core)\n")
    print("| label map | components | label map only (ms) | boolean masks (ms) | cost + hybrid matching, K=128, L=64 at 64x64 (ms) |")
    print("|---|---|---|---|---|")
    for label, n, a, b, c in rows:
        print(f"| {label} | {n:.0f} | {a:.2f} | {b:.2f} | {c:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", default=["dil_fcn_r50", "deeplabv3_r50", "sem_fpn_r50", "upernet_swin_t"])
    p.add_argument("--dataset", default="ade20k")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--maps", type=int, default=20)
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--skip-components", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--opts", default="[]", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not args.skip_components:
        bench_components(args)
    if not args.skip_models:
        bench_models(args)


def _has_cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if __name__ == "__main__":
    os.environ.setdefault("DETECTRON2_DATASETS", str(REPO / "datasets"))
    main()
