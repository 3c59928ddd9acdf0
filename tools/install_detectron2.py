#!/usr/bin/env python
"""Install detectron2 into the running Python environment, from PyPI, when it is missing.

detectron2's authors publish nothing on PyPI. The registry does hold ``pb1-detectron2==0.6``,
an sdist with detectron2 v0.6's Python files (identical to upstream's tag v0.6) but without
the C++/CUDA sources its ``setup.py`` tries to compile, so ``pip install`` of it fails.

This script:
  1. does nothing when ``import detectron2`` already works (a user's own build of upstream
     main or v0.6 is kept as it is);
  2. otherwise asks pip to download that sdist (pip checks the registry's hash; we check it
     again against ``SHA256`` below), extracts only its ``detectron2/`` Python package, and
     installs it with pip as the distribution ``detectron2`` version 0.6, with no C++ extension.

What the missing extension means at run time (``detectron2._C``: rotated boxes, deformable
convolution, the fast COCO evaluation) is handled by ``sgr_d2/compat.py``.
"""
import argparse
import hashlib
import importlib.util
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REQUIREMENT = "pb1-detectron2==0.6"
SDIST_NAME = "pb1-detectron2-0.6.tar.gz"
SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
PACKAGE_PREFIX = "pb1-detectron2-0.6/detectron2/"

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "detectron2"
version = "0.6"
description = "detectron2 v0.6 Python sources from the PyPI sdist pb1-detectron2==0.6, without C++ ops"
requires-python = ">=3.7"

[tool.setuptools.packages.find]
include = ["detectron2*"]

[tool.setuptools.package-data]
"*" = ["*.yaml", "*.py"]
"""


def _pip(*args):
    subprocess.check_call([sys.executable, "-m", "pip", *args])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def install(sdist: Path | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="sgr_d2_detectron2_") as tmp:
        tmp = Path(tmp)
        if sdist is None:
            # --no-build-isolation: the sdist's setup.py imports torch to prepare metadata.
            _pip("download", "--no-deps", "--no-build-isolation", "-d", str(tmp), REQUIREMENT)
            sdist = tmp / SDIST_NAME
        if not sdist.is_file():
            raise SystemExit(f"install_detectron2: expected the sdist at {sdist}, found nothing")
        digest = _sha256(sdist)
        if digest != SHA256:
            raise SystemExit(
                f"install_detectron2: {sdist} has sha256 {digest}, expected {SHA256}; refusing it"
            )
        src = tmp / "src"
        src.mkdir()
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(PACKAGE_PREFIX) and m.isfile()]
            if not members:
                raise SystemExit(f"install_detectron2: {sdist} holds no {PACKAGE_PREFIX} files")
            for m in members:
                m.name = m.name[len("pb1-detectron2-0.6/"):]
            tar.extractall(src, members=members, filter="data")
        (src / "pyproject.toml").write_text(PYPROJECT)
        _pip("install", "--no-deps", "--no-build-isolation", str(src))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help="use this local pb1-detectron2-0.6.tar.gz")
    parser.add_argument("--force", action="store_true", help="install even if detectron2 imports")
    args = parser.parse_args(argv)
    spec = importlib.util.find_spec("detectron2")
    if spec is not None and not args.force:
        print(f"install_detectron2: keeping the detectron2 already installed at {spec.origin}")
        return
    install(args.sdist)
    print("install_detectron2: installed detectron2 0.6 (Python sources; no C++ ops)")


if __name__ == "__main__":
    main()
