"""MaskFormer / Mask2Former meta-architectures, with the SGR loss when the backbone has SGR.

Both names are one class: what makes a model MaskFormer or Mask2Former is its head
(``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``, ``MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``) and
its losses (``MODEL.MASK_FORMER.{MASK_LOSS_TYPE, TRAIN_NUM_POINTS, *_WEIGHT}``), set by the configs.
Their training data come from the dataset mapper ``INPUT.DATASET_MAPPER_NAME``
"sgr_mask_former_semantic" (the configs' Base-*.yaml set it), which emits the per-class
``instances`` these models train on.

Training returns the weighted mask-classification losses (``loss_ce``, ``loss_mask``,
``loss_dice`` and their ``_i`` copies for the aux outputs) and, with a :class:`SGRBackbone`,
``loss_sgr_union``, ``loss_sgr_cls``, ``loss_sgr_div`` (already β-weighted).
Inference returns, per image, ``{"sem_seg": (K, height, width)}`` — the semantic scores
``Σ_q softmax(class_q)[:K] · sigmoid(mask_q)`` — and, with SGR, ``"sgr_regions"``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from ...sgr import SGRCriterion
from ..backbone.sgr_backbone import SGR_OUTPUTS, SGRBackbone
from ..sgr_outputs import attach_sgr_regions, build_sgr_criterion, pad_component_targets, sgr_losses
from .criterion import SetCriterion, mask_classification_weight_dict
from .matcher import HungarianMatcher

__all__ = ["MaskFormer", "Mask2Former", "semantic_inference", "build_set_criterion"]


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """(Q, K+1) class logits, (Q, H, W) mask logits -> (K, H, W) semantic scores
    ``Σ_q softmax(cls_q)[c] · sigmoid(mask_q)`` (the no-object column dropped)."""
    prob = F.softmax(mask_cls, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", prob, mask_pred.sigmoid())


def build_set_criterion(cfg, num_aux: int) -> SetCriterion:
    mf = cfg.MODEL.MASK_FORMER
    matcher = HungarianMatcher(cost_class=mf.CLASS_WEIGHT, cost_mask=mf.MASK_WEIGHT, cost_dice=mf.DICE_WEIGHT,
                               num_points=mf.TRAIN_NUM_POINTS, mask_loss_type=mf.MASK_LOSS_TYPE)
    weight_dict = mask_classification_weight_dict(mf.CLASS_WEIGHT, mf.MASK_WEIGHT, mf.DICE_WEIGHT, num_aux)
    return SetCriterion(
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        matcher=matcher,
        weight_dict=weight_dict,
        eos_coef=mf.NO_OBJECT_WEIGHT,
        losses=("labels", "masks"),
        num_points=mf.TRAIN_NUM_POINTS,
        oversample_ratio=mf.OVERSAMPLE_RATIO,
        importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
        mask_loss_type=mf.MASK_LOSS_TYPE,
    )


def _num_aux_outputs(cfg) -> int:
    """Both decoders make DEC_LAYERS predictions (MaskFormer: one per layer; Mask2Former: one from
    the queries and one per each of its DEC_LAYERS - 1 layers); the last is the main output."""
    mf = cfg.MODEL.MASK_FORMER
    return mf.DEC_LAYERS - 1 if mf.DEEP_SUPERVISION else 0


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    """Mask classification for semantic segmentation (Cheng et al. 2021 / 2022), with SGR."""

    @configurable
    def __init__(self, *, backbone: Backbone, sem_seg_head: nn.Module, criterion: SetCriterion, num_queries: int,
                 size_divisibility: int, pixel_mean: Tuple[float, ...], pixel_std: Tuple[float, ...],
                 sem_seg_postprocess_before_inference: bool = False,
                 sgr_criterion: Optional[SGRCriterion] = None):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.sgr_criterion = sgr_criterion
        self.num_queries = num_queries
        if size_divisibility < 0:
            size_divisibility = backbone.size_divisibility
        self.size_divisibility = size_divisibility
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        mf = cfg.MODEL.MASK_FORMER
        return dict(
            backbone=backbone,
            sem_seg_head=sem_seg_head,
            criterion=build_set_criterion(cfg, _num_aux_outputs(cfg)),
            num_queries=mf.NUM_OBJECT_QUERIES,
            size_divisibility=mf.SIZE_DIVISIBILITY,
            pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD,
            sem_seg_postprocess_before_inference=mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE,
            sgr_criterion=build_sgr_criterion(cfg) if isinstance(backbone, SGRBackbone) else None,
        )

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess(self, batched_inputs: List[Dict]) -> ImageList:
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess(batched_inputs)
        padded_hw = tuple(images.tensor.shape[-2:])
        if self.training:  # the targets reach the device before the forward pass is queued
            targets = self.prepare_targets(batched_inputs, padded_hw)
            components = (pad_component_targets(batched_inputs, padded_hw, self.device)
                          if self.sgr_criterion is not None else None)
        features = self.backbone(images.tensor)
        sgr_outputs = features.pop(SGR_OUTPUTS, None)
        outputs = self.sem_seg_head(features)
        if self.training:
            losses = self.criterion(outputs, targets)
            for k in list(losses):
                if k not in self.criterion.weight_dict:
                    raise KeyError(f"loss {k} has no weight in the criterion's weight_dict")
                losses[k] = losses[k] * self.criterion.weight_dict[k]
            losses.update(sgr_losses(self.sgr_criterion, sgr_outputs, components))
            return losses
        return attach_sgr_regions(self.inference(outputs, batched_inputs, images), sgr_outputs,
                                  images.image_sizes, padded_hw)

    def prepare_targets(self, batched_inputs: List[Dict], padded_hw) -> List[Dict[str, torch.Tensor]]:
        """Per image ``labels`` (N,) and ``masks`` (N, H_pad, W_pad) float, from ``instances``."""
        targets = []
        for x in batched_inputs:
            if "instances" not in x:
                raise KeyError(
                    "MaskFormer training needs per-class masks under the key 'instances' (gt_classes, "
                    "gt_masks); use sgr_d2's dataset mapper that emits them: INPUT.DATASET_MAPPER_NAME "
                    "'sgr_mask_former_semantic' (the MaskFormer / Mask2Former configs' Base-*.yaml set it)"
                )
            inst = x["instances"].to(self.device)
            masks = inst.gt_masks
            masks = getattr(masks, "tensor", masks)  # BitMasks or a plain tensor
            h, w = masks.shape[-2:]
            if h > padded_hw[0] or w > padded_hw[1]:
                raise ValueError(f"instance masks of size {h}x{w} exceed the padded image {padded_hw}")
            padded = masks.new_zeros((masks.shape[0], *padded_hw), dtype=torch.float32)
            padded[:, :h, :w] = masks
            targets.append({"labels": inst.gt_classes.to(torch.int64), "masks": padded})
        return targets

    def inference(self, outputs, batched_inputs, images: ImageList):
        mask_cls = outputs["pred_logits"]
        mask_pred = F.interpolate(outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear",
                                  align_corners=False)
        results = []
        for cls_i, mask_i, x, image_size in zip(mask_cls, mask_pred, batched_inputs, images.image_sizes):
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            if self.sem_seg_postprocess_before_inference:
                mask_i = sem_seg_postprocess(mask_i, image_size, height, width)
                r = semantic_inference(cls_i, mask_i)
            else:
                r = sem_seg_postprocess(semantic_inference(cls_i, mask_i), image_size, height, width)
            results.append({"sem_seg": r})
        return results


@META_ARCH_REGISTRY.register()
class Mask2Former(MaskFormer):
    """The same meta-architecture under Mask2Former's name; configs give it the masked-attention
    decoder, the deformable pixel decoder and the point-sampled losses."""
