"""Per-pixel semantic segmentation with the SGR loss added to the head's loss."""
from __future__ import annotations

from typing import Optional

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from ...sgr import SGRCriterion
from ..backbone.sgr_backbone import SGR_OUTPUTS, SGRBackbone
from ..sgr_outputs import attach_sgr_regions, build_sgr_criterion, pad_component_targets, sgr_losses

__all__ = ["SGRSemanticSegmentor"]


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
        padded_hw = tuple(images.tensor.shape[-2:])
        if self.training:  # the targets reach the device before the forward pass is queued
            targets = [x["sem_seg"].to(self.device) for x in batched_inputs]
            targets = ImageList.from_tensors(targets, self.size_divisibility, self.ignore_value).tensor
            components = (pad_component_targets(batched_inputs, padded_hw, self.device)
                          if self.sgr_criterion is not None else None)
        features = self.backbone(images.tensor)
        sgr_outputs = features.pop(SGR_OUTPUTS, None)
        if self.training:
            _, losses = self.sem_seg_head(features, targets)
            losses.update(sgr_losses(self.sgr_criterion, sgr_outputs, components))
            return losses
        logits, _ = self.sem_seg_head(features, None)
        results = []
        for logit, x, image_size in zip(logits, batched_inputs, images.image_sizes):
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            r = sem_seg_postprocess(logit, image_size, height, width)
            results.append({"sem_seg": r.softmax(dim=0)})
        return attach_sgr_regions(results, sgr_outputs, images.image_sizes, padded_hw)
