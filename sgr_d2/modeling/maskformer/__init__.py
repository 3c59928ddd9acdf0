"""MaskFormer and Mask2Former (mask classification for semantic, panoptic and instance
segmentation), with SGR, under the official class, registry and attribute names.

Importing registers: the meta-architecture ``MaskFormer`` of both papers (META_ARCH_REGISTRY),
``MaskFormerHead`` and the pixel decoders ``BasePixelDecoder``, ``TransformerEncoderPixelDecoder``,
``MSDeformAttnPixelDecoder`` (SEM_SEG_HEADS_REGISTRY, as the official code) and the transformer
decoders ``StandardTransformerDecoder``, ``MultiScaleMaskedTransformerDecoder``
(TRANSFORMER_DECODER_REGISTRY). Config keys: ``MODEL.MASK_FORMER.*`` in ``sgr_d2/config.py``.
"""
from .criterion import SetCriterion, mask_classification_weight_dict
from .head import MaskFormerHead, older_head_layout, upgrade_head_layout, upgrade_head_layouts
from .losses import (
    dice_loss,
    pairwise_dice,
    pairwise_sigmoid_ce,
    pairwise_sigmoid_focal,
    point_sample,
    sigmoid_ce_loss,
    sigmoid_focal_loss,
    uncertain_point_coords,
)
from .matcher import HungarianMatcher
from .meta_arch import MaskFormer, build_set_criterion, semantic_inference
from .ms_deform_attn import MSDeformAttn, ms_deform_attn
from .pixel_decoder import (
    BasePixelDecoder,
    MSDeformAttnPixelDecoder,
    MSDeformAttnTransformerEncoder,
    MSDeformAttnTransformerEncoderLayer,
    MSDeformAttnTransformerEncoderOnly,
    TransformerEncoderOnly,
    TransformerEncoderPixelDecoder,
)
from .transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    MultiScaleMaskedTransformerDecoder,
    StandardTransformerDecoder,
    attention_mask_from_predictions,
)

__all__ = [
    "MaskFormer",
    "MaskFormerHead",
    "upgrade_head_layout",
    "upgrade_head_layouts",
    "older_head_layout",
    "SetCriterion",
    "HungarianMatcher",
    "mask_classification_weight_dict",
    "build_set_criterion",
    "semantic_inference",
    "BasePixelDecoder",
    "TransformerEncoderPixelDecoder",
    "MSDeformAttnPixelDecoder",
    "TransformerEncoderOnly",
    "MSDeformAttnTransformerEncoderOnly",
    "MSDeformAttnTransformerEncoder",
    "MSDeformAttnTransformerEncoderLayer",
    "StandardTransformerDecoder",
    "MultiScaleMaskedTransformerDecoder",
    "attention_mask_from_predictions",
    "MSDeformAttn",
    "ms_deform_attn",
    "TRANSFORMER_DECODER_REGISTRY",
    "dice_loss",
    "sigmoid_ce_loss",
    "sigmoid_focal_loss",
    "pairwise_dice",
    "pairwise_sigmoid_ce",
    "pairwise_sigmoid_focal",
    "point_sample",
    "uncertain_point_coords",
]
