"""Everything sgr_d2 does to run on both detectron2 v0.6 and upstream main, on today's libraries.

sgr_d2 supports two detectron2 installs, which both report ``__version__ == "0.6"``:

* detectron2 v0.6 as ``tools/install_detectron2.py`` installs it from PyPI (the Python files of
  the sdist ``pb1-detectron2==0.6``, identical to upstream's tag v0.6, with no C++ extension);
* a user's own build of upstream main (or of v0.6 with its extension).

Each shim below checks whether it is needed and does nothing otherwise; ``apply()`` runs them
all and returns the names of those that acted. It is called by ``import sgr_d2`` *before* any
detectron2 sub-module is imported, because two of the problems strike at import time.

1. ``detectron2._C`` missing (Python-only install). ``detectron2.layers`` imports it at import
   time. We register a stub module: detectron2's own environment report reads it as "not built",
   and calling any op in it (rotated boxes, deformable convolution, ``ROIAlignRotated``, the fast
   COCO evaluation ``COCOeval_opt``) raises ``MissingCppOpError`` naming the op. sgr_d2 never
   calls them (``COCOEvaluator`` is built with ``use_fast_impl=False`` when the stub is active).
2. ``PIL.Image.LINEAR`` removed in Pillow 10. detectron2 v0.6 uses it as a default argument of
   ``ExtentTransform``, evaluated at import. We alias it to ``Image.BILINEAR`` (the same filter).
3. ``np.int`` / ``np.float`` / ``np.bool`` removed in NumPy 1.24 (``np.bool`` is back in 2.0).
   detectron2 v0.6 uses them in ``SemSegEvaluator`` and ``BitMasks``. We alias each missing name
   to the builtin it stood for, only when the installed detectron2's files still use them.
4. ``detectron2.engine.launch`` in v0.6 asserts CUDA and hard-codes the NCCL backend, so several
   worker processes cannot run on a CPU (upstream main picks gloo itself). The launcher,
   :func:`sgr_d2.engine.workers.launch`, uses detectron2's whenever it can and, only without CUDA
   and when detectron2's worker is seen to need it (:func:`launch_needs_cuda` below: v0.6),
   starts the workers itself with gloo.
5. ``np.in1d`` removed in NumPy 2.4. cityscapesscripts (2.3.0) still calls it in its pixel- and
   instance-level evaluations, which detectron2's ``CityscapesSemSegEvaluator`` and
   ``CityscapesInstanceEvaluator`` run. We define it as NumPy documented it: ``np.isin(...)``
   flattened, only when it is missing and the installed cityscapesscripts uses it. The same
   instance evaluation writes counts that NumPy 2 returns as NumPy integers (``np.count_nonzero``)
   with ``csHelpers.writeDict2JSON``, whose ``default`` cannot encode them; we let that function
   write NumPy scalars as the Python numbers they hold, only when ``np.count_nonzero`` returns
   one (before the evaluation module imports the function, as detectron2 imports it lazily).
6. ``torch.load`` defaults to ``weights_only=True`` since torch 2.6; detectron2 checkpoints hold
   only tensors, numbers, strings and containers, which that mode accepts, so nothing is needed.
   ``detectron2.model_zoo`` needs ``pkg_resources`` (gone from recent setuptools); sgr_d2 never
   imports the model zoo, so nothing is done about it either.
"""
from __future__ import annotations

import builtins
import functools
import importlib.machinery
import importlib.util
import logging
import sys
import types
from pathlib import Path

import numpy as np

__all__ = ["apply", "MissingCppOpError", "launch_needs_cuda", "cpp_ops_available", "applied"]

logger = logging.getLogger(__name__)

_APPLIED: list[str] = []


class MissingCppOpError(RuntimeError):
    """Raised when code calls a detectron2 C++ op that this detectron2 install does not have."""


def _missing_op(name: str):
    def op(*args, **kwargs):
        raise MissingCppOpError(
            f"detectron2._C.{name} is not available: this detectron2 was installed without its "
            "C++ extension (Python sources only, see tools/install_detectron2.py). sgr_d2 does not "
            "use rotated boxes, deformable convolution or COCOeval_opt; to use them, build "
            "detectron2 from source in this environment."
        )

    op.__name__ = name
    return op


def _stub_c_module() -> types.ModuleType:
    mod = types.ModuleType("detectron2._C", "Stub for detectron2's missing C++ extension (sgr_d2.compat)")
    mod.__spec__ = importlib.machinery.ModuleSpec("detectron2._C", None, origin="sgr_d2.compat stub")
    mod.__file__ = __file__
    mod.SGR_D2_STUB = True
    mod.get_compiler_version = lambda: "none (Python-only detectron2; sgr_d2.compat stub)"
    mod.get_cuda_version = lambda: "none (Python-only detectron2; sgr_d2.compat stub)"
    mod.has_cuda = lambda: False

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing_op(name)

    mod.__getattr__ = __getattr__
    return mod


def _shim_c_extension() -> bool:
    if "detectron2._C" in sys.modules:
        return False
    import detectron2  # the package __init__ does not import _C

    if importlib.util.find_spec("detectron2._C") is not None:
        return False
    stub = _stub_c_module()
    sys.modules["detectron2._C"] = stub
    detectron2._C = stub
    return True


def cpp_ops_available() -> bool:
    """True when detectron2's real C++ extension is importable (not our stub)."""
    mod = sys.modules.get("detectron2._C")
    if mod is None:
        return importlib.util.find_spec("detectron2._C") is not None
    return not getattr(mod, "SGR_D2_STUB", False)


def _shim_pil_linear() -> bool:
    from PIL import Image

    if hasattr(Image, "LINEAR"):
        return False
    Image.LINEAR = Image.BILINEAR
    return True


_NUMPY_ALIASES = {"int": builtins.int, "float": builtins.float, "bool": builtins.bool}
# detectron2 v0.6 files that use the removed aliases (relative to the detectron2 package).
_NUMPY_ALIAS_USERS = ("evaluation/sem_seg_evaluation.py", "structures/masks.py")


def _detectron2_uses_numpy_aliases(missing: list[str]) -> bool:
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return False
    root = Path(list(spec.submodule_search_locations)[0])
    for rel in _NUMPY_ALIAS_USERS:
        path = root / rel
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if any(f"np.{name})" in text or f"np.{name}," in text for name in missing):
            return True
    return False


def _shim_numpy_aliases() -> bool:
    missing = [name for name in _NUMPY_ALIASES if name not in np.__dict__]
    if not missing or not _detectron2_uses_numpy_aliases(missing):
        return False
    for name in missing:
        setattr(np, name, _NUMPY_ALIASES[name])
    return True


# cityscapesscripts files that call np.in1d (relative to the cityscapesscripts package)
_IN1D_USERS = ("evaluation/evalPixelLevelSemanticLabeling.py", "evaluation/evalInstanceLevelSemanticLabeling.py")


def _in1d(ar1, ar2, assume_unique=False, invert=False, *, kind=None):
    """NumPy's former ``in1d``: ``isin`` on the flattened ``ar1``."""
    return np.isin(np.ravel(ar1), ar2, assume_unique=assume_unique, invert=invert, kind=kind)


def _shim_numpy_in1d() -> bool:
    if "in1d" in np.__dict__:
        return False
    spec = importlib.util.find_spec("cityscapesscripts")
    if spec is None or not spec.submodule_search_locations:
        return False
    root = Path(list(spec.submodule_search_locations)[0])
    if not any("np.in1d(" in (root / rel).read_text(encoding="utf-8", errors="replace")
               for rel in _IN1D_USERS if (root / rel).is_file()):
        return False
    np.in1d = _in1d
    return True


def _json_default(obj):
    """cityscapesscripts' JSON ``default`` (an object's ``__dict__``), NumPy scalars as numbers."""
    return obj.item() if isinstance(obj, np.generic) else obj.__dict__


def _write_dict_to_json(dict_name, file_name):
    import json

    with open(file_name, "w") as f:
        f.write(json.dumps(dict_name, default=_json_default, sort_keys=True, indent=4))


def _shim_cityscapes_json() -> bool:
    if isinstance(np.count_nonzero(np.ones(1, dtype=bool)), int):
        return False
    if importlib.util.find_spec("cityscapesscripts") is None:
        return False
    from cityscapesscripts.helpers import csHelpers

    csHelpers.writeDict2JSON = _write_dict_to_json
    evaluation = sys.modules.get("cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling")
    if evaluation is not None:  # imported before sgr_d2: its star import bound the old function
        evaluation.writeDict2JSON = _write_dict_to_json
    return True


def apply() -> list[str]:
    """Apply every shim that is needed; return the names of those that acted (idempotent)."""
    for name, shim in (
        ("detectron2._C stub", _shim_c_extension),
        ("PIL.Image.LINEAR", _shim_pil_linear),
        ("numpy type aliases", _shim_numpy_aliases),
        ("numpy.in1d", _shim_numpy_in1d),
        ("cityscapesscripts JSON of NumPy scalars", _shim_cityscapes_json),
    ):
        if name not in _APPLIED and shim():
            _APPLIED.append(name)
            logger.debug("sgr_d2.compat: applied %s", name)
    return list(_APPLIED)


def applied() -> list[str]:
    return list(_APPLIED)


# --------------------------------------------------------------------------- launch (shim 4)
class _BackendChosen(Exception):
    def __init__(self, backend):
        super().__init__(backend)
        self.backend = str(backend)


@functools.lru_cache(maxsize=None)
def launch_needs_cuda() -> bool:
    """True when the installed detectron2 launcher cannot run several workers without CUDA.

    Decided by behaviour, not by reading source: detectron2's worker entry point
    (``detectron2.engine.launch._distributed_worker``) is called once in this process with
    ``torch.cuda.is_available()`` made False and ``torch.distributed.init_process_group``
    replaced by a probe that records the backend and stops the worker there (no process group,
    no side effect). v0.6 asserts CUDA before that point; upstream main asks for "GLOO". Anything
    else than a CPU backend (an assertion, "NCCL", no such entry point) counts as needing CUDA.
    """
    import importlib

    import torch
    import torch.distributed as dist

    launch_mod = importlib.import_module("detectron2.engine.launch")
    worker = getattr(launch_mod, "_distributed_worker", None)
    if worker is None:
        return True

    def probe(backend=None, *args, **kwargs):
        raise _BackendChosen(backend)

    launch_logger = logging.getLogger(launch_mod.__name__)
    saved = torch.cuda.is_available, dist.init_process_group, launch_logger.disabled
    torch.cuda.is_available, dist.init_process_group = (lambda: False), probe
    launch_logger.disabled = True  # upstream logs the URL of a failed init as an error
    try:
        worker(0, lambda *a: None, 2, 2, 0, "tcp://127.0.0.1:1", ())
    except _BackendChosen as chosen:
        return chosen.backend.lower() != "gloo"
    except Exception:  # noqa: BLE001  (v0.6: AssertionError "cuda is not available")
        return True
    finally:
        torch.cuda.is_available, dist.init_process_group, launch_logger.disabled = saved
    return True
