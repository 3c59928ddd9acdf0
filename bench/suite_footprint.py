#!/usr/bin/env python3
"""Wall time, CPU time and disk footprint of the test suite: peak and left-over size of its temporary files.

Runs pytest (by default the whole suite, slow tests included, in ``--workers`` pytest-xdist
processes, each file in one: ``make test``'s command) with a private ``--basetemp`` and a private
TMPDIR, in which the toy datasets are generated afresh as on a new clone, samples their size every
``--every`` seconds and prints a table: wall time, pytest's exit status, peak and left-over MiB. Passing tests' ``tmp_path``
folders are removed as they end (``tmp_path_retention_policy = "failed"`` in pyproject.toml) and
module fixtures remove theirs, so the peak is the largest single test, not the sum of all.

    python bench/suite_footprint.py                       # the whole suite, as make test runs it
    python bench/suite_footprint.py --workers 1           # in one process
    python bench/suite_footprint.py -- tests/test_published_models.py   # more pytest arguments after --
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tree_bytes(root: str) -> int:
    """Bytes of the regular files under ``root`` (files may vanish while it walks)."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    p.add_argument("--workers", type=int, default=2, help="pytest-xdist processes (make test's TEST_WORKERS; 1: none)")
    p.add_argument("pytest_args", nargs="*", help="more arguments for pytest (default: the whole suite)")
    args = p.parse_args()
    pytest_args = ["-m", "slow or not slow", *args.pytest_args]  # slow tests too, unless another -m follows
    if args.workers > 1:
        pytest_args += ["-n", str(args.workers), "--dist", "loadfile", "--no-loadscope-reorder"]
    with tempfile.TemporaryDirectory(prefix="sgr_d2_footprint_") as root:
        basetemp, tmpdir = os.path.join(root, "basetemp"), os.path.join(root, "tmp")
        os.makedirs(tmpdir)
        env = dict(os.environ, TMPDIR=tmpdir)
        env.pop("DETECTRON2_DATASETS", None)  # the tests' own generated toy data counts too (under TMPDIR)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={basetemp}",
               *pytest_args]
        t0 = time.perf_counter()
        with tempfile.TemporaryFile("w+") as log:  # pytest's output, outside the measured folder
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            peak = 0
            while proc.poll() is None:
                peak = max(peak, tree_bytes(root))
                time.sleep(args.every)
            wall = time.perf_counter() - t0
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # pytest, its workers and their children
            left = tree_bytes(root)
            peak = max(peak, left)
            if proc.returncode:
                log.seek(0)
                print("".join(log.readlines()[-30:]), file=sys.stderr)
    mib = 1 << 20
    print(f"\n### Test-suite disk footprint: pytest {' '.join(pytest_args)}\n")
    print("| wall (s) | CPU (s) | pytest exit | peak temporary files (MiB) | left over at the end (MiB) |")
    print("|---|---|---|---|---|")
    print(f"| {wall:.0f} | {usage.ru_utime + usage.ru_stime:.0f} | {proc.returncode} | {peak / mib:.0f} | {left / mib:.1f} |")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
