"""A DetectionCheckpointer whose files are never left half-written, and whose loads are checked.

Every load (``MODEL.WEIGHTS`` for training, ``--eval-only``, ``--resume``, the demo, the tools)
goes through :meth:`AtomicCheckpointer.load`:

1. the file is read by :func:`sgr_d2.files.read_weights` (no code runs while it is read; a file
   that cannot be read is an error naming it), in detectron2's formats: model-zoo pickles
   ``{"model": ..., "__author__": ...}``, Caffe2 pickles (a dict of blobs), torch checkpoints;
2. tensors that official MaskFormer / Mask2Former files carry but no sgr_d2 model has
   (:data:`OFFICIAL_ONLY`) are set aside: sgr_d2's modules carry the official names, so an
   official file loads with no renaming; a file of the older MaskFormerHead layout (pixel
   decoder directly under ``sem_seg_head.``) is read as the official code reads it
   (:func:`sgr_d2.modeling.maskformer.upgrade_head_layouts`, decided by the keys);
3. files with ``matching_heuristics`` (converted ImageNet pickles, detectron2's Caffe2
   ``R-50.pkl``) are matched by detectron2's ``align_and_update_state_dicts``; a checkpoint of a
   model without SGR (``backbone.*``) goes under the SGR wrapper (``backbone.backbone.*``);
4. the fit check (:mod:`sgr_d2.engine.weights_fit`) refuses a file that leaves tensors of the
   model without a value, naming the missing groups, *before* anything is loaded.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from detectron2.checkpoint import DetectionCheckpointer

from ..files import atomic_torch_save, atomic_write_text, read_weights
from .weights_fit import CheckpointMismatchError, FitReport, check_fit, format_groups, mismatch_message, model_parts

logger = logging.getLogger(__name__)

__all__ = ["AtomicCheckpointer", "CheckpointMismatchError", "LoadSummary", "OFFICIAL_ONLY", "build_checkpointer",
           "build_predictor", "load_weights", "read_checkpoint_file"]

WEIGHTS_HELP = (
    "MODEL.WEIGHTS must be a local file: sgr_d2 never downloads weights. Convert an ImageNet "
    "ResNet (torchvision) or Swin-T (timm) state dict you have on disk with "
    "`python tools/convert_pretrained.py --input <file> --output <file.pkl>`, or give a "
    "checkpoint written by train_net.py (MODEL.WEIGHTS \"\" trains from scratch)."
)

# Tensors of official MaskFormer / Mask2Former files that sgr_d2 computes itself: the loss's
# class weights (from MODEL.MASK_FORMER.NO_OBJECT_WEIGHT) and Swin's relative position index (timm
# computes it by the official formula). BatchNorm's num_batches_tracked is another when the model
# has no such buffer (the official FrozenBN ResNets), and is loaded where it has.
OFFICIAL_ONLY = ("criterion.empty_weight", "*.relative_position_index")

# What an interrupted save leaves: ``.<name>.pth.<random>.tmp`` or ``.last_checkpoint.<random>.tmp``.
_TEMPORARY = re.compile(r"^\.(?:.+\.pth|last_checkpoint)\.[A-Za-z0-9_]+\.tmp$")


def read_checkpoint_file(path: str, *, mmap: bool = False) -> Dict:
    """``{"model": state, ...}`` of a weights file in any of detectron2's formats, read safely."""
    data = read_weights(path, mmap=mmap)
    if path.endswith(".pkl"):
        if "model" in data and "__author__" in data:
            return data  # a model-zoo file
        # a Caffe2 / Detectron1 file: its blobs (detection models keep them under "blobs")
        blobs = data.get("blobs", data)
        return {"model": {k: v for k, v in blobs.items() if not k.endswith("_momentum")},
                "__author__": "Caffe2", "matching_heuristics": True}
    return data if "model" in data else {"model": data}


def _is_official_only(key: str, model_keys) -> bool:
    return (key == "criterion.empty_weight" or key.endswith(".relative_position_index")
            or (key.endswith(".num_batches_tracked") and key not in model_keys))


@dataclass
class LoadSummary:
    """What a load of :class:`AtomicCheckpointer` did (``checkpointer.last_load``)."""

    path: str
    set_aside: Dict[str, tuple] = field(default_factory=dict)  # official-only tensors, not loaded
    wrapped: int = 0  # backbone.* tensors placed under the SGR wrapper's backbone.backbone.*
    folded_norms: int = 0  # Caffe2 norms whose statistics are folded (running mean 0, var 1)
    head_layout: int = 0  # tensors of an older-layout MaskFormerHead file moved under pixel_decoder.
    fit: Optional[FitReport] = None


class AtomicCheckpointer(DetectionCheckpointer):
    """``save`` writes a temporary file and renames it, and tags ``last_checkpoint`` only after
    the rename, so a crash at any moment leaves the previous checkpoint and tag intact.
    ``load`` reads the file safely, sets aside the official-only tensors, and refuses a file that
    does not fit the model (:class:`CheckpointMismatchError`, where detectron2 only warns) before
    touching the model. ``new_classes`` (``MODEL.WEIGHTS_NEW_CLASSES``): the class-specific output
    layers of ``MODEL.WEIGHTS`` are not loaded (never when resuming).

    ``resume_or_load(resume=True)`` resumes from the file ``last_checkpoint`` names or, when that
    file is missing or unreadable (truncated), from the newest readable checkpoint of the folder,
    with a warning. Records: ``last_load`` (:class:`LoadSummary`), ``saved`` (the files this
    checkpointer wrote), ``resumed_from`` (the file it resumed from, or None)."""

    def __init__(self, model, save_dir: str = "", *, new_classes: bool = False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.new_classes = bool(new_classes)
        self.last_load: Optional[LoadSummary] = None
        self.saved = []
        self.resumed_from = None

    # ------------------------------------------------------------------ saving
    def save(self, name: str, **kwargs) -> None:
        """detectron2's ``save`` (the model, every checkpointable's ``state_dict()``, then
        ``kwargs``, which may replace a checkpointable's state), written atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            if key not in kwargs:
                data[key] = obj.state_dict()
        data.update(kwargs)
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(f"{name}.pth")
        if save_file in self.saved:
            self.saved.remove(save_file)
        self.saved.append(save_file)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

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

    # ------------------------------------------------------------------ loading
    def _load_file(self, filename: str):
        return read_checkpoint_file(filename)

    def load(self, path: str, checkpointables=None, *, resuming: bool = False):
        """fvcore's ``load`` with the steps of the module docstring; ``resuming``: the run's own
        checkpoint, to which ``MODEL.WEIGHTS_NEW_CLASSES`` does not apply. Returns what is left of
        the checkpoint (``iteration`` ...)."""
        if not path:
            self.logger.info("No checkpoint found. Initializing model from scratch")
            return {}
        if "://" in path:
            raise ValueError(f"MODEL.WEIGHTS is a URL ({path}). {WEIGHTS_HELP} Download the file "
                             "yourself and give its local path.")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"MODEL.WEIGHTS file {path} does not exist. {WEIGHTS_HELP}")
        self.logger.info(f"[Checkpointer] Loading from {path} ...")
        checkpoint = self._load_file(path)
        incompatible = self._fit_and_load(checkpoint, path, new_classes=self.new_classes and not resuming)
        self._log_incompatible_keys(incompatible)
        for key in self.checkpointables if checkpointables is None else checkpointables:
            if key in checkpoint:
                self.logger.info(f"Loading {key} from {path} ...")
                self.checkpointables[key].load_state_dict(checkpoint.pop(key))
        return checkpoint

    def resume_or_load(self, path: str, *, resume: bool = True):
        if resume and self.has_checkpoint():
            last = self._resume_file()
            self.resumed_from = last
            return self.load(last, resuming=True)
        return self.load(path, checkpointables=[])

    def _resume_file(self) -> str:
        """The file ``last_checkpoint`` names if it can be read, else the newest readable
        checkpoint (highest iteration) of ``save_dir``, with a warning."""
        last = self.get_checkpoint_file()
        tag = os.path.join(self.save_dir, "last_checkpoint")
        name = os.path.basename(last) or "nothing"
        if not os.path.isfile(last):
            problem = f"{tag} names {name}, but {last} does not exist: it was deleted or moved after it was saved"
        else:
            try:
                read_weights(last, mmap=True)
                return last
            except Exception as e:  # truncated or corrupt
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
                ckpt = read_weights(path, mmap=True)
            except Exception as e:
                logger.warning("Skipping checkpoint %s, which cannot be read (%s: %s)", path, type(e).__name__, e)
                continue
            if "model" in ckpt:
                found.append((int(ckpt.get("iteration", -1)), os.path.getmtime(path), path))
        if not found:
            return None
        iteration, _, path = max(found)
        return path, iteration

    def _fit_and_load(self, checkpoint: Dict, path: str, *, new_classes: bool):
        state = checkpoint.get("model")
        if not isinstance(state, dict) or not any(hasattr(v, "shape") for v in state.values()):
            raise CheckpointMismatchError(f"weights file {path} holds no tensors under 'model'. {WEIGHTS_HELP}")
        self._convert_ndarray_to_tensor(state)
        summary = LoadSummary(path=path)
        log = self.logger
        model_state = self.model.state_dict()
        if checkpoint.get("matching_heuristics", False):
            from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

            caffe2 = checkpoint.get("__author__", None) == "Caffe2"
            state = align_and_update_state_dicts(model_state, state, c2_conversion=caffe2)
            if caffe2:
                summary.folded_norms = _fill_folded_norm_statistics(state, model_state)
                if summary.folded_norms:
                    log.info(f"{path}: Caffe2 file: the statistics of {summary.folded_norms} norms are folded into "
                             "their scale and bias; running mean 0 and variance 1 are loaded with them")
        else:
            state, summary.wrapped = _place_under_wrapper(state, model_state)
            if summary.wrapped:
                log.info(f"{path}: a model without SGR: its {summary.wrapped} backbone tensors go under the "
                         "SGR wrapper (backbone.* -> backbone.backbone.*)")
            from ..modeling.maskformer.head import upgrade_head_layouts

            summary.head_layout = upgrade_head_layouts(state, self.model)
            if summary.head_layout:
                log.info(f"{path}: the older MaskFormerHead layout: its {summary.head_layout} pixel-decoder tensors "
                         "go under sem_seg_head.pixel_decoder.")
        aside = [k for k in state if _is_official_only(k, model_state)]
        summary.set_aside = {k: tuple(state.pop(k).shape) for k in aside}
        if aside:
            log.info(f"{path}: set aside {len(aside)} tensors that sgr_d2 computes itself: "
                     f"{format_groups(aside)}")
        parts = model_parts(self.model)
        report = check_fit(parts, {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")},
                           new_classes=new_classes)
        summary.fit = report
        self.last_load = summary
        if not report.ok:
            raise CheckpointMismatchError(mismatch_message(report, path, type(self.model).__name__,
                                                           new_classes=new_classes))
        for key in report.new_class_layers:
            state.pop(key, None)
        if report.new_class_layers:
            log.info(f"{path}: MODEL.WEIGHTS_NEW_CLASSES: the class-specific layers start from their "
                     f"initialisation: {format_groups(report.new_class_layers)}")
        for why, keys in report.at_init.items():
            log.info(f"{path}: left at initialisation ({why}): {format_groups(keys)}")
        if report.unused:
            log.warning(f"{path}: {len(report.unused)} tensors of the file are not used by the model: "
                        f"{format_groups(report.unused)}")
        log.info(f"{path}: {report.kind} checkpoint; {len(report.loaded)} of the model's {len(parts.weights)} "
                 "tensors loaded")
        incompatible = super()._load_model({"model": state})
        reported = set(report.unused) | set(report.new_class_layers)
        reported.update(k for keys in report.at_init.values() for k in keys)
        # what the fit check reported already; fvcore would list it again as warnings
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in reported]
        incompatible.unexpected_keys[:] = [k for k in incompatible.unexpected_keys if k not in reported]
        return incompatible


def _place_under_wrapper(state, model_state):
    """``backbone.X`` -> ``backbone.backbone.X`` where only the latter is a model tensor: a
    checkpoint of the model without SGR (or GloRe), loaded into the model with it."""
    if any(k.startswith("backbone.backbone.") for k in state):
        return state, 0
    out, n = {}, 0
    for key, value in state.items():
        wrapped = "backbone." + key
        if key.startswith("backbone.") and key not in model_state and wrapped in model_state:
            out[wrapped] = value
            n += 1
        else:
            out[key] = value
    return out, n


def _fill_folded_norm_statistics(state, model_state) -> int:
    """Caffe2 ImageNet files (detectron2's MSRA R-50.pkl) keep a norm as scale and bias only, its
    statistics folded into them: give such norms running mean 0 and variance 1, the values
    detectron2's FrozenBatchNorm2d gives them."""
    n = 0
    for key in model_state:
        if not key.endswith(".running_mean"):
            continue
        prefix = key[: -len("running_mean")]
        var = prefix + "running_var"
        if prefix + "weight" in state and key not in state and var not in state and var in model_state:
            state[key] = torch.zeros_like(model_state[key])
            state[var] = torch.ones_like(model_state[var])
            n += 1
    return n


# ----------------------------------------------------------------------------- the one loading path
def build_checkpointer(cfg, model, save_dir: str = "", **checkpointables) -> AtomicCheckpointer:
    """The checkpointer of ``model`` with the config's loading options (``MODEL.WEIGHTS_NEW_CLASSES``)."""
    return AtomicCheckpointer(model, save_dir, new_classes=cfg.MODEL.WEIGHTS_NEW_CLASSES, **checkpointables)


def load_weights(cfg, model, path: Optional[str] = None) -> LoadSummary:
    """Load ``path`` (default ``cfg.MODEL.WEIGHTS``) into ``model`` through the fit check; what
    ``--eval-only``, the demo and the tools use. Returns what was done."""
    path = cfg.MODEL.WEIGHTS if path is None else path
    if not path:
        raise ValueError(f"no weights to load: MODEL.WEIGHTS is empty. {WEIGHTS_HELP}")
    checkpointer = build_checkpointer(cfg, model)
    checkpointer.load(path)
    return checkpointer.last_load


def build_predictor(cfg):
    """detectron2's ``DefaultPredictor`` for ``cfg`` (input format, test resize, eval mode), its
    weights ``cfg.MODEL.WEIGHTS`` loaded by :func:`load_weights` (``DefaultPredictor`` alone would
    load them with detectron2's unchecked checkpointer)."""
    from detectron2.engine import DefaultPredictor

    bare = cfg.clone()
    bare.defrost()
    bare.MODEL.WEIGHTS = ""
    predictor = DefaultPredictor(bare)
    load_weights(cfg, predictor.model)
    predictor.cfg = cfg
    return predictor
