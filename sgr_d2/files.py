"""Reading weights files safely and writing any file atomically: the one place sgr_d2 does either.

**Reading** (:func:`read_weights`). A weights file is a pickle, and unpickling can run code: a
crafted ``.pkl`` or ``.pth`` downloaded from anywhere would run it at ``--eval-only``, at the
start of a training or in a tool. sgr_d2 reads every user file without that risk:

* ``.pkl`` (detectron2 and model-zoo pickles): a restricted unpickler that rebuilds only dicts,
  lists, tuples, strings, numbers and numpy arrays (:data:`PICKLE_GLOBALS` are the only globals
  it resolves);
* torch files (``.pth``, ``.pt``, ...): ``torch.load(weights_only=True)``;
* ``.safetensors``: the ``safetensors`` reader.

A file that needs anything else is refused with :class:`UnsafeWeightsError`, which says how to
trust it: ``SGR_D2_TRUSTED_WEIGHTS`` (paths separated by ``os.pathsep``) lists the files the
user vouches for; those are read with the full unpickler. A file that cannot be read at all
(truncated, not a checkpoint) raises :class:`WeightsReadError`. Both name the file.

**Writing** (:func:`atomic_write`). The bytes go to a temporary file beside the target, are
flushed to disk (``fsync``), and the temporary file is renamed over the target: a reader (or a
crash at any moment) sees the old file or the whole new one, never a part. Temporary files are
named ``.<name>.<random>.tmp`` and created with mode 0666 less the umask.

**Taking turns** (:func:`exclusive_lock`): an ``fcntl.flock`` that makes processes which
would write the same files (data generated or cached on first use, by every worker of a run)
wait for one another.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import re
import uuid
from typing import Callable, Dict, IO

__all__ = ["PICKLE_GLOBALS", "TRUST_VARIABLE", "UnsafeWeightsError", "WeightsReadError",
           "atomic_write", "atomic_write_text", "atomic_torch_save", "exclusive_lock", "read_weights"]

TRUST_VARIABLE = "SGR_D2_TRUSTED_WEIGHTS"

# The globals a weights pickle may name: numpy's array and scalar reconstruction (under numpy's
# 1.x and 2.x module names), the ordered dict of older state dicts, and the steps with which
# protocol 0-2 pickles store bytes. Nothing that can run code.
PICKLE_GLOBALS = frozenset({
    ("collections", "OrderedDict"), ("_codecs", "encode"),
    ("__builtin__", "bytes"), ("builtins", "bytes"),  # how protocols 0-2 store an empty array's data
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
})


class WeightsReadError(ValueError):
    """A weights file that cannot be read: truncated, corrupt, or not a checkpoint."""


class UnsafeWeightsError(ValueError):
    """A weights file whose reading would need code that could do anything (see the module doc)."""


def _trusted(path: str) -> bool:
    listed = [p for p in os.environ.get(TRUST_VARIABLE, "").split(os.pathsep) if p]
    return any(os.path.realpath(p) == os.path.realpath(path) for p in listed)


def _unsafe(path: str, what: str) -> UnsafeWeightsError:
    return UnsafeWeightsError(
        f"weights file {path}: reading it would need {what}, which sgr_d2 does not run: unpickling "
        "a file can execute code, so sgr_d2 reads only tensors, numpy arrays, dicts, lists, strings "
        f"and numbers from weights files. If you trust this file, list it in {TRUST_VARIABLE} "
        f"(e.g. `{TRUST_VARIABLE}={path} python train_net.py ...`) to read it with the full unpickler, "
        "or convert it once to a plain state dict: "
        f"`{TRUST_VARIABLE}={path} python tools/convert_checkpoint.py --input {path} --output <file.pth>`."
    )


class _WeightsUnpickler(pickle.Unpickler):
    def __init__(self, f, path: str):
        super().__init__(f, encoding="latin1")  # Python 2 pickles (detectron2's Caffe2 files)
        self._path = path

    def find_class(self, module, name):
        if (module, name) in PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise _unsafe(self._path, f"`{module}.{name}`")


def read_weights(path: str, *, mmap: bool = False) -> Dict:
    """The dict stored in the weights file ``path`` (see the module doc); ``mmap``: memory-map a
    torch file's tensors (cheap checks of large checkpoints)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist")
    trusted = _trusted(path)
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1") if trusted else _WeightsUnpickler(f, path).load()
        elif path.endswith(".safetensors"):
            from safetensors.torch import load_file

            data = load_file(path)
        else:
            import torch

            data = torch.load(path, map_location="cpu", weights_only=not trusted, mmap=mmap or None)
    except (UnsafeWeightsError, FileNotFoundError):
        raise
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch's weights_only unpickler refused a global
        if found:
            raise _unsafe(path, f"`{found.group(1)}`") from None
        raise WeightsReadError(f"weights file {path} cannot be read: it is truncated or not a checkpoint "
                               f"({type(e).__name__}: {e})") from e
    except Exception as e:  # torch's zip reader, pickle's EOF ...: the messages vary
        raise WeightsReadError(f"weights file {path} cannot be read: it is truncated or not a checkpoint "
                               f"({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise WeightsReadError(f"weights file {path} holds a {type(data).__name__}, not a dict of weights")
    return data


def _open_temporary(path: str, binary: bool):
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mkstemp would make it 0600
        except FileExistsError:  # pragma: no cover (a 48-bit collision)
            continue
        return os.fdopen(fd, "wb" if binary else "w"), tmp


def atomic_write(path: str, write: Callable[[IO], None], *, binary: bool = True) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, rename over ``path``. On any
    failure the temporary file is removed and ``path`` keeps its old content."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    f, tmp = _open_temporary(path, binary)
    try:
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """``text`` into ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


@contextlib.contextmanager
def exclusive_lock(lock_file: "str | os.PathLike"):
    """An exclusive ``fcntl.flock`` on ``lock_file`` (created if needed), across processes."""
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
