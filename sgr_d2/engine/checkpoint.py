"""A DetectionCheckpointer whose files are never left half-written, with clear load errors."""
from __future__ import annotations

import os
import tempfile

import torch

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["AtomicCheckpointer", "CheckpointMismatchError", "atomic_torch_save", "MIN_FITTING_FRACTION"]

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


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_text(text: str, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    The model is then partly loaded and should be discarded."""

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

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        _atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))

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
            last = self.get_checkpoint_file()
            if "://" not in last and not os.path.isfile(last):
                tag = os.path.join(self.save_dir, "last_checkpoint")
                raise FileNotFoundError(
                    f"{tag} names {os.path.basename(last)}, but {last} does not exist: it was "
                    "deleted or moved after it was saved. Write the name of an existing checkpoint "
                    "of this folder into last_checkpoint, or delete last_checkpoint to start from "
                    "MODEL.WEIGHTS."
                )
        return super().resume_or_load(path, resume=resume)

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
