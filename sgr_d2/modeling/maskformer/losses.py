"""Binary mask losses, their pairwise (matching-cost) forms, and point sampling.

All mask inputs are *logits*. A row is one mask, flattened over its pixels or sampled points.

* ``dice_loss``: ``1 - (2 Σ p t + 1) / (Σ p + Σ t + 1)`` with ``p = sigmoid(x)``;
* ``sigmoid_ce_loss``: the binary cross-entropy averaged over the row's points;
* ``sigmoid_focal_loss``: the focal loss (α = 0.25, γ = 2, Lin et al.) averaged over the points.

Each is summed over the rows and divided by ``num_masks`` (the batch's number of target masks,
averaged over workers), as MaskFormer does. ``pairwise_*`` give the (num_preds, num_targets)
matrices of the same quantities, for the Hungarian matcher.

Points (Mask2Former, after PointRend): ``point_sample`` reads maps at continuous coordinates in
[0, 1] × [0, 1] (``(x, y)``, 0 and 1 being the outer edges of the map) by bilinear interpolation;
``uncertain_point_coords`` oversamples random points and keeps the most uncertain ones.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

__all__ = [
    "dice_loss",
    "sigmoid_ce_loss",
    "sigmoid_focal_loss",
    "pairwise_dice",
    "pairwise_sigmoid_ce",
    "pairwise_sigmoid_focal",
    "point_sample",
    "logit_uncertainty",
    "uncertain_point_coords",
    "FOCAL_ALPHA",
    "FOCAL_GAMMA",
]

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Σ_rows (1 - (2 Σ p t + 1) / (Σ p + Σ t + 1)) / num_masks, with p = sigmoid(inputs).
    Not ``sgr_d2.sgr.losses.weighted_dice``: that one weights pixels and takes probabilities."""
    p = inputs.sigmoid().flatten(1)
    t = targets.flatten(1)
    numerator = 2 * (p * t).sum(-1)
    denominator = p.sum(-1) + t.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Σ_rows mean_points BCE(sigmoid(inputs), targets) / num_masks."""
    loss = F.binary_cross_entropy_with_logits(inputs.flatten(1), targets.flatten(1), reduction="none")
    return loss.mean(1).sum() / num_masks


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float,
                       alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Σ_rows mean_points focal(sigmoid(inputs), targets) / num_masks; the per-point loss is
    torchvision's ``sigmoid_focal_loss``."""
    loss = tv_sigmoid_focal_loss(inputs.flatten(1), targets.flatten(1), alpha=alpha, gamma=gamma)
    return loss.mean(1).sum() / num_masks


def pairwise_dice(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(Q, P) logits × (N, P) targets -> (Q, N) dice losses.
    Not :func:`dice_loss` (matched rows) nor ``sgr.matching.pairwise_cost``'s (weighted probabilities)."""
    p = inputs.sigmoid()
    numerator = 2 * p @ targets.T
    denominator = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def pairwise_sigmoid_ce(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(Q, P) logits × (N, P) targets -> (Q, N) mean binary cross-entropies."""
    n = inputs.shape[1]
    pos = F.softplus(-inputs)  # -log(sigmoid(x))
    neg = F.softplus(inputs)  # -log(1 - sigmoid(x))
    return (pos @ targets.T + neg @ (1 - targets).T) / max(n, 1)


def pairwise_sigmoid_focal(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = FOCAL_ALPHA,
                           gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """(Q, P) logits × (N, P) targets -> (Q, N) mean focal losses."""
    n = inputs.shape[1]
    p = inputs.sigmoid()
    pos = (1 - p) ** gamma * F.softplus(-inputs)
    neg = p ** gamma * F.softplus(inputs)
    if alpha >= 0:
        pos = pos * alpha
        neg = neg * (1 - alpha)
    return (pos @ targets.T + neg @ (1 - targets).T) / max(n, 1)


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of ``inputs`` (R, C, H, W) at ``coords`` (R, P, 2) -> (R, C, P).

    ``coords[..., 0]`` is x (width), ``coords[..., 1]`` is y (height), both in [0, 1] across the
    whole map: pixel (i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H). Outside the map
    the values fall off to 0 (grid_sample's zero padding).
    """
    if inputs.dim() != 4 or coords.dim() != 3 or coords.shape[-1] != 2:
        raise ValueError(f"point_sample expects (R, C, H, W) maps and (R, P, 2) coordinates, got "
                         f"{tuple(inputs.shape)} and {tuple(coords.shape)}")
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(inputs.dtype)  # (R, P, 1, 2)
    return F.grid_sample(inputs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[..., 0]


def logit_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of a binary prediction: ``-|logit|`` (largest at the decision boundary)."""
    return -logits.abs()


def uncertain_point_coords(logits: torch.Tensor, num_points: int, oversample_ratio: float,
                           importance_sample_ratio: float,
                           uncertainty: Callable[[torch.Tensor], torch.Tensor] = logit_uncertainty,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Importance-sampled points of (R, 1, H, W) mask ``logits`` -> (R, num_points, 2) in [0, 1].

    ``num_points × oversample_ratio`` points are drawn uniformly; of them the
    ``int(importance_sample_ratio × num_points)`` with the highest ``uncertainty`` are kept, and
    the remaining points are drawn uniformly again.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio is {oversample_ratio}; expected >= 1")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio is {importance_sample_ratio}; expected in [0, 1]")
    r = logits.shape[0]
    device = logits.device
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(r, num_sampled, 2, device=device, generator=generator)
    u = uncertainty(point_sample(logits, coords))[:, 0, :]  # (R, num_sampled)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(u, k=num_uncertain, dim=1).indices  # (R, num_uncertain)
    picked = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_random > 0:
        picked = torch.cat([picked, torch.rand(r, num_random, 2, device=device, generator=generator)], 1)
    return picked
