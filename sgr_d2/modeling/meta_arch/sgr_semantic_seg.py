"""Per-pixel semantic segmentation with the SGR loss added to the head's loss (SGR_SPEC §2)."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from ...sgr import SGRCriterion
from ..sgr_backbone import SGRBackbone, attach_sgr_regions

__all__ = ["SGRSemanticSegmentor", "build_sgr_criterion", "pad_component_targets", "sgr_losses"]


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
    """The mapper's ``components`` of each image, padded (bottom/right) to the batch size.

    Accepts the mapper's component-id map (``labels``, padded with -1) or boolean ``masks``
    (padded with False).
    """
    out = []
    for x in batched_inputs:
        if "components" not in x:
            raise KeyError(
                "SGR training needs the connected components of each image under the key 'components'; "
                "use sgr_d2's dataset mapper (INPUT.DATASET_MAPPER_NAME 'sgr_sem_seg')"
            )
        comp = x["components"]
        key, fill = ("labels", -1) if "labels" in comp else ("masks", False)
        value = comp[key].to(device)
        h, w = value.shape[-2:]
        value = F.pad(value, (0, padded_hw[1] - w, 0, padded_hw[0] - h), value=fill)
        out.append({key: value, "classes": comp["classes"].to(device)})
    return out


def sgr_losses(backbone, criterion: Optional[SGRCriterion], batched_inputs, padded_hw, device):
    """The SGR loss terms for one batch ({} when the model has no SGR component)."""
    if criterion is None or not isinstance(backbone, SGRBackbone):
        return {}
    if backbone.sgr_outputs is None:
        raise RuntimeError("the SGR component did not run in the backbone's forward pass")
    targets = pad_component_targets(batched_inputs, padded_hw, device)
    return criterion(backbone.sgr_outputs, targets)


@META_ARCH_REGISTRY.register()
class SGRSemanticSegmentor(SemanticSegmentor):
    """detectron2's ``SemanticSegmentor`` plus the SGR loss, with probabilities at inference.

    Training returns the head's losses and, when the backbone is a :class:`SGRBackbone`,
    ``loss_sgr_union``, ``loss_sgr_cls`` and ``loss_sgr_div``. Inference returns, per image,
    ``{"sem_seg": (num_classes, height, width) softmax probabilities}`` and, with SGR,
    ``"sgr_regions"``: the (K, h, w) region maps over the image (see ``attach_sgr_regions``).
    """

    @configurable
    def __init__(self, *, sgr_criterion: Optional[SGRCriterion] = None, ignore_value: int = 255,
                 size_divisibility: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.sgr_criterion = sgr_criterion
        self.ignore_value = ignore_value
        self._size_divisibility = size_divisibility

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        if isinstance(ret["backbone"], SGRBackbone):
            ret["sgr_criterion"] = build_sgr_criterion(cfg)
        ret["ignore_value"] = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        ret["size_divisibility"] = cfg.INPUT.SIZE_DIVISIBILITY
        return ret

    @property
    def size_divisibility(self) -> int:
        if self._size_divisibility > 0:
            return self._size_divisibility
        return self.backbone.size_divisibility

    def forward(self, batched_inputs):
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.size_divisibility)
        features = self.backbone(images.tensor)
        if self.training:
            targets = [x["sem_seg"].to(self.device) for x in batched_inputs]
            targets = ImageList.from_tensors(targets, self.size_divisibility, self.ignore_value).tensor
            _, losses = self.sem_seg_head(features, targets)
            losses.update(sgr_losses(self.backbone, self.sgr_criterion, batched_inputs,
                                     images.tensor.shape[-2:], self.device))
            return losses
        logits, _ = self.sem_seg_head(features, None)
        results = []
        for logit, x, image_size in zip(logits, batched_inputs, images.image_sizes):
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            r = sem_seg_postprocess(logit, image_size, height, width)
            results.append({"sem_seg": r.softmax(dim=0)})
        return attach_sgr_regions(results, self.backbone, images.image_sizes, images.tensor.shape[-2:])
