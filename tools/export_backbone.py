#!/usr/bin/env python
"""Export the backbone of a trained segmentation model (with its SGR or GloRe component) as the
initial weights of detectron2's Mask R-CNN (docs/method.md#transfer-to-detection).

    python tools/export_backbone.py --config-file configs/coco_stuff_10k/dil_fcn_r101_sgr.yaml \\
        --weights output/coco_stuff_10k/dil_fcn_r101_sgr/model_final.pth \\
        --output exported/coco_stuff_10k_dil_fcn_r101_sgr_backbone_fpn.pth --target fpn \\
        [--det-config configs/coco/mask_rcnn_r101_fpn_sgr.yaml] [KEY VALUE ...]

``--config-file`` (and trailing ``KEY VALUE`` overrides) must be the configuration the checkpoint
was trained with: the segmentation model is built from it and the checkpoint's backbone keys and
shapes must match it exactly, or the tool refuses, naming the keys.

What is kept, what is dropped
  kept     the ResNet (stem, res2..res5) and the SGR / GloRe component (``backbone.sgr.*`` /
           ``backbone.glore.*``, names unchanged);
  dropped  the segmentation head (``sem_seg_head.*``, MaskFormer's predictor, ...), the
           optimiser, scheduler and iteration, a segmentation FPN's own convs, and SGR's class
           term ``backbone.sgr.classifier.*``. The class term is head-like: a linear layer that
           names tokens with the segmentation dataset's classes (171 for COCO-Stuff), used only by
           SGR's training loss. Mask R-CNN trains without that loss; its configs set
           ``MODEL.SGR.CLASS_WEIGHT 0``, so ``build_sgr_backbone`` builds no classifier.

Renaming (``P`` is ``backbone.backbone.`` with a component, ``backbone.`` without one)
  --target fpn   the ResNet goes under ``P + bottom_up.``: ``build_resnet_fpn_backbone`` (or
                 sgr_d2's ``build_dilated_resnet_fpn_backbone``) wrapped by
                 ``build_sgr_backbone`` / ``build_glore_backbone``, which find the stage inside
                 the FPN's ``bottom_up``. The FPN's lateral/output convs start from scratch.
  --target c4    stem..res4 go under ``P`` (``build_resnet_backbone`` with output res4), and res5
                 becomes ``roi_heads.res5.*``: detectron2's ``Res5ROIHeads`` runs res5 on every
                 RoI. That head always builds 3 bottleneck blocks, so res5 transfers from
                 ResNet-50/101/152; the basic-block res5 of ResNet-18/34 does not fit it and is
                 dropped (reported). The component must sit at res2..res4: SGR after res5 would
                 have to run per RoI inside the ROI head, and its weights (D = 2048 channels) do not
                 fit res4 (1024), so a C4 export of a model with SGR after res5 is refused. Train
                 the segmentation model with ``MODEL.SGR.IN_FEATURE res4`` for a C4 transfer, or
                 use ``--target fpn``.

Dilation: the segmentation ResNet runs at output stride 8 (res4/res5 dilated), Mask R-CNN at the
standard strides. Dilation and stride are properties of the convolutions, not of their weights:
every tensor has the same shape either way, so the tensors are copied bit for bit and the
detection config builds the undilated ResNet around them. The same holds for
``MODEL.RESNETS.STRIDE_IN_1X1``, which must match between the two configs (False for torchvision
ImageNet weights) and for ``INPUT.FORMAT`` / ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``.

``--det-config`` checks the result against the Mask R-CNN config that will load it: every
backbone tensor of that model (other than the FPN's own convs) must be in the file with its
shape, and every tensor of the file must exist in the model. BatchNorm's ``num_batches_tracked``
counters are dropped where that model has FrozenBN, which keeps none. Without ``--target`` the
target is read from ``--det-config`` (an FPN or not), else it is ``fpn``.

The output ``{"model": state_dict, "__author__": "sgr_d2 export_backbone"}`` has the model's own
key names, so ``DetectionCheckpointer`` (``MODEL.WEIGHTS``) loads it without name matching.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sgr_d2  # noqa: E402,F401  (compat shims and registrations before detectron2)
import torch  # noqa: E402
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present  # noqa: E402

from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.backbone.resnet import BottleneckBlock, ResNet  # noqa: E402

from sgr_d2.engine.checkpoint import atomic_torch_save, read_checkpoint_file  # noqa: E402
from sgr_d2.files import UnsafeWeightsError, WeightsReadError  # noqa: E402
from sgr_d2.config import is_detection, load_config  # noqa: E402
from sgr_d2.modeling.backbone.glore import GloReBackbone  # noqa: E402
from sgr_d2.modeling.backbone.sgr_backbone import SGRBackbone  # noqa: E402

__all__ = ["ExportError", "export_backbone", "main", "AUTHOR"]

AUTHOR = "sgr_d2 export_backbone"
TARGETS = ("c4", "fpn")
_COMPONENTS = ((SGRBackbone, "sgr"), (GloReBackbone, "glore"))
_TRAINING_STATE = ("trainer", "optimizer", "scheduler", "iteration")  # "trainer": optimiser, scheduler, hooks


class ExportError(ValueError):
    """The checkpoint, the configs and the target do not fit together."""


def _cpu(cfg):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def _layout(model) -> Tuple[Optional[str], Optional[str], str, ResNet, Optional[str]]:
    """(component name, its in_feature, seg prefix of the ResNet, the ResNet, seg FPN prefix)."""
    bb = model.backbone
    comp = in_feature = None
    inner, prefix = bb, "backbone."
    for cls, name in _COMPONENTS:
        if isinstance(bb, cls):
            comp, in_feature = name, bb.in_feature
            inner, prefix = bb.backbone, "backbone.backbone."
    fpn_prefix = None
    if isinstance(getattr(inner, "bottom_up", None), ResNet):
        fpn_prefix = prefix
        inner, prefix = inner.bottom_up, prefix + "bottom_up."
    if not isinstance(inner, ResNet):
        raise ExportError(
            f"the segmentation backbone is a {type(inner).__name__}; Mask R-CNN's configs here use "
            "a ResNet (detectron2's ResNet or sgr_d2's build_dilated_resnet_backbone)"
        )
    return comp, in_feature, prefix, inner, fpn_prefix


def _load_checkpoint(path: str):
    """(model state, the checkpoint's other keys) of ``path``, read by sgr_d2's safe reader."""
    try:
        ckpt = read_checkpoint_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--weights file {path} does not exist") from None
    except (UnsafeWeightsError, WeightsReadError) as e:  # their message names the file
        raise ExportError(f"--weights: {str(e).rstrip('.')}; expected a train_net.py checkpoint (.pth)") from e
    state = ckpt["model"]
    if not isinstance(state, dict):
        raise ExportError(f"--weights {path}: its 'model' is a {type(state).__name__}; expected a state dict")
    rest = [k for k in ckpt if k != "model"]
    if any(not isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"--weights {path}: its model state holds non-tensor values; expected a "
                          "state dict")
    state = OrderedDict(state)
    consume_prefix_in_state_dict_if_present(state, "module.")
    return state, rest


def _groups(keys) -> str:
    """``backbone.backbone.res2.* (24), backbone.sgr.* (40)``: keys counted by module."""
    counts: Dict[str, int] = OrderedDict()
    for k in sorted(keys):
        parts = k.split(".")
        i = 0
        while i < len(parts) - 1 and parts[i] in ("backbone", "bottom_up"):
            i += 1
        g = ".".join(parts[: i + 1]) + ".*"
        counts[g] = counts.get(g, 0) + 1
    return ", ".join(f"{g} ({n})" for g, n in counts.items())


def _check_fits(state: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], weights: str,
                config: str, comp: Optional[str]) -> None:
    ck = {k for k in state if k.startswith("backbone.")}
    ex = {k for k in expected if k.startswith("backbone.")}
    if not ck:
        raise ExportError(f"--weights {weights} has no 'backbone.*' tensors; expected a segmentation "
                          f"checkpoint of {config} (e.g. output/.../model_final.pth)")
    missing, unexpected = sorted(ex - ck), sorted(ck - ex)
    shapes = [(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in sorted(ck & ex)
              if state[k].shape != expected[k].shape]
    if not (missing or unexpected or shapes):
        return
    lines = [f"--weights {weights} does not fit {config}:"]
    if missing:
        lines.append(f"  {len(missing)} backbone tensors of the config's model are not in the checkpoint: "
                     f"{_groups(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} backbone tensors of the checkpoint are not in the config's "
                     f"model: {_groups(unexpected)}")
    for k, a, b in shapes[:4]:
        lines.append(f"  {k}: shape {a} in the checkpoint, {b} in the config's model")
    for _, name in _COMPONENTS:
        has = any(k.startswith(f"backbone.{name}.") for k in ck)
        if has and comp != name:
            lines.append(f"  the checkpoint has a {name.upper()} component (backbone.{name}.*) but the "
                         f"config builds none: give the config it was trained with (..._{name}.yaml)")
        if comp == name and not has:
            lines.append(f"  the config has a {name.upper()} component but the checkpoint has none: "
                         "give the config the checkpoint was trained with")
    lines.append("  (give the config, and KEY VALUE overrides, that the checkpoint was trained with)")
    raise ExportError("\n".join(lines))


def _map(state, comp, in_feature, prefix, resnet: ResNet, fpn_prefix, target):
    """Rename the kept tensors; return (out state, [(action, from, to, why, count)])."""
    if comp is not None:
        stages = [n for n, _ in resnet.named_children()]
        if in_feature not in stages:
            raise ExportError(
                f"MODEL.{comp.upper()}.IN_FEATURE is {in_feature!r}, which is not a stage of the ResNet "
                f"{stages}: only a component inside the ResNet can be transferred"
            )
        if target == "c4" and in_feature == "res5":
            raise ExportError(
                f"--target c4: the segmentation model has {comp.upper()} after res5 "
                f"(MODEL.{comp.upper()}.IN_FEATURE res5), but in Mask R-CNN C4 the backbone ends at res4 "
                "and res5 runs per RoI in the ROI head; the component's weights (built for res5's "
                "channels) fit no stage of the C4 backbone. Use --target fpn, or train the segmentation "
                f"model with MODEL.{comp.upper()}.IN_FEATURE res4 (configs/*/mask_rcnn_*_c4_{comp}.yaml "
                "expect that)"
            )
    det = "backbone.backbone." if comp else "backbone."
    res5_fits = False
    if target == "c4" and hasattr(resnet, "res5"):
        blocks = list(resnet.res5)
        res5_fits = len(blocks) == 3 and all(isinstance(b, BottleneckBlock) for b in blocks)
    out = OrderedDict()
    report: Dict[Tuple[str, str, str, str], int] = OrderedDict()

    def note(action, src, dst, why=""):
        report[(action, src, dst, why)] = report.get((action, src, dst, why), 0) + 1

    for k, v in state.items():
        if comp and k.startswith(f"backbone.{comp}."):
            if comp == "sgr" and k.startswith("backbone.sgr.classifier."):
                note("dropped", "backbone.sgr.classifier.*", "",
                     "SGR class term: names tokens with the segmentation classes; no SGR loss in Mask R-CNN")
                continue
            out[k] = v
            note("kept", f"backbone.{comp}.*", f"backbone.{comp}.*", f"{comp.upper()} after {in_feature}")
        elif k.startswith(prefix):
            rel = k[len(prefix):]
            stage = rel.split(".", 1)[0]
            if target == "fpn":
                out[det + "bottom_up." + rel] = v
                note("kept", f"{prefix}{stage}.*", f"{det}bottom_up.{stage}.*")
            elif stage == "res5":
                if res5_fits:
                    out["roi_heads." + rel] = v
                    note("kept", f"{prefix}res5.*", "roi_heads.res5.*", "Res5ROIHeads")
                else:
                    note("dropped", f"{prefix}res5.*", "",
                         "basic-block res5 (ResNet-18/34) does not fit Res5ROIHeads' bottleneck res5")
            else:
                out[det + rel] = v
                note("kept", f"{prefix}{stage}.*", f"{det}{stage}.*")
        elif fpn_prefix and k.startswith(fpn_prefix):
            note("dropped", f"{fpn_prefix}*", "", "the segmentation FPN's own convs")
        else:
            head = k.split(".", 1)[0]
            note("dropped", f"{head}.*", "", "segmentation head" if head != "backbone" else "")
    rows = [(a, s, d, w, n) for (a, s, d, w), n in report.items()]
    return out, rows


def _verify(out: Dict[str, torch.Tensor], det_cfg, det_config: str, target: str, rows: list) -> None:
    model = build_model(det_cfg)
    model_state = model.state_dict()
    modules = dict(model.named_modules())
    frozen = [k for k in out if k not in model_state and k.endswith(".num_batches_tracked")
              and isinstance(modules.get(k[: -len(".num_batches_tracked")]), FrozenBatchNorm2d)]
    for k in frozen:
        del out[k]
    if frozen:
        rows.append(("dropped", "*.num_batches_tracked", "", "FrozenBN in the detection model", len(frozen)))
    extra = sorted(k for k in out if k not in model_state)
    shapes = [(k, tuple(out[k].shape), tuple(model_state[k].shape)) for k in out
              if k in model_state and out[k].shape != model_state[k].shape]
    fpn_own = ("fpn_lateral", "fpn_output", "top_block")
    needed = [k for k in model_state if k.startswith("backbone.")
              and not any(p in k for p in fpn_own) and k not in out]
    if target == "c4" and any(k.startswith("roi_heads.res5.") for k in out):
        needed += [k for k in model_state if k.startswith("roi_heads.res5.") and k not in out]
    if not (extra or shapes or needed):
        return
    lines = [f"the export does not fit {det_config}:"]
    if extra:
        lines.append(f"  {len(extra)} exported tensors are not in its model, e.g. {extra[:4]}")
    for k, a, b in shapes[:4]:
        lines.append(f"  {k}: shape {a} exported, {b} in its model")
    if needed:
        lines.append(f"  {len(needed)} of its backbone tensors would stay uninitialised, e.g. {needed[:4]}")
    lines.append("  (its MODEL.BACKBONE / MODEL.SGR / MODEL.GLORE / MODEL.RESNETS settings must describe "
                 "the same ResNet and component as the segmentation config)")
    raise ExportError("\n".join(lines))


def export_backbone(seg_cfg, weights: str, target: Optional[str] = None, det_cfg=None,
                    config_name: str = "the segmentation config",
                    det_config_name: str = "the detection config"):
    """Return ``(state_dict, report rows, target)`` for Mask R-CNN; raises ExportError."""
    if is_detection(seg_cfg):
        raise ExportError(f"{config_name} is a {seg_cfg.MODEL.META_ARCHITECTURE} config; expected the "
                          "segmentation model's config (the checkpoint's)")
    if det_cfg is not None:
        if not is_detection(det_cfg):
            raise ExportError(f"{det_config_name} has MODEL.META_ARCHITECTURE "
                              f"{det_cfg.MODEL.META_ARCHITECTURE!r}; expected GeneralizedRCNN")
        det_cfg = _cpu(det_cfg)
        det_target = "c4" if det_cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeads" else "fpn"
        if target is None:
            target = det_target
        elif target != det_target:
            raise ExportError(f"--target {target}, but {det_config_name} is a {det_target.upper()} model "
                              f"(MODEL.ROI_HEADS.NAME {det_cfg.MODEL.ROI_HEADS.NAME!r})")
    target = target or "fpn"
    if target not in TARGETS:
        raise ExportError(f"--target is {target!r}; expected one of {TARGETS}")
    model = build_model(_cpu(seg_cfg))
    comp, in_feature, prefix, resnet, fpn_prefix = _layout(model)
    state, rest = _load_checkpoint(weights)
    _check_fits(state, model.state_dict(), weights, config_name, comp)
    out, rows = _map(state, comp, in_feature, prefix, resnet, fpn_prefix, target)
    if rest:
        rows.append(("dropped", ", ".join(rest), "", "training state" if
                     set(rest) <= set(_TRAINING_STATE) else "not model weights", len(rest)))
    if det_cfg is not None:
        _verify(out, det_cfg, det_config_name, target, rows)
    return out, rows, target


def format_report(rows: List[tuple]) -> str:
    lines = []
    for action, src, dst, why, n in rows:
        arrow = f" -> {dst}" if dst else ""
        lines.append(f"  {action:8s}{n:5d}  {src}{arrow}" + (f"  ({why})" if why else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="the segmentation config of the checkpoint")
    p.add_argument("--weights", required=True, help="the segmentation checkpoint (.pth)")
    p.add_argument("--output", required=True, help="the .pth to write")
    p.add_argument("--target", choices=TARGETS, default=None,
                   help="Mask R-CNN layout (default: from --det-config, else fpn)")
    p.add_argument("--det-config", default=None, help="a Mask R-CNN config to check the export against")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of --config-file")
    args = p.parse_args(argv)
    try:
        seg_cfg = load_config(args.config_file, args.opts)
        det_cfg = load_config(args.det_config) if args.det_config else None
        out, rows, target = export_backbone(seg_cfg, args.weights, args.target, det_cfg,
                                            config_name=f"--config-file {args.config_file}",
                                            det_config_name=f"--det-config {args.det_config}")
    except (ExportError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"export_backbone: error: {e}", file=sys.stderr)
        return 2
    folder = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(folder, exist_ok=True)
    atomic_torch_save({"model": out, "__author__": AUTHOR}, args.output)
    print(f"export_backbone: {args.weights} ({args.config_file}) -> {args.output}, "
          f"Mask R-CNN {target.upper()}, {len(out)} tensors")
    print(format_report(rows))
    if args.det_config:
        print(f"checked against {args.det_config}: every backbone tensor is initialised")
    return 0


if __name__ == "__main__":
    sys.exit(main())
