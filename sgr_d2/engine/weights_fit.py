"""The fit check of a weights file against a model (``AtomicCheckpointer`` runs it on every load).

A file is one of two kinds, told apart by where its tensors land:

* a **backbone checkpoint** (an ImageNet network, or a segmentation backbone exported for Mask
  R-CNN): no tensor of the file belongs to a head (a name under one of the model's other
  top-level modules, or ``sem_seg_head.`` / ``proposal_generator.`` / ``roi_heads.`` /
  ``criterion.``, whether the model has that head or not), and every tensor that lands in the
  model lands in the backbone network or in its SGR / GloRe component. It must cover the **whole backbone network** (the innermost backbone: the
  ResNet or Swin inside SGR's wrapper and inside an FPN, plus ``roi_heads.res5`` of a C4 model
  whose backbone is a bottleneck ResNet, 50 layers or more),
  and a component it has tensors of entirely. The head, an FPN's own convs and a component
  the file lacks start from their initialisation.
* a **full-model checkpoint**: anything else. It must give every tensor of the model a value,
  except

  - a component the file has **no** tensor of: SGR's (and GloRe's) fusion starts at zero, so
    the model starts as the loaded one and the component is added on top of it;
  - the class-specific output layers (:data:`CLASS_LAYERS`), only when the config asks for new
    classes (``MODEL.WEIGHTS_NEW_CLASSES True``): they are then never loaded and start from
    their initialisation.

A tensor with the model's name but another shape counts as missing. Tensors of the file that
the model does not have are listed (not an error). Pixel mean/std and BatchNorm's
``num_batches_tracked`` are not weights and are never counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Mapping, Optional, Tuple

from torch import nn

from detectron2.modeling.backbone.resnet import BottleneckBlock

__all__ = ["CLASS_LAYERS", "CheckpointMismatchError", "FitReport", "ModelParts", "check_fit", "group_names",
           "format_groups", "is_weight", "mismatch_message", "model_parts"]

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
    module = key.rsplit(".", 1)[0]
    for pattern in CLASS_LAYERS:
        if pattern.startswith("*."):
            if module.endswith(pattern[1:]) or module == pattern[2:]:
                return True
        elif module == pattern:
            return True
    return False


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

    def is_head(self, key: str) -> bool:
        return key.startswith(self.heads) and not self.in_backbone(key)


def model_parts(model: nn.Module) -> ModelParts:
    from ..modeling.backbone.stage_hook import StageHookBackbone

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
        # C4: res5 runs per RoI in the ROI heads, always as 3 bottleneck blocks. It is part of the
        # backbone network when the backbone is a bottleneck ResNet (50 and deeper), whose res5
        # fills it; the basic-block res5 of ResNet-18/34 cannot, so there it starts from its
        # initialisation like the rest of the ROI heads.
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

    @property
    def ok(self) -> bool:
        return not self.missing


def check_fit(parts: ModelParts, file_shapes: Mapping[str, Tuple[int, ...]], *,
              new_classes: bool = False) -> FitReport:
    """Which tensors of the model a file (names already the model's) covers, and whether that is
    enough (see the module docstring)."""
    weights = parts.weights
    file_shapes = {k: tuple(v) for k, v in file_shapes.items() if is_weight(k)}
    named = [k for k in file_shapes if k in weights]
    full = (not parts.body or any(not parts.in_backbone(k) for k in named)
            or any(parts.is_head(k) for k in file_shapes))
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
            why = f"{parts.components[component]}: not in the file; its fusion starts at zero, so the model starts as the loaded one"
        elif not full and not key.startswith(parts.body) and component is None:
            why = "not part of a backbone checkpoint: starts from its initialisation"
        else:
            report.missing.append(key)
            continue
        report.at_init.setdefault(why, []).append(key)
    return report


def group_names(keys) -> List[Tuple[str, int]]:
    """``[(group, count)]``: tensor names grouped by module, a layer index and what follows it
    collapsed to ``*`` (``sem_seg_head.predictor.ffn_layers.*``), in first-seen order."""
    counts: Dict[str, int] = {}
    for key in keys:
        parts = key.split(".")[:-1] or [key]
        group = []
        for p in parts:
            if p.isdigit():
                group.append("*")
                break
            group.append(p)
        name = ".".join(group)
        counts[name] = counts.get(name, 0) + 1
    return list(counts.items())


def format_groups(keys, limit: int = 12) -> str:
    """``group (n tensors), ...`` of :func:`group_names`, at most ``limit`` groups. (fvcore's
    ``get_missing_parameters_message`` colours its lines for a terminal, one per group; this
    fits an error message.)"""
    groups = group_names(keys)
    shown = []
    for name, n in groups[:limit]:
        shown.append(f"{name} ({n} tensor{'s' if n != 1 else ''})")
    more = f", ... and {len(groups) - limit} more groups" if len(groups) > limit else ""
    return ", ".join(shown) + more if shown else "none"


def mismatch_message(report: FitReport, path: str, model_name: str, *, new_classes: bool) -> str:
    """The refusal: the missing groups first, then what else was found."""
    lines = [
        f"weights file {path} does not fit the {model_name} model: it is a {report.kind} checkpoint "
        f"that leaves {len(report.missing)} of the model's {len(report.missing) + len(report.loaded)} "
        f"required tensors without a value.",
        f"  missing groups: {format_groups(report.missing)}",
    ]
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

