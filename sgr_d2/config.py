"""sgr_d2's config keys: one ``add_sgr_config`` adds them all to a detectron2 config."""
from detectron2.config import CfgNode as CN

__all__ = ["add_sgr_config", "validate_sgr_config"]


def add_sgr_config(cfg):
    """Add every key sgr_d2 reads to ``cfg`` (a detectron2 ``CfgNode``), with its default."""
    # ---------------------------------------------------------------- SGR (SGR_SPEC §1–§2)
    cfg.MODEL.SGR = CN()
    # The backbone wrapped by build_sgr_backbone, and the stage after which SGR is inserted.
    cfg.MODEL.SGR.BACKBONE_NAME = "build_dilated_resnet_backbone"
    cfg.MODEL.SGR.IN_FEATURE = "res5"
    cfg.MODEL.SGR.NUM_TOKENS = 128  # K
    cfg.MODEL.SGR.TOKEN_DIM = 256  # C
    cfg.MODEL.SGR.NUM_LAYERS = 2  # transformer encoder layers
    cfg.MODEL.SGR.NUM_HEADS = 8
    cfg.MODEL.SGR.FFN_DIM = 1024
    cfg.MODEL.SGR.DROPOUT = 0.0
    cfg.MODEL.SGR.NORM = "BN"  # detectron2 norm name for the 2-d norms ("SyncBN" with several GPUs)
    cfg.MODEL.SGR.EPS = 1e-6  # ε of the token average and of the losses
    cfg.MODEL.SGR.NUM_MATCHED = 64  # L
    cfg.MODEL.SGR.MATCHING = "hybrid"  # "hybrid" | "greedy" | "hungarian"
    cfg.MODEL.SGR.COST_DICE_WEIGHT = 1.0  # ρ
    cfg.MODEL.SGR.UNION_DICE_WEIGHT = 1.0  # Dice next to BCE in the union loss
    cfg.MODEL.SGR.UNION_WEIGHT = 1.0
    cfg.MODEL.SGR.CLASS_WEIGHT = 1.0
    cfg.MODEL.SGR.DIVERSITY_WEIGHT = 1.0
    cfg.MODEL.SGR.LOSS_WEIGHT = 0.25  # β

    # ---------------------------------------------------------------- dilated ResNet (§4)
    cfg.MODEL.RESNETS.OUTPUT_STRIDE = 8  # 8, 16 or 32
    cfg.MODEL.RESNETS.MULTI_GRID = [1, 2, 4]  # res5 block dilation multipliers

    # ---------------------------------------------------------------- heads
    cfg.MODEL.SEM_SEG_HEAD.NUM_CONVS = 2  # Dilated-FCN
    cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.1
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURE = "res5"  # single-input heads (Dilated-FCN)

    # ---------------------------------------------------------------- weights
    # True: the class-specific output layers of MODEL.WEIGHTS (class_embed, the per-pixel
    # classifier, SGR's class term, Mask R-CNN's predictors) are not loaded but start from their
    # initialisation, to fine-tune a model on other classes. False: the file must give them a
    # value (sgr_d2/engine/weights_fit.py).
    cfg.MODEL.WEIGHTS_NEW_CLASSES = False

    # ---------------------------------------------------------------- solver
    cfg.SOLVER.OPTIMIZER = "SGD"  # "SGD" | "ADAMW"
    cfg.SOLVER.POLY_LR_POWER = 0.9
    # LR multiplier of the SGR component and the head (×10 with ResNet backbones, §4).
    cfg.SOLVER.HEAD_LR_MULTIPLIER = 1.0
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0

    # ---------------------------------------------------------------- input
    cfg.INPUT.DATASET_MAPPER_NAME = "sgr_sem_seg"
    cfg.INPUT.COLOR_AUG = True  # MaskFormer's photometric distortion (sgr_d2/data/augmentation.py)
    # Pixel value of the padding that brings a training image up to the crop size (before
    # normalisation; the labels are padded with the ignore label). MaskFormer / Mask2Former: 128.
    cfg.INPUT.IMAGE_PAD_VALUE = 0
    cfg.INPUT.SIZE_DIVISIBILITY = -1  # -1: the backbone's size_divisibility
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0

    # ---------------------------------------------------------------- test
    cfg.TEST.AUG.SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]  # relative to the test size
    cfg.TEST.TOKEN_SEMANTICS = False
    from .modeling.backbone.swin import add_swin_config  # lazy: sgr_d2.modeling imports this module
    from .modeling.heads import add_head_config
    add_swin_config(cfg)
    add_head_config(cfg)
    from .modeling.maskformer.config import add_maskformer_config  # lazy, as above
    add_maskformer_config(cfg)
    from .modeling.backbone.glore import add_glore_config  # lazy, as above
    add_glore_config(cfg)
    return cfg


def validate_sgr_config(cfg):
    """Raise ValueError naming the key and value for settings that cannot work together."""
    sgr = cfg.MODEL.SGR
    if sgr.NUM_MATCHED < 1:
        raise ValueError(
            f"MODEL.SGR.NUM_MATCHED is {sgr.NUM_MATCHED}; expected a positive number of matched "
            f"tokens (L, 1..MODEL.SGR.NUM_TOKENS = {sgr.NUM_TOKENS}): with none, every SGR loss is 0"
        )
    if sgr.NUM_MATCHED > sgr.NUM_TOKENS:
        raise ValueError(
            f"MODEL.SGR.NUM_MATCHED ({sgr.NUM_MATCHED}) must not exceed MODEL.SGR.NUM_TOKENS "
            f"({sgr.NUM_TOKENS}): L tokens are matched out of K"
        )
    if sgr.MATCHING not in ("hybrid", "greedy", "hungarian"):
        raise ValueError(
            f"MODEL.SGR.MATCHING is {sgr.MATCHING!r}; expected 'hybrid', 'greedy' or 'hungarian'"
        )
    if sgr.TOKEN_DIM % sgr.NUM_HEADS:
        raise ValueError(
            f"MODEL.SGR.TOKEN_DIM ({sgr.TOKEN_DIM}) must be divisible by MODEL.SGR.NUM_HEADS "
            f"({sgr.NUM_HEADS})"
        )
    if cfg.MODEL.RESNETS.OUTPUT_STRIDE not in (8, 16, 32):
        raise ValueError(
            f"MODEL.RESNETS.OUTPUT_STRIDE is {cfg.MODEL.RESNETS.OUTPUT_STRIDE}; expected 8, 16 or 32"
        )
    if cfg.SOLVER.OPTIMIZER.upper() not in ("SGD", "ADAMW"):
        raise ValueError(f"SOLVER.OPTIMIZER is {cfg.SOLVER.OPTIMIZER!r}; expected 'SGD' or 'ADAMW'")
