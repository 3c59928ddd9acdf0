"""SGR losses from connected components (docs/method.md#supervision-from-connected-components): union, class and diversity terms.

Resolution: the component masks are resized *down* to the region maps' resolution with area
interpolation, so a target pixel holds the fraction of its area covered by the component.
Pixels of the ignore label (and the padding) belong to no component; each reduced pixel is
weighted by its labelled fraction ``w(x) = Σ_j M_j(x)`` and its targets are divided by it.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .matching import assign, check_matching, pairwise_cost
from .precision import autocast_off

__all__ = ["SGRCriterion", "downsample_components", "downsample_component_labels", "weighted_bce",
           "weighted_dice", "world_mean_count"]

logger = logging.getLogger(__name__)


def downsample_components(masks: torch.Tensor, size: Sequence[int], eps: float = 1e-6):
    """(N, H, W) bool masks -> ((N, h*w) soft targets, (h*w,) pixel weights)."""
    n = masks.shape[0]
    if n == 0:
        weight = masks.new_zeros((int(size[0]) * int(size[1]),), dtype=torch.float32)
        return masks.new_zeros((0, weight.numel()), dtype=torch.float32), weight
    soft = F.interpolate(masks[None].float(), size=tuple(size), mode="area")[0]  # (N, h, w)
    return _normalise(soft.flatten(1), eps)


def downsample_component_labels(labels: torch.Tensor, num: int, size: Sequence[int], eps: float = 1e-6):
    """Like :func:`downsample_components`, from an (H, W) component-id map (-1 = none).

    When the reduced size divides the map (the training case: crops padded to the backbone's
    size divisibility) the area average is a histogram of each reduced cell, O(H·W) whatever
    the number of components; otherwise the masks are expanded and interpolated.
    """
    h, w = int(size[0]), int(size[1])
    big_h, big_w = labels.shape
    if num == 0:
        weight = torch.zeros(h * w, device=labels.device)
        return weight.new_zeros((0, h * w)), weight
    if big_h % h or big_w % w:
        masks = labels.unsqueeze(0) == torch.arange(num, device=labels.device).view(-1, 1, 1)
        return downsample_components(masks, size, eps)
    fy, fx = big_h // h, big_w // w
    # key = (component + 1) * cells + cell, with component -1 (none) landing in row 0, which is
    # dropped: one bincount, no boolean indexing.
    dev = labels.device
    cell = torch.arange(h, device=dev).view(h, 1, 1, 1) * w + torch.arange(w, device=dev).view(1, 1, w, 1)
    key = (labels.long() + 1).reshape(h, fy, w, fx) * (h * w) + cell
    # scatter_add, not bincount: CUDA's bincount reads the largest key back to the host (a sync)
    key = key.reshape(-1)
    counts = torch.zeros((num + 1) * h * w, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
    counts = counts[h * w:].view(num, h * w).float()
    return _normalise(counts / (fy * fx), eps)


def _normalise(soft: torch.Tensor, eps: float):
    weight = soft.sum(0).clamp(max=1.0)
    targets = soft / weight.clamp(min=eps)
    return targets.clamp(max=1.0), weight


def weighted_bce(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """Per-row weighted mean of binary cross-entropy between probabilities and targets."""
    p = pred.clamp(eps, 1 - eps)
    bce = -(target * torch.log(p) + (1 - target) * torch.log1p(-p))
    return (bce * weight).sum(-1) / weight.sum().clamp(min=eps)


def weighted_dice(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor):
    """Per-row ``1 - (2 Σ w p t + 1) / (Σ w p + Σ w t + 1)``.

    Not MaskFormer's ``dice_loss``: that one is unweighted, takes logits and sums over rows."""
    inter = (pred * target * weight).sum(-1)
    return 1 - (2 * inter + 1) / ((pred * weight).sum(-1) + (target * weight).sum(-1) + 1)


def world_mean_count(counts: Sequence[float], device) -> torch.Tensor:
    """The mean over distributed workers of each of ``counts`` (host numbers), at least 1, as a
    tensor on ``device``: loss normalisers, as MaskFormer averages its mask count.

    A tensor collective on the default process group (NCCL on a cluster): its tensor is created
    on ``device``, the device of the losses it normalises, i.e. the model's device, never the
    CPU of a GPU run. Every worker must call it the same number of times. No ``.item()``: the
    losses are divided by the tensor, so the normaliser adds no host sync to the step."""
    t = torch.as_tensor([float(c) for c in counts], dtype=torch.float32, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t = t / torch.distributed.get_world_size()
    return t.clamp(min=1.0)


class SGRCriterion(nn.Module):
    """Computes ``β · (w_u L_union + w_c L_cls + w_d L_div)`` from SGR outputs and components.

    ``forward(outputs, targets)``:
      * ``outputs``: the dict returned by :class:`SGRModule` (``region_maps`` (B, K, h, w),
        optional ``token_logits`` (B, K, num_classes));
      * ``targets``: one dict per image with ``classes`` (N,) int64 and either ``labels``, the
        (H, W) component-id map (-1 = no component) at the (padded) input resolution, as the
        dataset mapper emits it, or ``masks``, (N, H, W) bool.
    Returns ``{"loss_sgr_union", "loss_sgr_cls", "loss_sgr_div"}``, already weighted, computed in
    float32 with autocast off whatever the caller's autocast state (mixed-precision training).

    Every parameter that produced ``region_maps`` and ``token_logits`` is in the graph of the
    returned terms, even for a batch without components (a zero contribution), as
    ``DistributedDataParallel(find_unused_parameters=False)`` requires on every worker. Region
    maps with NaN or infinite values skip the matching (which cannot rank them) and make every
    term NaN, for the trainer's non-finite-loss check to report.
    """

    def __init__(
        self,
        num_matched: int = 64,
        matching: str = "hybrid",
        cost_dice_weight: float = 1.0,
        union_dice_weight: float = 1.0,
        union_weight: float = 1.0,
        class_weight: float = 1.0,
        diversity_weight: float = 1.0,
        loss_weight: float = 0.25,
        eps: float = 1e-6,
    ):
        super().__init__()
        check_matching(matching, "SGRCriterion: matching")
        self.num_matched = num_matched
        self.matching = matching
        self.cost_dice_weight = cost_dice_weight
        self.union_dice_weight = union_dice_weight
        self.union_weight = union_weight
        self.class_weight = class_weight
        self.diversity_weight = diversity_weight
        self.loss_weight = loss_weight
        self.eps = eps

    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]):
        # In float32 with autocast off (AMP): the matching cost, the assignment and the losses.
        outputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in outputs.items()}
        with autocast_off(outputs["region_maps"].device):
            return self._forward(outputs, targets)

    def _forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]):
        regions = outputs["region_maps"]
        token_logits: Optional[torch.Tensor] = outputs.get("token_logits")
        b, k, h, w = regions.shape
        dev = regions.device
        if len(targets) != b:
            raise ValueError(f"SGRCriterion: {b} images but {len(targets)} component targets")
        zero = regions.sum() * 0.0  # keeps the graph connected when nothing is supervised
        cls_zero = zero if token_logits is None else token_logits.sum() * 0.0
        # Each image's components at the maps' resolution and its cost matrix, on the device.
        images = []
        for i, tgt in enumerate(targets):
            classes = tgt["classes"].to(dev)
            if classes.numel() == 0:
                continue
            if "labels" in tgt:
                soft, weight = downsample_component_labels(tgt["labels"].to(dev), len(classes), (h, w), self.eps)
            else:
                soft, weight = downsample_components(tgt["masks"].to(dev), (h, w), self.eps)
            p = regions[i].flatten(1)  # (K, hw)
            with torch.no_grad():
                cost = pairwise_cost(p.detach(), soft, weight, self.cost_dice_weight, self.eps)
            images.append((i, classes, soft, weight, p, cost))
        # The one host sync of the SGR loss: every cost matrix of the batch and whether the region
        # maps are finite, in one transfer; the matching runs on the host (scipy).
        finite = torch.isfinite(regions.detach()).all().float().view(1)
        host = torch.cat([finite] + [c.flatten() for *_, c in images]).cpu().numpy()
        if host[0] != 1.0:
            world_mean_count([0, 0, 0], dev)  # the normalisers are all-reduced: every worker takes part
            logger.warning("SGRCriterion: the region maps hold NaN or infinite values; the SGR loss "
                           "terms are NaN and the token matching was skipped")
            nan = (zero + cls_zero) * float("nan")
            return {"loss_sgr_union": nan, "loss_sgr_cls": nan, "loss_sgr_div": nan}
        matches, offset = [], 1
        for *_, cost in images:
            c = host[offset:offset + cost.numel()].reshape(cost.shape)
            offset += cost.numel()
            tok, comp = assign(c, min(self.num_matched, k), self.matching)
            pairs = np.nonzero(np.triu(comp[:, None] != comp[None, :], k=1))  # tokens of different components
            matches.append((tok, comp, np.unique(comp), pairs[0].astype(np.int64), pairs[1].astype(np.int64)))
        # Every index array to the device in one copy (the queue is empty after the sync above).
        arrays = [a for m in matches for a in m]
        pieces = torch.split(torch.as_tensor(np.concatenate(arrays or [np.zeros(0, np.int64)])).to(dev),
                             [len(a) for a in arrays])
        union_sum, cls_sum, div_sum = zero, cls_zero, zero
        n_comp = n_tok = n_pairs = 0
        for j, (i, classes, soft, weight, p, _) in enumerate(images):
            tok, comp, matched, rows, cols = pieces[5 * j:5 * j + 5]
            union = p.new_zeros((soft.shape[0], p.shape[1])).index_add(0, comp, p[tok])
            union = union[matched].clamp(max=1.0)
            t = soft[matched]
            union_sum = union_sum + (
                weighted_bce(union, t, weight, self.eps)
                + self.union_dice_weight * weighted_dice(union, t, weight)
            ).sum()
            n_comp += len(matched)
            if token_logits is not None:
                cls_sum = cls_sum + F.cross_entropy(token_logits[i, tok], classes[comp], reduction="sum")
                n_tok += len(tok)
            if len(rows):
                pm = F.normalize(p[tok], dim=1, eps=self.eps)
                div_sum = div_sum + F.relu((pm @ pm.T)[rows, cols]).sum()
                n_pairs += len(rows)
        # Each term over its count averaged across workers (one all-reduce): the mean of the workers'
        # losses, which DDP's averaged gradients follow, is then the loss of the whole batch.
        n_comp, n_tok, n_pairs = world_mean_count([n_comp, n_tok, n_pairs], dev)
        beta = self.loss_weight
        return {
            "loss_sgr_union": beta * self.union_weight * union_sum / n_comp,
            "loss_sgr_cls": beta * self.class_weight * cls_sum / n_tok,
            "loss_sgr_div": beta * self.diversity_weight * div_sum / n_pairs,
        }
