#!/usr/bin/env python
"""The K/L ablation (supplementary Table 2): train for each K × L, report mIoU and token semantics.

    python tools/sweep_kl.py                                  # K ∈ {128, 256, 512} × L ∈ {32, 64}
    python tools/sweep_kl.py --ks 32 64 --ls 8 16 --iters 100 --output output/sweep_kl_small

Each run trains ``<config> MODEL.SGR.NUM_TOKENS K MODEL.SGR.NUM_MATCHED L TEST.TOKEN_SEMANTICS True
[SOLVER.MAX_ITER iters] [extra opts]`` into ``<output>/K<K>_L<L>`` as ``train_net.py`` would, in a
child process (``tools/experiments.py::train_and_evaluate``, log in ``train_stdout.log``)
(default config: the toy Dil-FCN + SGR, whose 16×16 = 256 feature cells are fewer than K = 512:
that is fine, tokens are soft regions and nothing requires K ≤ cells). The final evaluation's numbers are read back from
the run's ``metrics.json``. Combinations with L > K are skipped. The table is printed and saved
as ``<output>/sweep_kl.md`` and ``<output>/sweep_kl.json``.
"""
import argparse
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))  # experiments.py

from experiments import read_final_metrics, train_and_evaluate  # noqa: E402

from sgr_d2.evaluation.token_semantics import METRIC_KEYS  # noqa: E402

COLUMNS = ("K", "L", "mIoU", *METRIC_KEYS)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", default=os.path.join(REPO, "configs/toy/dil_fcn_r18_sgr.yaml"))
    p.add_argument("--ks", type=int, nargs="+", default=[128, 256, 512], help="numbers of tokens K")
    p.add_argument("--ls", type=int, nargs="+", default=[32, 64], help="numbers of matched tokens L")
    p.add_argument("--iters", type=int, default=None, help="SOLVER.MAX_ITER (default: the config's)")
    p.add_argument("--output", default="output/sweep_kl", help="root folder of the runs")
    p.add_argument("--num-gpus", type=int, default=1)
    p.add_argument("--skip-existing", action="store_true",
                   help="reuse a run whose metrics.json already holds its final evaluation")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="more config overrides for every run")
    return p


def format_table(rows) -> str:
    from tabulate import tabulate

    def fmt(key, v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else (f"{v:.1f}" if key == "mIoU" else f"{v:.3f}")
        return v

    return tabulate([[fmt(c, r[c]) for c in COLUMNS] for r in rows], headers=list(COLUMNS), tablefmt="github",
                    disable_numparse=True)


def run_one(args, k: int, l: int) -> dict:
    out_dir = os.path.join(os.path.abspath(args.output), f"K{k}_L{l}")
    if args.skip_existing:
        try:
            return {"K": k, "L": l, **read_final_metrics(out_dir)}
        except (FileNotFoundError, ValueError):
            pass
    opts = ["MODEL.SGR.NUM_TOKENS", str(k), "MODEL.SGR.NUM_MATCHED", str(l), "TEST.TOKEN_SEMANTICS", "True"]
    if args.iters is not None:
        opts += ["SOLVER.MAX_ITER", str(args.iters)]
    opts += list(args.opts)
    print(f"[sweep_kl] K={k} L={l}: train {args.config_file} {' '.join(opts)}  "
          f"(log: {os.path.join(out_dir, 'train_stdout.log')})", flush=True)
    start = time.time()
    train_and_evaluate(args.config_file, opts, out_dir, num_gpus=args.num_gpus, cwd=REPO)
    res = {"K": k, "L": l, **read_final_metrics(out_dir)}
    print(f"[sweep_kl] K={k} L={l} done in {time.time() - start:.0f}s: mIoU {res['mIoU']:.1f}", flush=True)
    return res


def main(argv=None):
    args = get_parser().parse_args(argv)
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"config file {args.config_file} does not exist")
    bad = [v for v in args.ks + args.ls if v < 1]
    if bad:
        raise ValueError(f"K and L must be >= 1, got {bad}")
    rows = []
    for k in args.ks:
        for l in args.ls:
            if l > k:
                print(f"[sweep_kl] skipping K={k} L={l}: L cannot exceed K", flush=True)
                continue
            rows.append(run_one(args, k, l))
    table = format_table(rows)
    print(table)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "sweep_kl.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.output, "sweep_kl.json"), "w") as f:
        json.dump([{c: (None if isinstance(r[c], float) and math.isnan(r[c]) else r[c]) for c in COLUMNS}
                   for r in rows], f, indent=2)
    return rows


if __name__ == "__main__":
    main()
