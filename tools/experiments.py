#!/usr/bin/env python
"""Train a config in a child process and read back what it measured: the one runner behind
``tools/demo_toy.py``, ``tools/sweep_kl.py`` and ``tools/compare_sgr.py`` (a module they import
with ``tools/`` on ``sys.path``; the benches import its memory readers the same way).

:func:`train_and_evaluate` runs ``python tools/experiments.py --config-file C [--tta]
OPTS``: the body of ``train_net.py`` (:func:`sgr_d2.engine.trainer.run`, one worker), which
trains and ends with the config's evaluation (logged to ``<OUTPUT_DIR>/metrics.json``); with
``--tta`` the child then evaluates ``model_final.pth`` with multi-scale + flip
(``Trainer.test_with_TTA``) and writes it to ``<OUTPUT_DIR>/results_TTA.json``. Before that
evaluation it writes its peak memory to ``<OUTPUT_DIR>/peak_memory.json``: the resident-set
high-water mark of the training process (``VmHWM``; data-loader workers are processes of their
own and not included) and, on a GPU, ``torch.cuda.max_memory_allocated``.

Read back: the last evaluation in ``metrics.json`` (:func:`read_last_evaluation`), the training
step time (:func:`median_step_time`: the median of the ``time`` values detectron2 logs every 20
iterations, each itself the median of the last 20 steps — forward, backward and update, data
waiting excluded as ``data_time``; the first 3 iterations are not timed).
"""
from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

REPO = str(Path(__file__).resolve().parents[1])
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from sgr_d2.evaluation.token_semantics import METRIC_KEYS  # noqa: E402
from sgr_d2.files import atomic_write_text  # noqa: E402

__all__ = ["peak_rss_mib", "read_last_evaluation", "read_final_metrics", "median_step_time",
           "train_and_evaluate"]


def proc_status_mib(field: str) -> float:
    """A memory field of this process's ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in MiB.
    Raises OSError where /proc has no such field."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise OSError(f"no {field} in /proc/self/status")


def peak_rss_mib() -> float:
    """This process's peak resident memory (MiB). /proc's VmHWM belongs to this process alone;
    getrusage's ru_maxrss can carry a forking parent's larger peak across exec."""
    try:
        return proc_status_mib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _metrics_lines(output_dir: str):
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: the run did not finish its evaluation")
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not JSON ({e})") from e


def read_last_evaluation(output_dir: str) -> Dict[str, float]:
    """Every value of the last evaluation (the last line holding ``sem_seg/mIoU``) of
    ``<output_dir>/metrics.json``, keyed as logged (``sem_seg/IoU-<class>``, ``token_semantics/S_C``...)."""
    last = None
    for rec in _metrics_lines(output_dir):
        if "sem_seg/mIoU" in rec:
            last = rec
    if last is None:
        raise ValueError(f"{os.path.join(output_dir, 'metrics.json')} holds no evaluation "
                         "('sem_seg/mIoU' in no line)")
    return {k: float(v) for k, v in last.items() if k != "iteration"}


def read_final_metrics(output_dir: str) -> dict:
    """mIoU and S_C, D_C, S_I, D_I (nan when absent) of the last evaluation of a run."""
    last = read_last_evaluation(output_dir)
    out = {"mIoU": last["sem_seg/mIoU"]}
    for k in METRIC_KEYS:
        out[k] = last.get(f"token_semantics/{k}", math.nan)
    return out


def median_step_time(output_dir: str) -> float:
    """Median of the ``time`` values logged in ``<output_dir>/metrics.json`` (seconds per step);
    NaN when none is (a run of 3 iterations or fewer: detectron2 does not time the first 3)."""
    times = [float(rec["time"]) for rec in _metrics_lines(output_dir) if "time" in rec]
    return statistics.median(times) if times else math.nan


def train_and_evaluate(config_file: str, opts: Sequence[str], output_dir: str, *, tta: bool = False,
                       num_gpus: int = 1, log_file: Optional[str] = "train_stdout.log",
                       cwd: Optional[str] = None, threads: Optional[int] = None) -> dict:
    """Train ``config_file`` with ``opts`` into ``output_dir`` in a child process (a fresh run:
    an earlier ``metrics.json`` there is removed) and return ``{"metrics": last evaluation,
    "metrics_TTA": multi-scale + flip evaluation or None, "step_time_s", "peak_rss_mib",
    "peak_cuda_mib" (None on the CPU), "wall_s"}`` (peak memory None with several GPUs). The child's output goes to
    ``<output_dir>/<log_file>`` (``None``: this process's terminal). ``threads``: the child's
    intra-op thread count (``OMP_NUM_THREADS``; None: inherited). A failed run raises
    ``RuntimeError`` with the end of its log."""
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    for stale in ("metrics.json", "peak_memory.json", "results_TTA.json", "wall_time.json"):
        if os.path.exists(os.path.join(output_dir, stale)):
            os.remove(os.path.join(output_dir, stale))
    # with --tta the child evaluates multi-scale + flip itself, once, after training
    cmd = [sys.executable, str(Path(__file__).resolve()), "--config-file", config_file,
           "--num-gpus", str(num_gpus), *(["--tta"] if tta else []), *opts, *(["TEST.AUG.ENABLED", "False"] if tta else []),
           "OUTPUT_DIR", output_dir]
    env = dict(os.environ)
    # so that the child imports this sgr_d2
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(int(threads))
    start = time.time()
    if log_file is None:
        proc = subprocess.run(cmd, cwd=cwd, env=env)
        log_path = None
    else:
        log_path = os.path.join(output_dir, log_file)
        with open(log_path, "w") as log:
            log.write("+ " + " ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    wall = time.time() - start
    if proc.returncode != 0:
        tail = ""
        if log_path:
            with open(log_path) as f:
                tail = "; end of " + log_path + ":\n" + "".join(f.readlines()[-30:])
        raise RuntimeError(f"training {config_file} {' '.join(opts)} failed (exit {proc.returncode}){tail}")
    with open(os.path.join(output_dir, "wall_time.json"), "w") as f:
        json.dump({"wall_s": wall}, f)
    return read_run(output_dir, tta=tta)


def read_run(output_dir: str, *, tta: bool = False) -> dict:
    """What :func:`train_and_evaluate` returns, read from a finished run's folder (``wall_s``:
    the wall time it recorded in ``wall_time.json``; NaN for a run without one)."""
    wall_file = os.path.join(output_dir, "wall_time.json")
    wall_s = float(json.loads(Path(wall_file).read_text())["wall_s"]) if os.path.isfile(wall_file) else math.nan
    peak_file = os.path.join(output_dir, "peak_memory.json")
    if not os.path.isfile(peak_file):
        raise FileNotFoundError(f"{peak_file} does not exist: the run did not finish")
    peak = json.loads(Path(peak_file).read_text())
    metrics_tta = None
    if tta:
        tta_file = os.path.join(output_dir, "results_TTA.json")
        if not os.path.isfile(tta_file):
            raise FileNotFoundError(f"{tta_file} does not exist: the multi-scale evaluation did not finish")
        metrics_tta = json.loads(Path(tta_file).read_text())
    return {"metrics": read_last_evaluation(output_dir), "metrics_TTA": metrics_tta,
            "step_time_s": median_step_time(output_dir), "peak_rss_mib": peak["peak_rss_mib"],
            "peak_cuda_mib": peak.get("peak_cuda_mib"), "wall_s": wall_s}


def _flatten(results: dict) -> Dict[str, float]:
    """detectron2's nested results ({"sem_seg_TTA": {"mIoU": ...}}) as ``"sem_seg_TTA/mIoU"``."""
    from detectron2.evaluation.testing import flatten_results_dict

    return {k: float(v) for k, v in flatten_results_dict(results).items()}


def _child(argv=None):
    """``python tools/experiments.py [--tta] <train_net.py arguments>``."""
    import sgr_d2  # noqa: F401  (compat shims and registrations first)
    import torch
    from detectron2.modeling import build_model

    from sgr_d2.config import load_config, pick_device
    from sgr_d2.engine.checkpoint import load_weights
    from sgr_d2.engine.trainer import Trainer, argument_parser, run

    parser = argument_parser()  # train_net.py's
    parser.add_argument("--tta", action="store_true", help="then evaluate with multi-scale + flip")
    args = parser.parse_args(argv)
    if args.num_machines > 1 or args.eval_only:
        raise SystemExit("tools/experiments.py trains on one machine; use train_net.py for more")
    # train, then evaluate as the config says (into metrics.json), as train_net.py does
    if args.num_gpus > 1:  # the workers are processes of their own: their memory is not measured
        from sgr_d2.engine.workers import launch

        launch(run, args.num_gpus, num_machines=1, machine_rank=0, dist_url=args.dist_url, args=(args,))
        peak = {"peak_rss_mib": None, "peak_cuda_mib": None}
    else:
        run(args)
        peak = {"peak_rss_mib": peak_rss_mib(),
                "peak_cuda_mib": (torch.cuda.max_memory_allocated() / 2**20
                                  if torch.cuda.is_available() and torch.cuda.is_initialized() else None)}
    cfg = load_config(args.config_file, args.opts)
    pick_device(cfg)
    if args.tta:
        model = build_model(cfg)
        load_weights(cfg, model, os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
        model.eval()
        res = _flatten(Trainer.test_with_TTA(cfg, model))
        atomic_write_text(os.path.join(cfg.OUTPUT_DIR, "results_TTA.json"), json.dumps(res, indent=1))
    atomic_write_text(os.path.join(cfg.OUTPUT_DIR, "peak_memory.json"), json.dumps(peak))


if __name__ == "__main__":
    _child()
