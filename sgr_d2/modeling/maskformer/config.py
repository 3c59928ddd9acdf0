"""Config keys of MaskFormer / Mask2Former, with the names of the original code bases.

``add_maskformer_config(cfg)`` adds ``MODEL.MASK_FORMER.*`` and the extra ``MODEL.SEM_SEG_HEAD.*``
keys. The defaults are MaskFormer's (ADE20K, R-50); Mask2Former configs override the decoder,
the pixel decoder and the loss weights. ``validate_maskformer_config(cfg)`` checks the values
that cannot work and names the key.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN

__all__ = ["add_maskformer_config", "validate_maskformer_config", "MASK_LOSS_TYPES"]

MASK_LOSS_TYPES = ("sigmoid_ce", "focal")


def add_maskformer_config(cfg):
    """Add the MaskFormer / Mask2Former keys to ``cfg`` (a detectron2 ``CfgNode``)."""
    cfg.MODEL.MASK_FORMER = CN()
    mf = cfg.MODEL.MASK_FORMER
    # losses
    mf.DEEP_SUPERVISION = True  # a loss on the prediction of every decoder layer
    mf.NO_OBJECT_WEIGHT = 0.1  # weight of the "no object" class in the classification loss
    mf.CLASS_WEIGHT = 1.0
    mf.DICE_WEIGHT = 1.0
    mf.MASK_WEIGHT = 20.0
    # Binary mask loss: "focal" (MaskFormer: sigmoid focal loss, α=0.25, γ=2) or "sigmoid_ce"
    # (Mask2Former: binary cross-entropy). The matcher's mask cost uses the same function.
    mf.MASK_LOSS_TYPE = "focal"
    # Point-sampled losses (Mask2Former). 0: losses on the full masks, the predictions upsampled
    # to the target resolution (MaskFormer). >0: the matcher uses TRAIN_NUM_POINTS uniformly
    # random points, the losses TRAIN_NUM_POINTS importance-sampled points: of
    # TRAIN_NUM_POINTS × OVERSAMPLE_RATIO random points the IMPORTANCE_SAMPLE_RATIO most uncertain
    # are kept, the rest drawn uniformly.
    mf.TRAIN_NUM_POINTS = 0
    mf.OVERSAMPLE_RATIO = 3.0
    mf.IMPORTANCE_SAMPLE_RATIO = 0.75

    # transformer decoder
    mf.TRANSFORMER_DECODER_NAME = "StandardTransformerDecoder"  # | "MultiScaleMaskedTransformerDecoder"
    # "res5" (or any backbone feature), "transformer_encoder", "pixel_embedding" (MaskFormer's
    # standard decoder), "multi_scale_pixel_decoder" (Mask2Former's masked-attention decoder).
    mf.TRANSFORMER_IN_FEATURE = "res5"
    mf.NHEADS = 8
    mf.DROPOUT = 0.1
    mf.DIM_FEEDFORWARD = 2048
    mf.ENC_LAYERS = 0  # encoder layers of the standard (DETR) transformer
    # Decoder layers. StandardTransformerDecoder: the number of layers. MultiScaleMaskedTransformer-
    # Decoder: layers + 1 (as in Mask2Former: 10 = 9 layers + the prediction from the queries).
    mf.DEC_LAYERS = 6
    mf.PRE_NORM = False
    mf.HIDDEN_DIM = 256
    mf.NUM_OBJECT_QUERIES = 100
    mf.ENFORCE_INPUT_PROJ = False

    # inference
    mf.SIZE_DIVISIBILITY = 32  # pad the batch to a multiple; -1: the backbone's size_divisibility
    mf.TEST = CN()
    mf.TEST.SEMANTIC_ON = True  # semantic inference is the only one implemented
    mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False

    # pixel decoder (MODEL.SEM_SEG_HEAD.{IN_FEATURES, CONVS_DIM, NORM, COMMON_STRIDE, NUM_CLASSES,
    # IGNORE_VALUE, LOSS_WEIGHT} are detectron2's own keys)
    sh = cfg.MODEL.SEM_SEG_HEAD
    sh.MASK_DIM = 256
    sh.PIXEL_DECODER_NAME = "BasePixelDecoder"  # | "TransformerEncoderPixelDecoder" | "MSDeformAttnPixelDecoder"
    sh.TRANSFORMER_ENC_LAYERS = 0  # encoder layers of the transformer / deformable pixel decoders
    sh.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    sh.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    sh.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    sh.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD = 1024
    sh.DEFORMABLE_TRANSFORMER_ENCODER_DROPOUT = 0.0
    return cfg


def validate_maskformer_config(cfg):
    """Raise ValueError naming the key and value for MaskFormer settings that cannot work."""
    mf = cfg.MODEL.MASK_FORMER
    sh = cfg.MODEL.SEM_SEG_HEAD

    def positive(name, value):
        if value <= 0:
            raise ValueError(f"{name} is {value}; expected a positive number")

    positive("MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", mf.NUM_OBJECT_QUERIES)
    positive("MODEL.MASK_FORMER.HIDDEN_DIM", mf.HIDDEN_DIM)
    positive("MODEL.MASK_FORMER.NHEADS", mf.NHEADS)
    positive("MODEL.SEM_SEG_HEAD.MASK_DIM", sh.MASK_DIM)
    positive("MODEL.SEM_SEG_HEAD.CONVS_DIM", sh.CONVS_DIM)
    positive("MODEL.SEM_SEG_HEAD.NUM_CLASSES", sh.NUM_CLASSES)
    if mf.HIDDEN_DIM % mf.NHEADS:
        raise ValueError(f"MODEL.MASK_FORMER.HIDDEN_DIM ({mf.HIDDEN_DIM}) must be divisible by "
                         f"MODEL.MASK_FORMER.NHEADS ({mf.NHEADS})")
    if mf.HIDDEN_DIM % 2:
        raise ValueError(f"MODEL.MASK_FORMER.HIDDEN_DIM is {mf.HIDDEN_DIM}; expected an even number "
                         "(half of it encodes x, half y in the sine position encoding)")
    if mf.DEC_LAYERS < 1:
        raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS is {mf.DEC_LAYERS}; expected >= 1")
    if mf.ENC_LAYERS < 0 or sh.TRANSFORMER_ENC_LAYERS < 0:
        raise ValueError(f"MODEL.MASK_FORMER.ENC_LAYERS ({mf.ENC_LAYERS}) and MODEL.SEM_SEG_HEAD."
                         f"TRANSFORMER_ENC_LAYERS ({sh.TRANSFORMER_ENC_LAYERS}) must be >= 0")
    if not 0.0 <= mf.NO_OBJECT_WEIGHT:
        raise ValueError(f"MODEL.MASK_FORMER.NO_OBJECT_WEIGHT is {mf.NO_OBJECT_WEIGHT}; expected >= 0")
    if mf.MASK_LOSS_TYPE not in MASK_LOSS_TYPES:
        raise ValueError(f"MODEL.MASK_FORMER.MASK_LOSS_TYPE is {mf.MASK_LOSS_TYPE!r}; expected one of "
                         f"{list(MASK_LOSS_TYPES)}")
    if mf.TRAIN_NUM_POINTS < 0:
        raise ValueError(f"MODEL.MASK_FORMER.TRAIN_NUM_POINTS is {mf.TRAIN_NUM_POINTS}; expected >= 0 "
                         "(0: losses on the full masks)")
    if mf.OVERSAMPLE_RATIO < 1:
        raise ValueError(f"MODEL.MASK_FORMER.OVERSAMPLE_RATIO is {mf.OVERSAMPLE_RATIO}; expected >= 1")
    if not 0.0 <= mf.IMPORTANCE_SAMPLE_RATIO <= 1.0:
        raise ValueError(f"MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO is {mf.IMPORTANCE_SAMPLE_RATIO}; "
                         "expected a value in [0, 1]")
    if not mf.TEST.SEMANTIC_ON:
        raise ValueError("MODEL.MASK_FORMER.TEST.SEMANTIC_ON is False, but semantic inference is the "
                         "only inference sgr_d2's MaskFormer implements; set it to True")
    if sh.NORM == "GN" and sh.CONVS_DIM % 32:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.CONVS_DIM ({sh.CONVS_DIM}) must be a multiple of 32 with "
                         "MODEL.SEM_SEG_HEAD.NORM 'GN' (GroupNorm with 32 groups)")
    if sh.COMMON_STRIDE <= 0 or sh.COMMON_STRIDE & (sh.COMMON_STRIDE - 1):
        raise ValueError(f"MODEL.SEM_SEG_HEAD.COMMON_STRIDE is {sh.COMMON_STRIDE}; expected a power of 2")
