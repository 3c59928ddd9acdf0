"""MaskFormer and Mask2Former (mask classification for semantic segmentation), with SGR.

Importing registers: meta-architectures ``MaskFormer`` and ``Mask2Former`` (META_ARCH_REGISTRY),
``MaskFormerHead`` (SEM_SEG_HEADS_REGISTRY), the pixel decoders ``BasePixelDecoder``,
``TransformerEncoderPixelDecoder``, ``MSDeformAttnPixelDecoder`` and the transformer decoders
``StandardTransformerDecoder``, ``MultiScaleMaskedTransformerDecoder``. Config keys:
``MODEL.MASK_FORMER.*`` in ``sgr_d2/config.py``.
"""
from .criterion import SetCriterion, mask_classification_weight_dict
from .head import MaskFormerHead
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
from .meta_arch import Mask2Former, MaskFormer, build_set_criterion, semantic_inference
from .ms_deform_attn import MSDeformAttn, ms_deform_attn
from .pixel_decoder import (
    PIXEL_DECODER_REGISTRY,
    BasePixelDecoder,
    MSDeformAttnPixelDecoder,
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
    "Mask2Former",
    "MaskFormerHead",
    "SetCriterion",
    "HungarianMatcher",
    "mask_classification_weight_dict",
    "build_set_criterion",
    "semantic_inference",
    "BasePixelDecoder",
    "TransformerEncoderPixelDecoder",
    "MSDeformAttnPixelDecoder",
    "StandardTransformerDecoder",
    "MultiScaleMaskedTransformerDecoder",
    "attention_mask_from_predictions",
    "MSDeformAttn",
    "ms_deform_attn",
    "PIXEL_DECODER_REGISTRY",
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
