"""The mask-classification loss of MaskFormer / Mask2Former (set prediction with Hungarian matching).

For every decoder output (the last and, with deep supervision, each earlier layer's as
``aux_outputs``) the predictions are matched to the targets, then

* ``loss_ce``: cross-entropy of every query's class scores against its matched target's class
  (``num_classes`` = "no object" for unmatched queries), the no-object class weighted by
  ``eos_coef``;
* ``loss_mask``: sigmoid cross-entropy (or focal loss) of the matched masks;
* ``loss_dice``: dice loss of the matched masks;

the mask losses divided by the number of target masks in the batch (averaged over workers).
Losses of aux output ``i`` carry the suffix ``_i``. The weights are applied by the caller
through ``weight_dict``.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ...sgr.losses import world_mean_count
from ...sgr.precision import autocast_off
from ...config import MASK_LOSS_TYPES
from .losses import (
    dice_loss,
    point_sample,
    sigmoid_ce_loss,
    sigmoid_focal_loss,
    uncertain_point_coords,
)

__all__ = ["SetCriterion", "mask_classification_weight_dict"]

logger = logging.getLogger(__name__)


def mask_classification_weight_dict(class_weight: float, mask_weight: float, dice_weight: float,
                                    num_aux: int) -> Dict[str, float]:
    """``{"loss_ce", "loss_mask", "loss_dice"}`` and their ``_i`` copies for ``num_aux`` aux outputs."""
    base = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
    out = dict(base)
    for i in range(num_aux):
        out.update({f"{k}_{i}": v for k, v in base.items()})
    return out


class SetCriterion(nn.Module):
    """Hungarian-matched classification + mask losses over the decoder outputs.

    Args:
        num_classes: K, without the no-object class.
        matcher: a :class:`HungarianMatcher`.
        weight_dict: loss name -> weight (see :func:`mask_classification_weight_dict`).
        eos_coef: weight of the no-object class in ``loss_ce``.
        num_points: 0 for losses on the full masks (predictions upsampled to the target
            resolution), else the number of importance-sampled points per mask.
        oversample_ratio, importance_sample_ratio: of the point sampling.
        mask_loss_type: "sigmoid_ce" or "focal".
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: Dict[str, float],
                 eos_coef: float = 0.1, losses: Sequence[str] = ("labels", "masks"), num_points: int = 0,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 mask_loss_type: str = "sigmoid_ce"):
        super().__init__()
        if mask_loss_type not in MASK_LOSS_TYPES:
            raise ValueError(f"SetCriterion: mask_loss_type is {mask_loss_type!r}; expected one of "
                             f"{list(MASK_LOSS_TYPES)}")
        unknown = set(losses) - {"labels", "masks"}
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {sorted(unknown)}; expected 'labels', 'masks'")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = list(losses)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.mask_loss_type = mask_loss_type
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    # ------------------------------------------------------------------ single losses
    def loss_labels(self, outputs, targets, indices, num_masks):
        logits = outputs["pred_logits"].float()  # (B, Q, K+1)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=logits.device)
        for b, ((src, tgt), t) in enumerate(zip(indices, targets)):
            target_classes[b, src.to(logits.device)] = t["labels"][tgt.to(t["labels"].device)].to(logits.device)
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits))
        return {"loss_ce": loss}

    def loss_masks(self, outputs, targets, indices, num_masks):
        pred = outputs["pred_masks"]  # (B, Q, h, w)
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(pred.device)
        src_idx = torch.cat([src for src, _ in indices]).to(pred.device)
        src_masks = pred[batch_idx, src_idx]  # (M, h, w)
        tgt_masks = [t["masks"][tgt.to(t["masks"].device)] for t, (_, tgt) in zip(targets, indices)]
        if src_masks.shape[0] == 0:
            zero = pred.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero}
        tgt_masks = torch.cat(tgt_masks).to(src_masks)  # (M, H, W)
        src_masks = src_masks.float()
        tgt_masks = tgt_masks.float()
        if self.num_points > 0:
            with torch.no_grad():
                coords = uncertain_point_coords(src_masks[:, None], self.num_points, self.oversample_ratio,
                                                self.importance_sample_ratio)
                point_labels = point_sample(tgt_masks[:, None], coords)[:, 0]
            point_logits = point_sample(src_masks[:, None], coords)[:, 0]
        else:
            point_logits = F.interpolate(src_masks[:, None], size=tgt_masks.shape[-2:], mode="bilinear",
                                         align_corners=False)[:, 0].flatten(1)
            point_labels = tgt_masks.flatten(1)
        mask_loss = sigmoid_focal_loss if self.mask_loss_type == "focal" else sigmoid_ce_loss
        return {
            "loss_mask": mask_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    def _losses_for(self, outputs, targets, num_masks, suffix=""):
        indices = self.matcher(outputs, targets)
        finite = indices is not None
        if not finite:
            # diverged predictions: no matching (its cost would be NaN); every loss term is NaN, so
            # the trainer's non-finite-loss guard stops the run as for any other NaN loss
            logger.warning("SetCriterion: the predictions%s hold NaN or infinite values; the mask "
                           "classification losses are NaN and the matching was skipped",
                           f" of decoder layer {suffix[1:]}" if suffix else "")
            empty = torch.zeros(0, dtype=torch.int64, device=outputs["pred_logits"].device)
            indices = [(empty, empty) for _ in targets]
        losses = {}
        for name in self.losses:
            fn = self.loss_labels if name == "labels" else self.loss_masks
            losses.update({k + suffix: v for k, v in fn(outputs, targets, indices, num_masks).items()})
        if not finite:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses

    def forward(self, outputs: Dict, targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """``outputs``: ``pred_logits``, ``pred_masks`` and optionally ``aux_outputs`` (a list of dicts
        with the same keys); ``targets``: per image ``labels`` (N,) int64 and ``masks`` (N, H, W).
        Returns the unweighted losses, computed in float32 with autocast off (the matching, the point
        sampling and the losses; as MaskFormer / Mask2Former do under mixed precision)."""
        with autocast_off(outputs["pred_logits"].device):
            return self._forward(outputs, targets)

    def _forward(self, outputs: Dict, targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        device = outputs["pred_logits"].device
        (num_masks,) = world_mean_count([sum(len(t["labels"]) for t in targets)], device)
        main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        losses = self._losses_for(main, targets, num_masks)
        for i, aux in enumerate(outputs.get("aux_outputs", []) or []):
            losses.update(self._losses_for(aux, targets, num_masks, suffix=f"_{i}"))
        return losses
