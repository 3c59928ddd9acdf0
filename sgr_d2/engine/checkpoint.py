"""A DetectionCheckpointer whose files are never left half-written, and whose loads are checked.

Every load (``MODEL.WEIGHTS``, ``--eval-only``, ``--resume``, the demo, the tools) goes through
:meth:`AtomicCheckpointer.load`: the file is read safely (:func:`sgr_d2.files.read_weights`) in
detectron2's formats; tensors that official MaskFormer / Mask2Former files carry but sgr_d2 computes
are set aside (:data:`OFFICIAL_ONLY`; the modules carry the official names, and the older
MaskFormerHead layout is read as the official code reads it); converted ImageNet and Caffe2 files are
matched by detectron2's ``align_and_update_state_dicts``, and a checkpoint of the model without SGR
goes under the SGR wrapper; then :func:`check_fit` refuses, before anything is loaded, a file that
leaves tensors of the model without a value (docs/published_models.md#the-fit-check).
"""
from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Mapping, Optional, Tuple

import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.modeling.backbone.resnet import BottleneckBlock

from ..files import atomic_torch_save, atomic_write_text, read_weights
from ..modeling.backbone.stage_hook import StageHookBackbone
from ..modeling.maskformer.head import upgrade_head_layouts

logger = logging.getLogger(__name__)

__all__ = ["AtomicCheckpointer", "CheckpointMismatchError", "LoadSummary", "OFFICIAL_ONLY", "build_checkpointer",
           "load_weights", "newest_checkpoint", "read_checkpoint_file",
           "CLASS_LAYERS", "FitReport", "ModelParts", "check_fit", "format_groups", "is_weight", "mismatch_message",
           "model_parts"]

WEIGHTS_HELP = ("MODEL.WEIGHTS must be a local file: sgr_d2 never downloads weights. Convert an ImageNet "
                "ResNet (torchvision) or Swin-T (timm) state dict you have on disk with "
                "`python tools/convert_pretrained.py --input <file> --output <file.pkl>`, or give a "
                "checkpoint written by train_net.py (MODEL.WEIGHTS \"\" trains from scratch).")

# Tensors of official MaskFormer / Mask2Former files that sgr_d2 computes itself: the loss's class
# weights (from MODEL.MASK_FORMER.NO_OBJECT_WEIGHT) and Swin's relative position index (timm's, by the
# official formula); also BatchNorm's num_batches_tracked where the model has no such buffer.
OFFICIAL_ONLY = ("criterion.empty_weight", "*.relative_position_index")

# What an interrupted save leaves: ``.<name>.pth.<random>.tmp`` or ``.last_checkpoint.<random>.tmp``.
_TEMPORARY = re.compile(r"^\.(?:.+\.pth|last_checkpoint)\.[A-Za-z0-9_]+\.tmp$")


def read_checkpoint_file(path: str) -> Dict:
    """``{"model": state, ...}`` of a weights file in any of detectron2's formats, read safely."""
    data = read_weights(path)
    if path.endswith(".pkl"):
        if "model" in data and "__author__" in data:
            return data  # a model-zoo file
        # a Caffe2 / Detectron1 file: its blobs (detection models keep them under "blobs")
        blobs = data.get("blobs", data)
        return {"model": {k: v for k, v in blobs.items() if not k.endswith("_momentum")},
                "__author__": "Caffe2", "matching_heuristics": True}
    return data if "model" in data else {"model": data}


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
    """``save`` writes a temporary file, renames it, and only then tags ``last_checkpoint``: a crash
    at any moment leaves the previous checkpoint and tag intact. ``load`` refuses a file that does
    not fit (detectron2 only warns); ``new_classes``: ``MODEL.WEIGHTS_NEW_CLASSES`` (not when
    resuming). Resuming falls back from an unreadable ``last_checkpoint`` file to the newest readable
    checkpoint, with a warning. Records ``last_load`` (:class:`LoadSummary`), ``saved``, ``resumed_from``."""

    def __init__(self, model, save_dir: str = "", *, new_classes: bool = False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.new_classes = bool(new_classes)
        self.last_load: Optional[LoadSummary] = None
        self.saved = []
        self.resumed_from = None

    def save(self, name: str, **kwargs) -> None:
        """detectron2's ``save`` (the model, every checkpointable's ``state_dict()``, then
        ``kwargs``, which may replace a checkpointable's state), written atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(),
                **{key: obj.state_dict() for key, obj in self.checkpointables.items() if key not in kwargs}, **kwargs}
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(f"{name}.pth")
        self.saved = [p for p in self.saved if p != save_file] + [save_file]

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def remove_stale_temporaries(self):
        """Delete (and return) the temporary files interrupted saves left in ``save_dir`` (main process only)."""
        if not self.save_dir or not self.save_to_disk or not os.path.isdir(self.save_dir):
            return []
        removed = [os.path.join(self.save_dir, n) for n in sorted(os.listdir(self.save_dir)) if _TEMPORARY.match(n)]
        removed = [p for p in removed if os.path.isfile(p)]
        for path in removed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if removed:
            logger.warning("Removed %d temporary file(s) left by interrupted checkpoint writes: %s",
                           len(removed), ", ".join(removed))
        return removed

    def _load_file(self, filename: str):
        return read_checkpoint_file(filename)

    def load(self, path: str, checkpointables=None, *, resuming: bool = False):
        """fvcore's ``load`` with the steps of the module docstring (``MODEL.WEIGHTS_NEW_CLASSES`` not
        ``resuming`` the run's own checkpoint); returns what is left of the checkpoint (``iteration`` ...)."""
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
        fallback = newest_checkpoint([p for p in self.get_all_checkpoint_files() if p != last])
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

    def _fit_and_load(self, checkpoint: Dict, path: str, *, new_classes: bool):
        state = checkpoint.get("model")
        if not isinstance(state, dict) or not any(hasattr(v, "shape") for v in state.values()):
            raise CheckpointMismatchError(f"weights file {path} holds no tensors under 'model'. {WEIGHTS_HELP}")
        self._convert_ndarray_to_tensor(state)
        summary = LoadSummary(path=path)
        log = self.logger
        model_state = self.model.state_dict()
        if checkpoint.get("matching_heuristics", False):
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
            summary.head_layout = upgrade_head_layouts(state, self.model)
            if summary.head_layout:
                log.info(f"{path}: the older MaskFormerHead layout: its {summary.head_layout} pixel-decoder tensors "
                         "go under sem_seg_head.pixel_decoder.")
        aside = [k for k in state if any(fnmatch.fnmatchcase(k, p) for p in OFFICIAL_ONLY)
                 or (k.endswith(".num_batches_tracked") and k not in model_state)]
        summary.set_aside = {k: tuple(state.pop(k).shape) for k in aside}
        if aside:
            log.info(f"{path}: set aside {len(aside)} tensors that sgr_d2 computes itself: {format_groups(aside)}")
        parts = model_parts(self.model)
        report = check_fit(parts, {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")},
                           new_classes=new_classes)
        summary.fit = report
        self.last_load = summary
        if report.missing:
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


def newest_checkpoint(paths, problem=lambda checkpoint: None):
    """``(path, iteration)`` of the highest-iteration file of ``paths`` that can be read and in which
    ``problem(checkpoint)`` finds nothing (else it says why), or None; the others skipped with a warning."""
    found = []
    for path in dict.fromkeys(paths):
        try:
            ckpt = read_weights(path, mmap=True)
            why = problem(ckpt) if "model" in ckpt else "it holds no 'model'"
        except Exception as e:
            why = f"it cannot be read ({type(e).__name__}: {e})"
        if why is None:
            found.append((int(ckpt.get("iteration", -1)), os.path.getmtime(path), path))
        else:
            logger.warning("Skipping checkpoint %s: %s", path, why)
    if not found:
        return None
    iteration, _, path = max(found)
    return path, iteration


def _place_under_wrapper(state, model_state):
    """``backbone.X`` -> ``backbone.backbone.X`` where only the latter is a model tensor (a file without SGR)."""
    if any(k.startswith("backbone.backbone.") for k in state):
        return state, 0
    moved = {k for k in state if k.startswith("backbone.") and k not in model_state and "backbone." + k in model_state}
    return {"backbone." + k if k in moved else k: v for k, v in state.items()}, len(moved)


def _fill_folded_norm_statistics(state, model_state) -> int:
    """Caffe2 ImageNet files (detectron2's MSRA R-50.pkl) keep a norm as scale and bias only, its statistics
    folded into them: give such norms running mean 0 and variance 1, as detectron2's FrozenBatchNorm2d does."""
    n = 0
    for key in (k for k in model_state if k.endswith(".running_mean")):
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


# ----------------------------------------------------------------------------- the fit check
# Modules whose outputs are the classes (the leading "*." matches any prefix).
CLASS_LAYERS = (
    "sem_seg_head.predictor.class_embed",  # MaskFormer / Mask2Former (K + 1 rows)
    "sem_seg_head.predictor",  # per-pixel heads' 1x1 classifier (a module with its own weight)
    "*.sgr.classifier",  # SGR's class term
    "roi_heads.box_predictor.cls_score",
    "roi_heads.box_predictor.bbox_pred",
    "roi_heads.mask_head.predictor",
)

# Names of heads in any model here (a file with such tensors is a full-model checkpoint).
HEAD_PREFIXES = ("sem_seg_head.", "proposal_generator.", "roi_heads.", "criterion.")


class CheckpointMismatchError(ValueError):
    """A weights file that leaves tensors of the model without a value (see the module docstring)."""


def is_weight(key: str) -> bool:
    """Tensors that count: not pixel_mean/std (set from the config; detectron2 ignores them too)
    nor BatchNorm's num_batches_tracked (torch fills it in when a file lacks it)."""
    return key not in ("pixel_mean", "pixel_std") and not key.endswith("num_batches_tracked")


def _is_class_layer(key: str) -> bool:
    module = "." + key.rsplit(".", 1)[0]  # so that "*." matches the empty prefix too
    return any(fnmatch.fnmatchcase(module, p if p.startswith("*") else "." + p) for p in CLASS_LAYERS)


@dataclass(frozen=True)
class ModelParts:
    """The model's weight tensors and which part each belongs to."""

    weights: Dict[str, Tuple[int, ...]]  # name -> shape
    body: Tuple[str, ...]  # prefixes of the backbone network (ImageNet-pretrainable)
    heads: Tuple[str, ...]  # prefixes of names that belong to a head
    components: Dict[str, str]  # prefix -> what it is ("SGR component", ...)
    class_keys: FrozenSet[str]

    def component_of(self, key: str) -> Optional[str]:
        return next((p for p in self.components if key.startswith(p)), None)

    def in_backbone(self, key: str) -> bool:
        return key.startswith(self.body) or self.component_of(key) is not None


def model_parts(model: nn.Module) -> ModelParts:
    weights = {k: tuple(v.shape) for k, v in model.state_dict().items() if is_weight(k)}
    components: Dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, StageHookBackbone):
            for child, _ in module.named_children():
                if child != "backbone":
                    what = {"sgr": "SGR component", "glore": "GloRe component"}.get(child, f"{child} component")
                    components[f"{name}.{child}." if name else f"{child}."] = what
    body: List[str] = []
    net, prefix = getattr(model, "backbone", None), "backbone."
    while net is not None:
        inner = next(((n, getattr(net, n)) for n in ("backbone", "bottom_up")
                      if isinstance(getattr(net, n, None), nn.Module)), None)
        if inner is None:
            break
        prefix, net = prefix + inner[0] + ".", inner[1]
    if net is not None:
        body.append(prefix)
    if isinstance(getattr(getattr(model, "roi_heads", None), "res5", None), nn.Module) and net is not None \
            and any(isinstance(m, BottleneckBlock) for m in net.modules()):
        # C4: res5 runs per RoI in the ROI heads, always as 3 bottleneck blocks: part of the backbone
        # network when that is a bottleneck ResNet (50 and deeper), whose res5 fills it; the
        # basic-block res5 of ResNet-18/34 cannot, so there it starts from its initialisation.
        body.append("roi_heads.res5.")
    heads = {f"{name}." for name, _ in model.named_children() if name != "backbone"}
    heads.update(HEAD_PREFIXES)
    return ModelParts(weights=weights, body=tuple(body), heads=tuple(sorted(heads)), components=components,
                      class_keys=frozenset(k for k in weights if _is_class_layer(k)))


@dataclass
class FitReport:
    """The outcome of :func:`check_fit`. ``missing`` non-empty: the file is refused."""

    kind: str  # "full model" or "backbone"
    loaded: List[str] = field(default_factory=list)  # model tensors the file gives a value
    missing: List[str] = field(default_factory=list)  # required model tensors without a value
    wrong_shape: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    at_init: Dict[str, List[str]] = field(default_factory=dict)  # why -> model tensors left at init
    new_class_layers: List[str] = field(default_factory=list)  # not loaded: MODEL.WEIGHTS_NEW_CLASSES
    unused: List[str] = field(default_factory=list)  # file tensors the model does not have


def check_fit(parts: ModelParts, file_shapes: Mapping[str, Tuple[int, ...]], *, new_classes: bool = False) -> FitReport:
    """Which tensors of the model a file (names already the model's) covers, and whether that is enough."""
    weights = parts.weights
    file_shapes = {k: tuple(v) for k, v in file_shapes.items() if is_weight(k)}
    named = [k for k in file_shapes if k in weights]
    full = (not parts.body or any(not parts.in_backbone(k) for k in named)
            or any(k.startswith(parts.heads) and not parts.in_backbone(k) for k in file_shapes))
    report = FitReport(kind="full model" if full else "backbone")
    report.unused = [k for k in file_shapes if k not in weights]
    components_in_file = {parts.component_of(k) for k in named} - {None}
    for key, shape in weights.items():
        component = parts.component_of(key)
        if new_classes and key in parts.class_keys:
            report.new_class_layers.append(key)
            continue
        if key in file_shapes and file_shapes[key] == shape:
            report.loaded.append(key)
            continue
        if key in file_shapes:
            report.wrong_shape.append((key, file_shapes[key], shape))
        if component is not None and component not in components_in_file:
            why = (f"{parts.components[component]}: not in the file; its fusion starts at zero, so the model "
                   "starts as the loaded one")
        elif not full and not key.startswith(parts.body) and component is None:
            why = "not part of a backbone checkpoint: starts from its initialisation"
        else:
            report.missing.append(key)
            continue
        report.at_init.setdefault(why, []).append(key)
    return report


def format_groups(keys, limit: int = 12) -> str:
    """``group (n tensors), ...``, at most ``limit`` groups: names grouped by module, a layer index and
    what follows collapsed to ``*`` (fvcore's ``get_missing_parameters_message`` colours lines for a terminal)."""
    groups = Counter(re.sub(r"(^|\.)\d+(\.|$).*", r"\1*", k.rsplit(".", 1)[0]) for k in keys)
    shown = [f"{name} ({n} tensor{'s' if n != 1 else ''})" for name, n in list(groups.items())[:limit]]
    more = f", ... and {len(groups) - limit} more groups" if len(groups) > limit else ""
    return ", ".join(shown) + more if shown else "none"


def mismatch_message(report: FitReport, path: str, model_name: str, *, new_classes: bool) -> str:
    """The refusal: the missing groups first, then what else was found."""
    lines = [f"weights file {path} does not fit the {model_name} model: it is a {report.kind} checkpoint "
             f"that leaves {len(report.missing)} of the model's {len(report.missing) + len(report.loaded)} "
             "required tensors without a value.",
             f"  missing groups: {format_groups(report.missing)}"]
    if report.wrong_shape:
        shown = [f"{k} {list(a)} (model: {list(b)})" for k, a, b in report.wrong_shape[:6]]
        more = f" ... and {len(report.wrong_shape) - 6} more" if len(report.wrong_shape) > 6 else ""
        lines.append(f"  tensors of the file with another shape ({len(report.wrong_shape)}): "
                     + ", ".join(shown) + more)
    lines.append(f"  tensors of the file the model does not have ({len(report.unused)}): "
                 f"{format_groups(report.unused, limit=6)}")
    if not new_classes and any(k in report.missing for k, _, _ in report.wrong_shape) and all(
            _is_class_layer(k) for k, _, _ in report.wrong_shape):
        lines.append("  Only the class-specific layers differ in shape: to fine-tune on other classes, set "
                     "MODEL.WEIGHTS_NEW_CLASSES True (they then start from their initialisation).")
    elif report.kind == "backbone":
        lines.append("  A backbone (ImageNet) checkpoint must cover the whole backbone network "
                     "(check MODEL.RESNETS.DEPTH / widths, MODEL.SWIN.*, and that the file is a "
                     "backbone of this architecture).")
    else:
        lines.append("  A full-model checkpoint must give every tensor of the model a value; it looks like "
                     "a checkpoint of another architecture or config (head, backbone, depth, width).")
    return "\n".join(lines)

