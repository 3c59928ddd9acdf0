"""Optimiser parameter groups (×LR for SGR and head, no decay on norms) and the poly schedule."""
from __future__ import annotations

import itertools

import torch
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler

from detectron2.layers import FrozenBatchNorm2d
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler

__all__ = ["build_optimizer", "build_poly_lr_scheduler", "param_groups", "NORM_TYPES"]

NORM_TYPES = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    FrozenBatchNorm2d,
)
# parameters that transformer recipes exclude from weight decay (Swin, DETR-style queries; the
# queries and the decoder's level embedding are nn.Embedding, which never decays). As in
# MaskFormer / Mask2Former, the pixel decoder's level embedding (an nn.Parameter) does decay.
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "query_embed")


def _is_norm(module) -> bool:
    return isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower()


def param_groups(cfg, model):
    """One group per parameter with its LR and weight decay: ``BASE_LR × SOLVER.BACKBONE_MULTIPLIER``
    for the backbone, ``× SOLVER.HEAD_LR_MULTIPLIER`` for everything else, the SGR (GloRe) component
    ``backbone.sgr.*`` included (×10 for ResNets in the paper's recipe); ``SOLVER.WEIGHT_DECAY_NORM``
    on norms, ``WEIGHT_DECAY_BIAS`` (when set) on other biases, no decay on ``nn.Embedding`` weights
    and names in ``NO_DECAY_NAMES``."""
    s = cfg.SOLVER
    wd_bias = s.WEIGHT_DECAY if s.WEIGHT_DECAY_BIAS is None else s.WEIGHT_DECAY_BIAS
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{pname}" if module_name else pname
            in_backbone = full.startswith("backbone.") and not full.startswith(("backbone.sgr.", "backbone.glore."))
            lr = s.BASE_LR * (s.BACKBONE_MULTIPLIER if in_backbone else s.HEAD_LR_MULTIPLIER)
            if _is_norm(module):
                wd = s.WEIGHT_DECAY_NORM
            elif isinstance(module, torch.nn.Embedding) or any(n in pname for n in NO_DECAY_NAMES):
                wd = 0.0
            elif pname == "bias":
                wd = wd_bias
            else:
                wd = s.WEIGHT_DECAY
            groups.append({"params": [p], "lr": lr, "weight_decay": wd, "name": full})
    return groups


def build_optimizer(cfg, model):
    groups = param_groups(cfg, model)
    kind = cfg.SOLVER.OPTIMIZER.upper()
    if kind == "SGD":
        opt_cls = torch.optim.SGD
        kwargs = dict(lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV)
    elif kind == "ADAMW":
        opt_cls = torch.optim.AdamW
        kwargs = dict(lr=cfg.SOLVER.BASE_LR)
    else:
        raise ValueError(f"SOLVER.OPTIMIZER is {cfg.SOLVER.OPTIMIZER!r}; expected 'SGD' or 'ADAMW'")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        return _full_model_clipping(opt_cls, clip.CLIP_VALUE, clip.NORM_TYPE)(groups, **kwargs)
    return maybe_add_gradient_clipping(cfg, opt_cls)(groups, **kwargs)


def _full_model_clipping(optim_cls, max_norm: float, norm_type: float):
    """The optimiser class, clipping the gradient norm of all its parameters together before each
    step (MaskFormer's "full_model" clipping, which detectron2's own clipping does not offer)."""

    class FullModelGradientClipping(optim_cls):
        def step(self, closure=None):
            params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = f"{optim_cls.__name__}WithFullModelGradientClipping"
    return FullModelGradientClipping


def build_poly_lr_scheduler(cfg, optimizer):
    """``(1 - iter / MAX_ITER) ** SOLVER.POLY_LR_POWER`` every iteration, after detectron2's warmup."""
    s = cfg.SOLVER
    sched = PolynomialDecayParamScheduler(base_value=1.0, power=s.POLY_LR_POWER)
    sched = WarmupParamScheduler(sched, s.WARMUP_FACTOR, min(s.WARMUP_ITERS / s.MAX_ITER, 1.0), s.WARMUP_METHOD)
    return LRMultiplier(optimizer, multiplier=sched, max_iter=s.MAX_ITER)
