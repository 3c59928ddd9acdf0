"""The MaskFormer meta-architecture (both papers, as in the official code), with the SGR loss when
the backbone has SGR.

One class, registered as ``MaskFormer``: what makes a model MaskFormer or Mask2Former is its head
(``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``, ``MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``) and
its losses (``MODEL.MASK_FORMER.{MASK_LOSS_TYPE, TRAIN_NUM_POINTS, *_WEIGHT}``), set by the configs.
Its training data come from the dataset mapper ``INPUT.DATASET_MAPPER_NAME``, which emits the
``instances`` (``gt_classes``, ``gt_masks``) the set criterion trains on.

Training returns the weighted mask-classification losses (``loss_ce``, ``loss_mask``,
``loss_dice`` and their ``_i`` copies for the aux outputs) and, with a :class:`SGRBackbone`,
``loss_sgr_union``, ``loss_sgr_cls``, ``loss_sgr_div`` (already β-weighted).

Inference returns, per image, what ``MODEL.MASK_FORMER.TEST.{SEMANTIC_ON, PANOPTIC_ON,
INSTANCE_ON}`` ask for, as the official code computes it:

* ``"sem_seg"`` (K, height, width): ``Σ_q softmax(class_q)[:K] · sigmoid(mask_q)``;
* ``"panoptic_seg"``: ``(seg, segments_info)``, ``seg`` (height, width) int32 segment ids (0: no
  segment), ``segments_info`` a list of ``{"id", "isthing", "category_id"}`` (contiguous ids);
* ``"instances"``: :class:`~detectron2.structures.Instances` of ``TEST.DETECTIONS_PER_IMAGE``
  (class, query) pairs with ``pred_masks`` (float 0/1), ``pred_boxes`` (all zeros, as the
  official: boxes from masks are slow and mask AP does not read them), ``scores`` (class
  probability × the mean mask probability inside the mask) and ``pred_classes``;

and, with SGR, ``"sgr_regions"``. Which classes are things comes from the metadata
(``thing_dataset_id_to_contiguous_id``) of ``DATASETS.TEST[0]``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.memory import retry_if_cuda_oom

from ...sgr import SGRCriterion
from ..backbone.sgr_backbone import SGR_OUTPUTS, SGRBackbone
from ..sgr_outputs import attach_sgr_regions, build_sgr_criterion, pad_component_targets, sgr_losses
from .criterion import SetCriterion, mask_classification_weight_dict
from .matcher import HungarianMatcher

__all__ = ["MaskFormer", "semantic_inference", "build_set_criterion"]


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


def _test_metadata(cfg):
    """The metadata panoptic and instance inference read (which classes are things): of
    ``DATASETS.TEST[0]``, the dataset the inference is evaluated on (the official code reads
    ``DATASETS.TRAIN[0]``'s; every official train/test pair has the same classes), else of
    ``DATASETS.TRAIN[0]``, else None."""
    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    return MetadataCatalog.get(names[0]) if names else None


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    """Mask classification for semantic, panoptic and instance segmentation (Cheng et al. 2021 /
    2022), with SGR. The module docstring lists the inference outputs."""

    @configurable
    def __init__(self, *, backbone: Backbone, sem_seg_head: nn.Module, criterion: SetCriterion, num_queries: int,
                 size_divisibility: int, pixel_mean: Tuple[float, ...], pixel_std: Tuple[float, ...],
                 sem_seg_postprocess_before_inference: bool = False,
                 object_mask_threshold: float = 0.0, overlap_threshold: float = 0.0, metadata=None,
                 semantic_on: bool = True, panoptic_on: bool = False, instance_on: bool = False,
                 test_topk_per_image: int = 100, sgr_criterion: Optional[SGRCriterion] = None):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.sgr_criterion = sgr_criterion
        self.num_queries = num_queries
        self.overlap_threshold = overlap_threshold
        self.object_mask_threshold = object_mask_threshold
        self.metadata = metadata
        if size_divisibility < 0:
            size_divisibility = backbone.size_divisibility
        self.size_divisibility = size_divisibility
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.semantic_on = semantic_on
        self.panoptic_on = panoptic_on
        self.instance_on = instance_on
        self.test_topk_per_image = test_topk_per_image
        if not (semantic_on or panoptic_on or instance_on):
            raise ValueError("MaskFormer: semantic_on, panoptic_on and instance_on are all False: inference "
                             "would return nothing (MODEL.MASK_FORMER.TEST.{SEMANTIC_ON,PANOPTIC_ON,INSTANCE_ON})")
        if not semantic_on and not sem_seg_postprocess_before_inference:
            raise ValueError("MaskFormer: panoptic and instance inference need the masks at the output size "
                             "(sem_seg_postprocess_before_inference True)")

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
            # panoptic and instance inference read the masks at the output size (as the official)
            sem_seg_postprocess_before_inference=(mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE
                                                  or mf.TEST.PANOPTIC_ON or mf.TEST.INSTANCE_ON),
            object_mask_threshold=mf.TEST.OBJECT_MASK_THRESHOLD,
            overlap_threshold=mf.TEST.OVERLAP_THRESHOLD,
            metadata=_test_metadata(cfg),
            semantic_on=mf.TEST.SEMANTIC_ON,
            panoptic_on=mf.TEST.PANOPTIC_ON,
            instance_on=mf.TEST.INSTANCE_ON,
            test_topk_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
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
                    "MaskFormer training needs the masks of the image under the key 'instances' (gt_classes, "
                    "gt_masks); use a dataset mapper that emits them (INPUT.DATASET_MAPPER_NAME: "
                    "'sgr_mask_former_semantic' for semantic segmentation; the configs' Base-*.yaml set it)"
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
        """The per-image results of the module docstring from the head's outputs, as the official
        ``MaskFormer.forward`` computes them (``retry_if_cuda_oom`` where it has it)."""
        mask_cls = outputs["pred_logits"]
        mask_pred = F.interpolate(outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear",
                                  align_corners=False)
        results = []
        for cls_i, mask_i, x, image_size in zip(mask_cls, mask_pred, batched_inputs, images.image_sizes):
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            r = {}
            if self.sem_seg_postprocess_before_inference:
                mask_i = retry_if_cuda_oom(sem_seg_postprocess)(mask_i, image_size, height, width)
                cls_i = cls_i.to(mask_i)
            if self.semantic_on:
                sem = retry_if_cuda_oom(self.semantic_inference)(cls_i, mask_i)
                if not self.sem_seg_postprocess_before_inference:
                    sem = retry_if_cuda_oom(sem_seg_postprocess)(sem, image_size, height, width)
                r["sem_seg"] = sem
            if self.panoptic_on:
                r["panoptic_seg"] = retry_if_cuda_oom(self.panoptic_inference)(cls_i, mask_i)
            if self.instance_on:
                r["instances"] = retry_if_cuda_oom(self.instance_inference)(cls_i, mask_i)
            results.append(r)
        return results

    def semantic_inference(self, mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
        """(Q, K+1) class logits, (Q, H, W) mask logits -> (K, H, W) (:func:`semantic_inference`)."""
        return semantic_inference(mask_cls, mask_pred)

    def _thing_classes(self) -> set:
        """The contiguous ids of the thing classes (``thing_dataset_id_to_contiguous_id``)."""
        things = getattr(self.metadata, "thing_dataset_id_to_contiguous_id", None)
        if things is None:
            name = getattr(self.metadata, "name", None)
            raise ValueError(
                f"MODEL.MASK_FORMER.TEST.PANOPTIC_ON needs to know which classes are things, but the metadata of "
                f"{name!r} (DATASETS.TEST[0]) has no thing_dataset_id_to_contiguous_id: evaluate on a panoptic "
                "or instance dataset, or set MODEL.MASK_FORMER.TEST.PANOPTIC_ON False")
        return {int(v) for v in things.values()}

    def panoptic_inference(self, mask_cls: torch.Tensor, mask_pred: torch.Tensor):
        """(Q, K+1) class logits, (Q, H, W) mask logits -> ``(seg, segments_info)``.

        Queries predicting "no object" or with a class probability at most
        ``object_mask_threshold`` are dropped; each pixel goes to the kept query of highest
        ``probability × sigmoid(mask)``; a query keeps its pixels where its own mask is at least
        0.5, and only if they are at least ``overlap_threshold`` of its mask's area. Segments are
        numbered 1, 2, ... in query order; all segments of one stuff class are merged into one.
        """
        scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
        mask_pred = mask_pred.sigmoid()
        keep = labels.ne(self.sem_seg_head.num_classes) & (scores > self.object_mask_threshold)
        cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep]
        h, w = cur_masks.shape[-2:]
        panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=cur_masks.device)
        segments_info = []
        if cur_masks.shape[0] == 0:
            return panoptic_seg, segments_info
        things = self._thing_classes()
        cur_mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
        current_segment_id = 0
        stuff_segment = {}
        for k in range(cur_classes.shape[0]):
            pred_class = int(cur_classes[k].item())
            isthing = pred_class in things
            mask_area = (cur_mask_ids == k).sum().item()
            original_area = (cur_masks[k] >= 0.5).sum().item()
            mask = (cur_mask_ids == k) & (cur_masks[k] >= 0.5)
            if mask_area > 0 and original_area > 0 and mask.sum().item() > 0:
                if mask_area / original_area < self.overlap_threshold:
                    continue
                if not isthing:  # one segment per stuff class
                    if pred_class in stuff_segment:
                        panoptic_seg[mask] = stuff_segment[pred_class]
                        continue
                    stuff_segment[pred_class] = current_segment_id + 1
                current_segment_id += 1
                panoptic_seg[mask] = current_segment_id
                segments_info.append({"id": current_segment_id, "isthing": bool(isthing),
                                      "category_id": pred_class})
        return panoptic_seg, segments_info

    def instance_inference(self, mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> Instances:
        """(Q, K+1) class logits, (Q, H, W) mask logits -> the ``test_topk_per_image`` best
        (query, class) pairs by class probability (only thing classes with ``panoptic_on``, as
        the official), scored by that probability × the mean mask probability inside the mask.
        With fewer than ``test_topk_per_image`` pairs (Q · K), all of them (the official code
        raises there)."""
        image_size = mask_pred.shape[-2:]
        num_classes = self.sem_seg_head.num_classes
        scores = F.softmax(mask_cls, dim=-1)[:, :-1]  # (Q, K)
        labels = torch.arange(num_classes, device=scores.device).repeat(scores.shape[0])
        k = min(self.test_topk_per_image, scores.numel())
        scores_per_image, topk_indices = scores.flatten(0, 1).topk(k, sorted=False)
        labels_per_image = labels[topk_indices]
        mask_pred = mask_pred[topk_indices // num_classes]
        if self.panoptic_on:
            things = self._thing_classes()
            keep = torch.tensor([int(c) in things for c in labels_per_image.tolist()], dtype=torch.bool,
                                device=scores_per_image.device)
            scores_per_image, labels_per_image, mask_pred = scores_per_image[keep], labels_per_image[keep], mask_pred[keep]
        result = Instances(image_size)
        result.pred_masks = (mask_pred > 0).float()
        result.pred_boxes = Boxes(torch.zeros(mask_pred.size(0), 4, device=mask_pred.device))
        masks = result.pred_masks.flatten(1)
        mask_scores = (mask_pred.sigmoid().flatten(1) * masks).sum(1) / (masks.sum(1) + 1e-6)
        result.scores = scores_per_image * mask_scores
        result.pred_classes = labels_per_image
        return result
