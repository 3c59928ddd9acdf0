"""A DetectionCheckpointer whose files are never left half-written, with clear load errors."""
from __future__ import annotations

import logging
import os
import re
import uuid

import torch

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["AtomicCheckpointer", "CheckpointMismatchError", "atomic_torch_save", "read_checkpoint",
           "MIN_FITTING_FRACTION"]

logger = logging.getLogger(__name__)

# A weights file is refused when fewer than this fraction of its tensors fit the model (same name,
# same shape). A converted ImageNet backbone fits entirely (the head and SGR keys it lacks are
# the model's, not the file's); a checkpoint of another architecture or width mostly does not.
MIN_FITTING_FRACTION = 0.5


def _is_weight(key: str) -> bool:
    """Tensors that count: not pixel_mean/std (set from the config; detectron2 ignores them too)
    nor BatchNorm's num_batches_tracked (torch fills it in when a file lacks it)."""
    return key not in ("pixel_mean", "pixel_std") and not key.endswith("num_batches_tracked")

WEIGHTS_HELP = (
    "MODEL.WEIGHTS must be a local file: sgr_d2 never downloads weights. Convert an ImageNet "
    "ResNet (torchvision) or Swin-T (timm) state dict you have on disk with "
    "`python tools/convert_pretrained.py --input <file> --output <file.pkl>`, or give a "
    "checkpoint written by train_net.py (MODEL.WEIGHTS \"\" trains from scratch)."
)


def _open_temporary(path: str, binary: bool):
    """A new file beside ``path``, named ``.<basename>.<random>.tmp``, created with mode 0666
    less the umask (like every other output; ``tempfile.mkstemp`` would make it 0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # pragma: no cover (a 48-bit collision)
            continue
        return os.fdopen(fd, "wb" if binary else "w"), tmp


def _atomic_write(path: str, write, binary: bool) -> None:
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


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    _atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def _atomic_write_text(text: str, path: str) -> None:
    _atomic_write(path, lambda f: f.write(text), binary=False)


# What an interrupted write of this module leaves: ``.<name>.pth.<random>.tmp`` or
# ``.last_checkpoint.<random>.tmp`` (also the names of the earlier ``tempfile.mkstemp`` version).
_TEMPORARY = re.compile(r"^\.(?:.+\.pth|last_checkpoint)\.[A-Za-z0-9_]+\.tmp$")


def read_checkpoint(path: str):
    """The checkpoint's dict, its tensors memory-mapped (cheap even for large files). Raises for
    a file that is missing, truncated or not a torch checkpoint."""
    obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


class CheckpointMismatchError(ValueError):
    """A weights file whose tensors mostly do not fit the model (another architecture)."""


def _head(names, n=8):
    names = list(names)
    more = f" ... and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more if names else "none"


class AtomicCheckpointer(DetectionCheckpointer):
    """``save`` writes a temporary file and renames it, and tags ``last_checkpoint`` only after
    the rename, so a crash at any moment leaves the previous checkpoint and tag intact.
    ``load`` of a missing file says how to obtain weights, and ``load`` of a file whose tensors
    mostly do not fit the model (fewer than ``MIN_FITTING_FRACTION`` of them match a model key
    by name and shape: a checkpoint of another architecture) raises
    :class:`CheckpointMismatchError` naming the file and the keys, where detectron2 only warns.
    The model is then partly loaded and should be discarded.

    ``resume_or_load(resume=True)`` resumes from the file ``last_checkpoint`` names or, when that
    file is missing or unreadable (truncated), from the newest readable checkpoint of the folder,
    with a warning. ``saved`` lists the files this checkpointer wrote, ``resumed_from`` the file
    it resumed from (``None`` if it did not resume)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saved = []
        self.resumed_from = None

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        os.makedirs(self.save_dir, exist_ok=True)
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)
        if save_file in self.saved:
            self.saved.remove(save_file)
        self.saved.append(save_file)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        _atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))

    def remove_stale_temporaries(self):
        """Delete the temporary files that interrupted saves left in ``save_dir`` (main process
        only); returns their paths."""
        if not self.save_dir or not self.save_to_disk or not os.path.isdir(self.save_dir):
            return []
        removed = []
        for name in sorted(os.listdir(self.save_dir)):
            path = os.path.join(self.save_dir, name)
            if _TEMPORARY.match(name) and os.path.isfile(path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                removed.append(path)
        if removed:
            logger.warning("Removed %d temporary file(s) left by interrupted checkpoint writes: %s",
                           len(removed), ", ".join(removed))
        return removed

    def load(self, path: str, *args, **kwargs):
        if path and "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(f"MODEL.WEIGHTS file {path} does not exist. {WEIGHTS_HELP}")
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None

    def resume_or_load(self, path: str, *, resume: bool = True):
        if resume and self.has_checkpoint():
            last = self._resume_file()
            self.resumed_from = last
            return self.load(last)
        return self.load(path, checkpointables=[])

    def _resume_file(self) -> str:
        """The file ``last_checkpoint`` names if it can be read, else the newest readable
        checkpoint (highest iteration) of ``save_dir``, with a warning."""
        last = self.get_checkpoint_file()
        if "://" in last:
            return last
        tag = os.path.join(self.save_dir, "last_checkpoint")
        name = os.path.basename(last) or "nothing"
        if not os.path.isfile(last):
            problem = f"{tag} names {name}, but {last} does not exist: it was deleted or moved after it was saved"
        else:
            try:
                read_checkpoint(last)
                return last
            except Exception as e:  # truncated or corrupt: torch's unpickling/zip errors vary
                problem = f"{tag} names {name}, but {last} cannot be read ({type(e).__name__}: {e})"
        fallback = self._newest_readable(exclude=last)
        if fallback is None:
            raise FileNotFoundError(
                f"{problem}, and no other checkpoint of {self.save_dir} can be read. Write the name of "
                "an existing checkpoint of this folder into last_checkpoint, or delete last_checkpoint "
                "to start from MODEL.WEIGHTS."
            )
        path, iteration = fallback
        logger.warning("%s. Resuming from %s instead (iteration %s), the newest readable checkpoint "
                       "of %s.", problem, path, iteration, self.save_dir)
        return path

    def _newest_readable(self, exclude: str):
        found = []
        for name in os.listdir(self.save_dir):
            path = os.path.join(self.save_dir, name)
            if not name.endswith(".pth") or name.startswith(".") or path == exclude:
                continue
            try:
                ckpt = read_checkpoint(path)
            except Exception as e:
                logger.warning("Skipping checkpoint %s, which cannot be read (%s: %s)", path,
                               type(e).__name__, e)
                continue
            if "model" in ckpt:
                found.append((int(ckpt.get("iteration", -1)), os.path.getmtime(path), path))
        if not found:
            return None
        iteration, _, path = max(found)
        return path, iteration

    def _load_model(self, checkpoint):
        state = checkpoint.get("model", {})
        ckpt = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape") and _is_weight(k)}
        model_shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items() if _is_weight(k)}
        heuristics = bool(checkpoint.get("matching_heuristics", False))
        incompatible = super()._load_model(checkpoint)
        missing = set(incompatible.missing_keys)
        loaded = [k for k in model_shapes if k not in missing]
        if ckpt and len(loaded) >= MIN_FITTING_FRACTION * len(ckpt):
            return incompatible
        raise CheckpointMismatchError(self._mismatch_message(ckpt, model_shapes, loaded, heuristics))

    def _mismatch_message(self, ckpt, model_shapes, loaded, heuristics: bool) -> str:
        path = getattr(self, "_loading", None) or "the checkpoint"
        if not ckpt:
            return f"weights file {path} holds no tensors under 'model'. {WEIGHTS_HELP}"

        def fits(ckpt_key, model_key):
            # detectron2's name matching: exact; or as a suffix for files with matching_heuristics
            # (converted ImageNet .pkl files)
            return model_key == ckpt_key or (heuristics and model_key.endswith("." + ckpt_key))

        used = set(loaded)
        wrong_shape, unexpected = [], []
        for key, shape in ckpt.items():
            if any(fits(key, m) for m in used):
                continue
            same_name = [m for m in model_shapes if fits(key, m) and model_shapes[m] != shape]
            if same_name:
                wrong_shape.append(f"{key} {list(shape)} (model {same_name[0]}: "
                                   f"{list(model_shapes[same_name[0]])})")
            else:
                unexpected.append(key)
        missing = [k for k in model_shapes if k not in used]
        return (
            f"weights file {path} does not fit the {type(self.model).__name__} model: only "
            f"{len(loaded)} of its {len(ckpt)} weight tensors match a parameter or buffer of the model by "
            f"name and shape; at least {MIN_FITTING_FRACTION:.0%} must. It looks like a checkpoint of "
            "another architecture or config (backbone, depth, width, SGR on/off).\n"
            f"  keys of the file the model does not have ({len(unexpected)}): {_head(unexpected)}\n"
            f"  keys with another shape ({len(wrong_shape)}): {_head(wrong_shape)}\n"
            f"  keys of the model left uninitialised ({len(missing)} of {len(model_shapes)}): "
            f"{_head(missing)}\n{WEIGHTS_HELP}"
        )
