#!/usr/bin/env python
"""Spread of the SGR loss terms under bfloat16 autocast against float32, over augmented batches.

For each toy SGR model (weights from seed 0, as ``tests/test_amp.py``'s one-batch test builds
them) and each batch seed 0..N-1, the same batch goes through the model in float32 and in
bfloat16 autocast; prints per model and loss term the largest relative and absolute difference,
and the largest and the seed-0 fraction of that test's tolerance (``REL_TOL``/``ABS_TOL``; above
1 fails). Seed 0 is the batch the test uses.

    python bench/amp_loss_spread.py --batches 20
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))  # amp_runs.py


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))  # the toy is generated there
    import sgr_d2  # noqa: F401  (compat shims before any detectron2 import)
    import torch
    from amp_runs import (ABS_TOL, DIL_FCN_SGR, MASK2FORMER_SGR, REL_TOL, SGR_KEYS, TOY,
                          float32_and_bf16_losses)

    from detectron2.modeling import build_model

    from sgr_d2.config import load_config
    from sgr_d2.predict import training_batch

    torch.set_num_threads(args.threads)
    configs = {"dil_fcn_r18_sgr": DIL_FCN_SGR, "maskformer_r18_sgr": os.path.join(TOY, "maskformer_r18_sgr.yaml"),
               "mask2former_r18_sgr": MASK2FORMER_SGR}
    print(f"\n### bfloat16 vs float32 SGR loss terms, {args.batches} batches (seeds 0..{args.batches - 1})\n")
    print("| model (configs/toy/) | term | max rel. diff | max abs. diff | max fraction of tolerance "
          "| seed 0 (the test's batch) |")
    print("|---|---|---|---|---|---|")
    for name, config in configs.items():
        cfg = load_config(config, ["MODEL.DEVICE", "cpu"])  # the test's model and batches (tests/conftest.py)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        rows = {k: [] for k in SGR_KEYS}
        for seed in range(args.batches):
            ref, got = float32_and_bf16_losses(model, training_batch(cfg, n=4, seed=seed))
            for k in SGR_KEYS:
                a, b = ref[k].item(), got[k].item()
                rows[k].append((abs(a - b) / abs(a), abs(a - b), abs(a - b) / max(REL_TOL * abs(a), ABS_TOL)))
        for k, r in rows.items():
            print(f"| {name} | {k} | {100 * max(x[0] for x in r):.2f}% | {max(x[1] for x in r):.1e} "
                  f"| {max(x[2] for x in r):.2f} | {r[0][2]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
