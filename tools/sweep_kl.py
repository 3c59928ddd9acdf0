#!/usr/bin/env python
"""The K/L ablation (supplementary Table 2): train for each K × L, report mIoU and token semantics.

    python tools/sweep_kl.py                                  # K ∈ {128, 256, 512} × L ∈ {32, 64}
    python tools/sweep_kl.py --ks 32 64 --ls 8 16 --iters 100 --output output/sweep_kl_small

Each run is ``train_net.py --config-file <config> MODEL.SGR.NUM_TOKENS K MODEL.SGR.NUM_MATCHED L
TEST.TOKEN_SEMANTICS True [SOLVER.MAX_ITER iters] OUTPUT_DIR <output>/K<K>_L<L> [extra opts]``
(default config: the toy Dil-FCN + SGR, whose 16×16 = 256 feature cells are fewer than K = 512:
that is fine, tokens are soft regions and nothing requires K ≤ cells). The final evaluation's numbers are read back from
the run's ``metrics.json``. Combinations with L > K are skipped. The table is printed and saved
as ``<output>/sweep_kl.md`` and ``<output>/sweep_kl.json``.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

COLUMNS = ("K", "L", "mIoU", "S_C", "D_C", "S_I", "D_I")


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


def read_final_metrics(output_dir: str) -> dict:
    """mIoU and S_C, D_C, S_I, D_I of the last evaluation in ``<output_dir>/metrics.json``."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: the run did not finish its evaluation")
    last = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rec = json.loads(line)
                if "sem_seg/mIoU" in rec:
                    last = rec
    if last is None:
        raise ValueError(f"{path} holds no evaluation ('sem_seg/mIoU' in no line)")
    out = {"mIoU": float(last["sem_seg/mIoU"])}
    for k in ("S_C", "D_C", "S_I", "D_I"):
        out[k] = float(last.get(f"token_semantics/{k}", math.nan))
    return out


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
    os.makedirs(out_dir, exist_ok=True)
    opts = ["MODEL.SGR.NUM_TOKENS", str(k), "MODEL.SGR.NUM_MATCHED", str(l), "TEST.TOKEN_SEMANTICS", "True",
            "OUTPUT_DIR", out_dir]
    if args.iters is not None:
        opts += ["SOLVER.MAX_ITER", str(args.iters)]
    opts += list(args.opts)
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", args.config_file,
           "--num-gpus", str(args.num_gpus), *opts]
    log_path = os.path.join(out_dir, "train_stdout.log")
    print(f"[sweep_kl] K={k} L={l}: {' '.join(cmd)}  (log: {log_path})", flush=True)
    start = time.time()
    if os.path.exists(os.path.join(out_dir, "metrics.json")):
        os.remove(os.path.join(out_dir, "metrics.json"))  # a fresh run: no stale evaluations
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-30:])
        raise RuntimeError(f"training K={k} L={l} failed (exit {proc.returncode}); end of {log_path}:\n{tail}")
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
