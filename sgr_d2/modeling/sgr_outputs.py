"""What the meta-architectures do with SGR's outputs: the loss in training, the region maps at
inference. Shared by the per-pixel segmentor and MaskFormer / Mask2Former.

An :class:`~sgr_d2.modeling.backbone.sgr_backbone.SGRBackbone` returns the component's outputs
beside its features (key ``SGR_OUTPUTS``); the meta-architecture pops them and passes them here.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch.nn import functional as F

from ..sgr import SGRCriterion

__all__ = ["build_sgr_criterion", "pad_component_targets", "sgr_losses", "crop_region_maps",
           "attach_sgr_regions"]


def build_sgr_criterion(cfg) -> SGRCriterion:
    s = cfg.MODEL.SGR
    return SGRCriterion(
        num_matched=s.NUM_MATCHED,
        matching=s.MATCHING,
        cost_dice_weight=s.COST_DICE_WEIGHT,
        union_dice_weight=s.UNION_DICE_WEIGHT,
        union_weight=s.UNION_WEIGHT,
        class_weight=s.CLASS_WEIGHT,
        diversity_weight=s.DIVERSITY_WEIGHT,
        loss_weight=s.LOSS_WEIGHT,
        eps=s.EPS,
    )


def pad_component_targets(batched_inputs: List[Dict], padded_hw, device) -> List[Dict[str, torch.Tensor]]:
    """The mapper's ``components`` of each image on ``device``, padded (bottom/right) to the batch
    size. Accepts the mapper's component-id map (``labels``, padded with -1) or boolean ``masks``
    (padded with False). The meta-architectures call it before the forward pass, so that the
    copies to the device wait for no queued work."""
    out = []
    for x in batched_inputs:
        if "components" not in x:
            raise KeyError(
                "SGR training needs the connected components of each image under the key 'components'; "
                "use sgr_d2's dataset mappers (INPUT.DATASET_MAPPER_NAME 'sgr_sem_seg' or 'sgr_mask_former_semantic')"
            )
        comp = x["components"]
        key, fill = ("labels", -1) if "labels" in comp else ("masks", False)
        value = comp[key].to(device)
        h, w = value.shape[-2:]
        value = F.pad(value, (0, padded_hw[1] - w, 0, padded_hw[0] - h), value=fill)
        out.append({key: value, "classes": comp["classes"].to(device)})
    return out


def sgr_losses(criterion: Optional[SGRCriterion], sgr_outputs: Optional[Dict[str, torch.Tensor]],
               components: Optional[List[Dict[str, torch.Tensor]]]) -> Dict[str, torch.Tensor]:
    """The SGR loss terms of one batch ({} for a model without SGR)."""
    if criterion is None:
        return {}
    if sgr_outputs is None:
        raise RuntimeError("the SGR component did not run in the backbone's forward pass")
    return criterion(sgr_outputs, components)


def crop_region_maps(regions: torch.Tensor, image_size, padded_hw) -> torch.Tensor:
    """The part of region maps (K, fh, fw) over a padded input that covers the image itself.

    The maps span the padded input (``padded_hw``), the image its top-left ``image_size`` (h, w).
    They are resampled (bilinear, as the label-sized maps are read: a map cell is centred on its
    stride-sized block, ``align_corners=False``) at the centres of a ``vh × vw`` grid that covers
    exactly the image, ``vh = min(fh, ceil(h · fh / H_pad))`` (likewise vw): the partial last cell
    is not stretched over the image. Without padding this is the maps themselves. Each output
    cell is a convex combination of the maps' cells, so ``Σ_k P_k`` is kept.
    """
    k, fh, fw = regions.shape
    h, w = int(image_size[0]), int(image_size[1])
    ph, pw = int(padded_hw[0]), int(padded_hw[1])
    if (h, w) == (ph, pw):
        return regions
    vh, vw = min(fh, -(-h * fh // ph)), min(fw, -(-w * fw // pw))
    dev = regions.device
    # cell centres in input pixels, as grid_sample coordinates of the padded extent (-1..1)
    ys = (torch.arange(vh, device=dev, dtype=torch.float32) + 0.5) * (h / vh) * (2.0 / ph) - 1.0
    xs = (torch.arange(vw, device=dev, dtype=torch.float32) + 0.5) * (w / vw) * (2.0 / pw) - 1.0
    grid = torch.stack([xs.view(1, vw).expand(vh, vw), ys.view(vh, 1).expand(vh, vw)], dim=-1)
    out = F.grid_sample(regions[None].float(), grid[None], mode="bilinear", padding_mode="border",
                        align_corners=False)[0]
    return out.to(regions.dtype)


def attach_sgr_regions(results, sgr_outputs: Optional[Dict[str, torch.Tensor]], image_sizes, padded_hw):
    """Add ``"sgr_regions"`` (K, h, w) to each inference result of a model with SGR.

    The region maps cover the padded batch; each image keeps the part over its own pixels,
    cropped exactly (:func:`crop_region_maps`), at about the feature stride. The token-semantics
    metrics and the figures read them, resized to the label map or image.
    """
    if sgr_outputs is None:
        return results
    regions = sgr_outputs["region_maps"]
    for i, (r, size) in enumerate(zip(results, image_sizes)):
        r["sgr_regions"] = crop_region_maps(regions[i], size, padded_hw)
    return results
