"""Cost matrix and token-to-component matching (docs/method.md#matching)."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["MATCHING_MODES", "assign", "check_matching", "pairwise_cost", "match_tokens"]

MATCHING_MODES = ("hybrid", "greedy", "hungarian")


def check_matching(mode: str, name: str = "matching") -> None:
    """Raise ValueError naming ``name`` unless ``mode`` is one of :data:`MATCHING_MODES`."""
    if mode not in MATCHING_MODES:
        raise ValueError(f"{name} is {mode!r}; expected 'hybrid', 'greedy' or 'hungarian'")


def pairwise_cost(
    regions: torch.Tensor,
    targets: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    dice_weight: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``C[k, j] = BCE(P_k, M_j) + ρ · Dice(P_k, M_j)``.

    Args:
        regions: P, (K, X) probabilities of the K region maps over X pixels.
        targets: M, (N, X) component masks in [0, 1] (soft at reduced resolution).
        weight: (X,) pixel weights (1 = labelled, 0 = ignore); None means all ones.
        dice_weight: ρ.

    BCE is the weighted mean over pixels; Dice is ``1 - (2 Σ w P M + 1) / (Σ w P + Σ w M + 1)``.
    Its dice is not MaskFormer's ``pairwise_dice`` (unweighted, logits) nor ``weighted_dice`` (matched rows).
    """
    if weight is None:
        weight = regions.new_ones(regions.shape[1])
    wsum = weight.sum().clamp(min=eps)
    p = regions.clamp(eps, 1 - eps)
    t = targets.to(regions.dtype)
    # log(1 - p) rather than log1p(-p): p >= eps keeps it accurate to ~1e-7 absolute, enough to
    # rank pairs, and log1p has no vectorised CPU kernel (4-5x slower here).
    log1mp = torch.log(1 - p) * weight
    logit = torch.log(p) * weight - log1mp
    pw = regions * weight
    # Σ w [M log P + (1 - M) log(1 - P)] = M·(w log P - w log(1 - P)) + Σ w log(1 - P)
    bce = -(logit @ t.T + log1mp.sum(1, keepdim=True)) / wsum
    tw = t * weight
    dice = 1 - (2 * (pw @ t.T) + 1) / (pw.sum(1, keepdim=True) + tw.sum(1).unsqueeze(0) + 1)
    return bce + dice_weight * dice


def assign(cost: np.ndarray, num_matched: int, mode: str = "hybrid") -> Tuple[np.ndarray, np.ndarray]:
    """Match tokens (rows of the host array ``cost``) to components (columns).

    Modes:
      * ``"hungarian"``: a one-to-one assignment minimising the total cost, of
        ``min(K, N, num_matched)`` pairs (when the optimal assignment has more pairs than
        ``num_matched``, its cheapest ``num_matched`` pairs are kept);
      * ``"greedy"``: the ``num_matched`` tokens with the lowest ``min_j cost[k, j]``, each to
        its ``argmin_j``;
      * ``"hybrid"`` (default, [method](../../docs/method.md#matching)): the hungarian pairs, then the remaining tokens with
        the lowest ``min_j cost[k, j]`` each to its ``argmin_j`` until ``num_matched`` tokens are
        matched. With ``num_matched >= N`` every component gets at least one token.

    Returns (token indices, component indices): int64 arrays of equal length.
    """
    check_matching(mode, "match_tokens: mode")
    if cost.ndim != 2:
        raise ValueError(f"match_tokens: cost must be (K, N), got shape {tuple(cost.shape)}")
    k, n = cost.shape
    if num_matched > k:
        raise ValueError(f"match_tokens: num_matched ({num_matched}) > number of tokens ({k})")
    rows = np.zeros(0, dtype=np.int64)
    cols = np.zeros(0, dtype=np.int64)
    if n == 0 or num_matched <= 0:
        return rows, cols
    c = np.asarray(cost, dtype=np.float32)
    if not np.isfinite(c).all():
        raise ValueError("match_tokens: the cost matrix has NaN or infinite entries")
    if mode in ("hungarian", "hybrid"):
        rows, cols = linear_sum_assignment(c)
        if len(rows) > num_matched:
            keep = np.sort(np.argsort(c[rows, cols], kind="stable")[:num_matched])
            rows, cols = rows[keep], cols[keep]
    if mode in ("greedy", "hybrid"):
        need = num_matched - len(rows)
        free = np.setdiff1d(np.arange(k), rows)
        order = np.argsort(c[free].min(axis=1), kind="stable")[:need]
        extra = free[order]
        rows = np.concatenate([rows, extra])
        cols = np.concatenate([cols, c[extra].argmin(axis=1)])
    return rows.astype(np.int64), cols.astype(np.int64)


def match_tokens(cost: torch.Tensor, num_matched: int, mode: str = "hybrid") -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`assign` on a (K, N) cost tensor: (token_idx, component_idx), int64 tensors on
    ``cost``'s device."""
    if cost.dim() != 2:
        raise ValueError(f"match_tokens: cost must be (K, N), got shape {tuple(cost.shape)}")
    rows, cols = assign(cost.detach().float().cpu().numpy(), num_matched, mode)
    return (torch.as_tensor(rows, dtype=torch.int64, device=cost.device),
            torch.as_tensor(cols, dtype=torch.int64, device=cost.device))
