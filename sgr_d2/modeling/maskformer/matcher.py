"""Hungarian matching of predicted (class, mask) pairs to the ground-truth segments of an image."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from ...sgr.precision import autocast_off
from ...config import MASK_LOSS_TYPES
from .losses import pairwise_dice, pairwise_sigmoid_ce, pairwise_sigmoid_focal, point_sample

__all__ = ["HungarianMatcher"]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to target masks minimising

    ``C[q, j] = cost_class · (−softmax(logits_q)[c_j]) + cost_mask · mask_loss(m_q, M_j)
    + cost_dice · dice(m_q, M_j)``

    with ``mask_loss`` the mean sigmoid cross-entropy (or focal loss) over the pixels or points.
    With ``num_points > 0`` (Mask2Former) both masks are read at the same ``num_points``
    uniformly random points of the image; with ``num_points == 0`` (MaskFormer) the targets are
    resized (nearest) to the prediction resolution and compared pixel by pixel.
    """

    def __init__(self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0,
                 num_points: int = 0, mask_loss_type: str = "sigmoid_ce"):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all costs are 0 (MODEL.MASK_FORMER.CLASS_WEIGHT, "
                             "MASK_WEIGHT, DICE_WEIGHT); at least one must be positive")
        if mask_loss_type not in MASK_LOSS_TYPES:
            raise ValueError(f"HungarianMatcher: mask_loss_type is {mask_loss_type!r}; expected one of "
                             f"{list(MASK_LOSS_TYPES)}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.mask_loss_type = mask_loss_type

    @torch.no_grad()
    def cost_matrix(self, logits: torch.Tensor, masks: torch.Tensor, tgt_labels: torch.Tensor,
                    tgt_masks: torch.Tensor) -> torch.Tensor:
        """(Q, num_classes + 1) logits, (Q, h, w) mask logits, (N,) labels, (N, H, W) masks -> (Q, N),
        in float32 with autocast off."""
        with autocast_off(logits.device):
            return self._cost_matrix(logits, masks, tgt_labels, tgt_masks)

    def _cost_matrix(self, logits, masks, tgt_labels, tgt_masks):
        prob = logits.float().softmax(-1)
        cost_class = -prob[:, tgt_labels]
        out = masks.float()
        tgt = tgt_masks.to(out)
        if self.num_points > 0:
            coords = torch.rand(1, self.num_points, 2, device=out.device)
            tgt = point_sample(tgt[:, None], coords.expand(tgt.shape[0], -1, -1))[:, 0]
            out = point_sample(out[:, None], coords.expand(out.shape[0], -1, -1))[:, 0]
        else:
            if tgt.shape[-2:] != out.shape[-2:]:
                tgt = F.interpolate(tgt[:, None], size=out.shape[-2:], mode="nearest")[:, 0]
            tgt = tgt.flatten(1)
            out = out.flatten(1)
        if self.mask_loss_type == "focal":
            cost_mask = pairwise_sigmoid_focal(out, tgt)
        else:
            cost_mask = pairwise_sigmoid_ce(out, tgt)
        cost_dice = pairwise_dice(out, tgt)
        return self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
                ) -> Optional[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """``outputs``: ``pred_logits`` (B, Q, K+1), ``pred_masks`` (B, Q, h, w); ``targets``: per
        image ``labels`` (N,) and ``masks`` (N, H, W). Returns per image (query indices, target
        indices), int64 tensors of length min(Q, N) on the predictions' device, sorted by query
        index; None when the predictions hold NaN or infinite values (no assignment is possible).

        One host sync for the whole batch: every image's cost matrix, and whether the predictions
        are finite, reach the host in one transfer (scipy assigns there); the indices go back in
        one copy, while the device has nothing queued."""
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"HungarianMatcher: {logits.shape[0]} images but {len(targets)} targets")
        costs = [self.cost_matrix(logits[b], masks[b], t["labels"], t["masks"]) if len(t["labels"]) else None
                 for b, t in enumerate(targets)]
        finite = (torch.isfinite(logits).all() & torch.isfinite(masks).all()).float().view(1)
        host = torch.cat([finite] + [c.flatten().float() for c in costs if c is not None]).cpu().numpy()
        if host[0] != 1.0:
            return None
        assigned, offset = [], 1
        for cost in costs:
            if cost is None:
                assigned += [np.zeros(0, np.int64)] * 2
                continue
            c = host[offset:offset + cost.numel()].reshape(cost.shape)
            offset += cost.numel()
            if not np.isfinite(c).all():
                raise FloatingPointError("HungarianMatcher: the cost matrix holds NaN or inf")
            rows, cols = linear_sum_assignment(c)
            assigned += [rows.astype(np.int64), cols.astype(np.int64)]
        pieces = torch.split(torch.as_tensor(np.concatenate(assigned)).to(logits.device),
                             [len(a) for a in assigned])
        return [(pieces[2 * b], pieces[2 * b + 1]) for b in range(len(targets))]
