"""A DetectionCheckpointer whose files are never left half-written, and whose loads are checked.

Loading (``MODEL.WEIGHTS`` for training, ``--eval-only``, the demo, the token-semantics and
figure tools: all go through :func:`build_checkpointer` / :func:`load_weights` /
:func:`build_predictor`, hence through ``AtomicCheckpointer._load_model``):

1. official MaskFormer / Mask2Former files are recognised from their names and renamed
   (:mod:`sgr_d2.engine.official_layout`); files with ``matching_heuristics`` (converted
   ImageNet pickles, detectron2's Caffe2 ``R-50.pkl``) are matched by detectron2's own
   ``align_and_update_state_dicts``, which also converts Caffe2 names;
2. a checkpoint of a model without SGR (``backbone.*``) goes under the SGR wrapper
   (``backbone.backbone.*``) of a model with SGR;
3. the fit check (:mod:`sgr_d2.engine.weights_fit`) refuses a file that leaves tensors of the
   model without a value, naming the missing groups, *before* anything is loaded.
"""
from __future__ import annotations

import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from detectron2.checkpoint import DetectionCheckpointer

from .official_layout import Recognised, official_to_sgr
from .weights_fit import (
    CheckpointMismatchError,
    FitReport,
    check_fit,
    format_groups,
    is_weight,
    mismatch_message,
    model_parts,
)

logger = logging.getLogger(__name__)

__all__ = ["AtomicCheckpointer", "CheckpointMismatchError", "LoadSummary", "atomic_torch_save",
           "build_checkpointer", "read_checkpoint", "build_predictor", "load_weights"]

_is_weight = is_weight  # the tensors that count (one definition, in weights_fit)

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


@dataclass
class LoadSummary:
    """What the last ``load`` of an :class:`AtomicCheckpointer` did (``checkpointer.last_load``)."""

    path: str
    recognised: Optional[Recognised] = None  # an official layout, renamed
    renamed: int = 0  # tensors whose names the official layout changed
    set_aside: Dict[str, tuple] = field(default_factory=dict)  # official-only tensors, not loaded
    wrapped: int = 0  # backbone.* tensors placed under the SGR wrapper's backbone.backbone.*
    folded_norms: int = 0  # Caffe2 norms whose statistics are folded (running mean 0, var 1)
    fit: Optional[FitReport] = None


class AtomicCheckpointer(DetectionCheckpointer):
    """``save`` writes a temporary file and renames it, and tags ``last_checkpoint`` only after
    the rename, so a crash at any moment leaves the previous checkpoint and tag intact.
    ``load`` of a missing file says how to obtain weights; ``load`` of a file that does not fit
    the model (see :mod:`sgr_d2.engine.weights_fit`) raises :class:`CheckpointMismatchError`
    naming the file and the missing groups, where detectron2 only warns; the model is left
    untouched. ``new_classes`` (``MODEL.WEIGHTS_NEW_CLASSES``): the class-specific output layers
    of the file are not loaded. ``last_load`` (:class:`LoadSummary`) says what was done.

    ``resume_or_load(resume=True)`` resumes from the file ``last_checkpoint`` names or, when that
    file is missing or unreadable (truncated), from the newest readable checkpoint of the folder,
    with a warning. ``saved`` lists the files this checkpointer wrote, ``resumed_from`` the file
    it resumed from (``None`` if it did not resume)."""

    def __init__(self, model, save_dir: str = "", *, new_classes: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.new_classes = bool(new_classes)
        self.last_load: Optional[LoadSummary] = None
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
        if path and "://" in path:
            raise ValueError(f"MODEL.WEIGHTS is a URL ({path}). {WEIGHTS_HELP} Download the file "
                             "yourself and give its local path.")
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"MODEL.WEIGHTS file {path} does not exist. {WEIGHTS_HELP}")
        self._loading = path
        # Resuming reads the run's own last checkpoint: MODEL.WEIGHTS_NEW_CLASSES is about
        # MODEL.WEIGHTS only.
        self._resuming = bool(path and self.save_dir and self.has_checkpoint()
                              and os.path.abspath(path) == os.path.abspath(self.get_checkpoint_file()))
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None
            self._resuming = False
            # upstream detectron2 main resets this only after a load that succeeded, and asserts
            # it is unset when the next load starts: a refused file (fit check) or an unreadable
            # one would make every later load of this checkpointer fail
            if hasattr(self, "_parsed_url_during_load"):
                self._parsed_url_during_load = None

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
        path = getattr(self, "_loading", None) or "the checkpoint"
        state = checkpoint.get("model")
        if not isinstance(state, dict) or not any(hasattr(v, "shape") for v in state.values()):
            raise CheckpointMismatchError(f"weights file {path} holds no tensors under 'model'. {WEIGHTS_HELP}")
        self._convert_ndarray_to_tensor(state)
        summary = LoadSummary(path=path)
        log = self.logger

        model_state = self.model.state_dict()
        state, aside, summary.recognised, summary.renamed = official_to_sgr(state, model_state.keys())
        summary.set_aside = {k: tuple(v.shape) for k, v in aside.items()}
        if summary.recognised is not None:
            kinds: Dict[str, int] = {}
            for key in aside:
                kind = key if key == "criterion.empty_weight" else "*." + key.rsplit(".", 1)[-1]
                kinds[kind] = kinds.get(kind, 0) + 1
            log.info(f"{path}: recognised {summary.recognised.describe()}; renamed {summary.renamed} tensors "
                     f"to sgr_d2's names (sgr_d2/engine/official_layout.py); set aside {len(aside)} "
                     "official-only tensors, which the model builds itself: "
                     + ", ".join(f"{k} ({n})" for k, n in kinds.items()))
        if checkpoint.get("matching_heuristics", False):
            from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

            caffe2 = checkpoint.get("__author__", None) == "Caffe2"
            state = align_and_update_state_dicts(model_state, state, c2_conversion=caffe2)
            checkpoint["matching_heuristics"] = False  # matched here, once
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

        parts = model_parts(self.model)
        new_classes = self.new_classes and not getattr(self, "_resuming", False)
        report = check_fit(parts, {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")},
                           new_classes=new_classes)
        summary.fit = report
        self.last_load = summary
        if not report.ok:
            official = _official_groups(report.missing, model_state) if summary.recognised else None
            raise CheckpointMismatchError(mismatch_message(
                report, path, type(self.model).__name__, new_classes=new_classes, official=official))
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
        checkpoint["model"] = state
        incompatible = super()._load_model(checkpoint)
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


def _official_groups(keys, model_state) -> Dict[str, str]:
    """sgr_d2 group name -> official group name, for the missing tensors of an official file."""
    from .official_layout import official_name
    from .weights_fit import group_names

    def unwrapped(k):
        return k[len("backbone."):] if k.startswith("backbone.backbone.") else k

    names = [unwrapped(k) for k in model_state]
    officials: Dict[str, list] = {}
    for key in keys:
        try:
            officials.setdefault(group_names([key])[0][0], []).append(official_name(unwrapped(key), names))
        except ValueError:
            continue
    out = {}
    for group, names_in_group in officials.items():
        groups = {g for g, _ in group_names(names_in_group)}
        if len(groups) == 1:
            out[group] = groups.pop()
        else:
            common = os.path.commonprefix([n.split(".") for n in names_in_group])
            out[group] = ".".join(common) + ".*"
    return out


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
    """detectron2's ``DefaultPredictor`` for ``cfg``, its weights loaded by :func:`load_weights`
    (``DefaultPredictor`` alone would load them with detectron2's unchecked checkpointer)."""
    from detectron2.engine import DefaultPredictor

    bare = cfg.clone()
    bare.defrost()
    bare.MODEL.WEIGHTS = ""
    predictor = DefaultPredictor(bare)
    load_weights(cfg, predictor.model)
    predictor.cfg = cfg
    return predictor
