"""sgr_d2's configuration: every key it adds to detectron2's, their checks, and loading a config.

* :func:`add_sgr_config` adds every key sgr_d2 reads (SGR, the dilated ResNet, Swin, the heads,
  MaskFormer / Mask2Former, GloRe, solver, input, test) with its default;
* :func:`validate_config` raises a ``ValueError`` naming the key and value of settings that
  cannot work together;
* :func:`load_config` builds a config from a file and ``KEY VALUE`` overrides, with errors that
  name the file and key, registers the folder dataset of ``DATASETS.FOLDER.ROOT``, and
  validates it. That is the one place :func:`validate_config` runs: every entry point
  (``train_net.py``, the demo, the tools, the benches, the tests) gets its config there, and the
  model builders do not check again. A config put together without it (detectron2's
  ``get_cfg()`` and :func:`add_sgr_config`) should be passed to :func:`validate_config` before a
  model is built from it;
* :func:`setup_cfg` is what ``train_net.py`` does with its arguments: the loaded config, adapted
  to the machine (device, synchronised BatchNorm), frozen. It writes nothing; the run's files
  are the engine's (``sgr_d2.engine.run_files``).

This module imports nothing from the rest of sgr_d2 but the framework-agnostic core (and, when
it loads a config, the folder dataset's registration).
"""
from __future__ import annotations

import logging
import os

import torch

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.utils import comm

from .sgr.components import COMPONENT_MODES
from .sgr.matching import check_matching

__all__ = ["MASK_LOSS_TYPES", "add_sgr_config", "validate_config", "load_config", "setup_cfg", "is_detection"]

MASK_LOSS_TYPES = ("sigmoid_ce", "focal")
# Meta-architectures trained as detectors (Mask R-CNN, docs/transfer.md): detectron2's data path
# and evaluators.
DETECTION_META_ARCHS = ("GeneralizedRCNN",)


def add_sgr_config(cfg):
    """Add every key sgr_d2 reads to ``cfg`` (a detectron2 ``CfgNode``), with its default."""
    # ---------------------------------------------------------------- SGR (docs/method.md)
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
    # What the SGR losses match tokens to: "connected" (the paper: the 8-connected components of
    # each class of the semantic map) | "instances" (each ground-truth thing instance is its own
    # component; stuff keeps its connected components; needs a dataset with instances, checked
    # when the training loader is built: sgr_d2/data/mappers.py)
    cfg.MODEL.SGR.COMPONENTS = "connected"

    # ---------------------------------------------------------------- GloRe (the comparison unit)
    cfg.MODEL.GLORE = CN()
    cfg.MODEL.GLORE.BACKBONE_NAME = "build_dilated_resnet_backbone"
    cfg.MODEL.GLORE.IN_FEATURE = "res5"
    # N nodes of C' channels; the defaults match SGR's K = 128 tokens of width C = 256, so the two
    # reasoning units compare at the same graph size.
    cfg.MODEL.GLORE.NUM_NODES = 128
    cfg.MODEL.GLORE.NUM_STATE = 256
    cfg.MODEL.GLORE.NORM = "BN"  # the norm after the output 1x1 conv (zero-initialised weight)
    # Divide the projected node features by the number of pixels, so the node features do not
    # grow with the input resolution (segmentation crops -> detection images).
    cfg.MODEL.GLORE.NORMALIZE = True

    # ---------------------------------------------------------------- dilated ResNet
    cfg.MODEL.RESNETS.OUTPUT_STRIDE = 8  # 8, 16 or 32
    cfg.MODEL.RESNETS.MULTI_GRID = [1, 2, 4]  # res5 block dilation multipliers

    # ---------------------------------------------------------------- Swin (Swin-T's values)
    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    cfg.MODEL.SWIN.EMBED_DIM = 96
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    cfg.MODEL.SWIN.QKV_BIAS = True
    cfg.MODEL.SWIN.DROP_RATE = 0.0  # dropout after the attention / MLP projections
    cfg.MODEL.SWIN.ATTN_DROP_RATE = 0.0
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3  # stochastic depth (0.3 in the Swin-T + UperNet recipe)
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SWIN.USE_CHECKPOINT = False  # activation checkpointing inside each stage

    # ---------------------------------------------------------------- per-pixel heads
    sh = cfg.MODEL.SEM_SEG_HEAD
    sh.NUM_CONVS = 2  # Dilated-FCN
    sh.DROPOUT = 0.1
    sh.IN_FEATURE = "res5"  # single-input heads (Dilated-FCN, DeepLabV3)
    # DeepLabV3: atrous rates of the three 3×3 branches (12/24/36 at output stride 8, 6/12/18 at
    # 16) and the dropout after the ASPP projection
    sh.ASPP_DILATIONS = [12, 24, 36]
    sh.ASPP_DROPOUT = 0.1
    sh.POOL_SCALES = [1, 2, 3, 6]  # UperNet: output sizes of the pyramid pooling module

    # ---------------------------------------------------------------- MaskFormer / Mask2Former
    # The defaults are MaskFormer's (ADE20K, R-50), with the original code bases' key names;
    # Mask2Former configs override the decoder, the pixel decoder and the loss weights.
    cfg.MODEL.MASK_FORMER = CN()
    mf = cfg.MODEL.MASK_FORMER
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
    mf.SIZE_DIVISIBILITY = 32  # pad the batch to a multiple; -1: the backbone's size_divisibility
    mf.TEST = CN()
    # Which inference the model runs (the official switches and defaults): "sem_seg",
    # "panoptic_seg" and "instances" in each output dict.
    mf.TEST.SEMANTIC_ON = True
    mf.TEST.INSTANCE_ON = False
    mf.TEST.PANOPTIC_ON = False
    # panoptic/instance inference: queries whose class score is at most OBJECT_MASK_THRESHOLD are
    # dropped; a segment keeps only if the fraction of its mask left after overlaps is at least
    # OVERLAP_THRESHOLD (the official configs set 0.8 for both)
    mf.TEST.OBJECT_MASK_THRESHOLD = 0.0
    mf.TEST.OVERLAP_THRESHOLD = 0.0
    mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False
    # pixel decoder (MODEL.SEM_SEG_HEAD.{IN_FEATURES, CONVS_DIM, NORM, COMMON_STRIDE, NUM_CLASSES,
    # IGNORE_VALUE, LOSS_WEIGHT} are detectron2's own keys)
    sh.MASK_DIM = 256
    sh.PIXEL_DECODER_NAME = "BasePixelDecoder"  # | "TransformerEncoderPixelDecoder" | "MSDeformAttnPixelDecoder"
    sh.TRANSFORMER_ENC_LAYERS = 0  # encoder layers of the transformer / deformable pixel decoders
    sh.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    sh.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    sh.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    sh.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD = 1024
    sh.DEFORMABLE_TRANSFORMER_ENCODER_DROPOUT = 0.0

    # ---------------------------------------------------------------- weights
    # True: the class-specific output layers of MODEL.WEIGHTS (class_embed, the per-pixel
    # classifier, SGR's class term, Mask R-CNN's predictors) are not loaded but start from their
    # initialisation, to fine-tune a model on other classes. False: the file must give them a
    # value (the fit check of sgr_d2/engine/checkpoint.py).
    cfg.MODEL.WEIGHTS_NEW_CLASSES = False

    # ---------------------------------------------------------------- solver
    cfg.SOLVER.OPTIMIZER = "SGD"  # "SGD" | "ADAMW"
    cfg.SOLVER.POLY_LR_POWER = 0.9
    # LR multiplier of the SGR component and the head (×10 with ResNet backbones).
    cfg.SOLVER.HEAD_LR_MULTIPLIER = 1.0
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0

    # ---------------------------------------------------------------- input
    # The training mapper (sgr_d2/data/mappers.py): "sgr_sem_seg" (per-pixel heads: image,
    # labels, components) | "sgr_mask_former_semantic" or the official "mask_former_semantic"
    # (MaskFormer / Mask2Former: also one mask per class, "instances") | "mask_former_panoptic" |
    # "mask_former_instance" | "coco_panoptic_lsj" | "coco_instance_lsj"; any other value is an
    # error.
    cfg.INPUT.DATASET_MAPPER_NAME = "sgr_sem_seg"
    cfg.INPUT.COLOR_AUG = True  # MaskFormer's photometric distortion (sgr_d2/data/augmentation.py)
    # Pixel value of the padding that brings a training image up to the crop size (before
    # normalisation; the labels are padded with the ignore label). MaskFormer / Mask2Former: 128.
    cfg.INPUT.IMAGE_PAD_VALUE = 0
    cfg.INPUT.SIZE_DIVISIBILITY = -1  # -1: the backbone's size_divisibility
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # Large-scale jitter (the COCO "new baseline" mappers, INPUT.DATASET_MAPPER_NAME
    # "coco_instance_lsj" / "coco_panoptic_lsj"): resize by a random factor in
    # [MIN_SCALE, MAX_SCALE] of IMAGE_SIZE, then crop/pad to IMAGE_SIZE x IMAGE_SIZE
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0

    # ---------------------------------------------------------------- your own data (docs/own_data.md)
    # A folder with classes.txt, images/{train,val}/ and masks/{train,val}/: load_config registers
    # it as folder_sem_seg_train / folder_sem_seg_val (sgr_d2/data/datasets/folder.py), and a
    # MODEL.SEM_SEG_HEAD.NUM_CLASSES of -1 becomes the number of classes of classes.txt. The
    # masks' ignore label is MODEL.SEM_SEG_HEAD.IGNORE_VALUE. COCO-format instance or panoptic
    # JSON files in the same folder need no key: a config that uses folder_instance_* or
    # folder_panoptic_* registers them (sgr_d2/data/datasets/folder_coco.py).
    cfg.DATASETS.FOLDER = CN()
    cfg.DATASETS.FOLDER.ROOT = ""  # "": no folder dataset
    # "ids": single-channel masks of class ids (class k: line k of classes.txt, from 0) |
    # "colors": RGB masks in the palette of classes.txt (`name r g b` lines), converted once into
    # <ROOT>/.sgr_d2_cache
    cfg.DATASETS.FOLDER.MASK_FORMAT = "ids"
    # "colors": the colours that mean "ignore", e.g. [[0, 0, 0]] (every other colour must be a class's)
    cfg.DATASETS.FOLDER.IGNORE_COLORS = []

    # ---------------------------------------------------------------- test
    cfg.TEST.AUG.SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]  # relative to the test size
    cfg.TEST.TOKEN_SEMANTICS = False
    return cfg


def is_detection(cfg) -> bool:
    """True for Mask R-CNN and the like: the task is picked from MODEL.META_ARCHITECTURE."""
    return cfg.MODEL.META_ARCHITECTURE in DETECTION_META_ARCHS


def _positive(name: str, value) -> None:
    if value <= 0:
        raise ValueError(f"{name} is {value}; expected a positive number")


def validate_config(cfg) -> None:
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
    check_matching(sgr.MATCHING, "MODEL.SGR.MATCHING")
    if sgr.COMPONENTS not in COMPONENT_MODES:
        raise ValueError(f"MODEL.SGR.COMPONENTS is {sgr.COMPONENTS!r}; expected one of {list(COMPONENT_MODES)} "
                         "('instances' needs a dataset with instances: sgr_d2/data/mappers.py)")
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
    if cfg.MODEL.META_ARCHITECTURE == "Mask2Former":
        raise ValueError("MODEL.META_ARCHITECTURE is 'Mask2Former'; use 'MaskFormer': as in the official code, "
                         "one meta-architecture serves both papers (the head and losses make a model Mask2Former)")
    if cfg.MODEL.META_ARCHITECTURE == "MaskFormer":
        _validate_maskformer(cfg)


def _validate_maskformer(cfg) -> None:
    mf = cfg.MODEL.MASK_FORMER
    sh = cfg.MODEL.SEM_SEG_HEAD
    _positive("MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", mf.NUM_OBJECT_QUERIES)
    _positive("MODEL.MASK_FORMER.HIDDEN_DIM", mf.HIDDEN_DIM)
    _positive("MODEL.MASK_FORMER.NHEADS", mf.NHEADS)
    _positive("MODEL.SEM_SEG_HEAD.MASK_DIM", sh.MASK_DIM)
    _positive("MODEL.SEM_SEG_HEAD.CONVS_DIM", sh.CONVS_DIM)
    _positive("MODEL.SEM_SEG_HEAD.NUM_CLASSES", sh.NUM_CLASSES)
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
    if not (mf.TEST.SEMANTIC_ON or mf.TEST.PANOPTIC_ON or mf.TEST.INSTANCE_ON):
        raise ValueError("MODEL.MASK_FORMER.TEST.SEMANTIC_ON, PANOPTIC_ON and INSTANCE_ON are all False: "
                         "inference would return nothing; set at least one to True")
    if mf.TEST.INSTANCE_ON:
        _positive("TEST.DETECTIONS_PER_IMAGE (MODEL.MASK_FORMER.TEST.INSTANCE_ON)", cfg.TEST.DETECTIONS_PER_IMAGE)
    if sh.NORM == "GN" and sh.CONVS_DIM % 32:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.CONVS_DIM ({sh.CONVS_DIM}) must be a multiple of 32 with "
                         "MODEL.SEM_SEG_HEAD.NORM 'GN' (GroupNorm with 32 groups)")
    if sh.COMMON_STRIDE <= 0 or sh.COMMON_STRIDE & (sh.COMMON_STRIDE - 1):
        raise ValueError(f"MODEL.SEM_SEG_HEAD.COMMON_STRIDE is {sh.COMMON_STRIDE}; expected a power of 2")


_NOT_A_KEY = "(not a key of detectron2 or sgr_d2; see sgr_d2/config.py)"


def load_config(config_file: str, opts=()):
    """A detectron2 config with sgr_d2's keys, merged from ``config_file`` and ``opts``, checked.

    An unknown key, a missing file or a bad value is an error naming the file and key. With
    ``DATASETS.FOLDER.ROOT``, the folder's datasets are registered (in this process) and a
    NUM_CLASSES of -1 is set from its classes.txt (docs/own_data.md).
    """
    cfg = get_cfg()
    add_sgr_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file {config_file} does not exist")
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            raise ValueError(f"config file {config_file}: {e.args[0] if e.args else e} {_NOT_A_KEY}") from e
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        msg = str(e.args[0] if e.args else e)
        if msg.startswith("Non-existent"):  # yacs: "Non-existent key: A.B"
            msg += " " + _NOT_A_KEY
        raise ValueError(f"command-line override: {msg}") from e
    from .data.datasets.folder import register_folder  # (imports detectron2's data side)

    register_folder(cfg)
    validate_config(cfg)
    return cfg


def _check_eval_weights(cfg, args) -> None:
    """--eval-only needs weights: MODEL.WEIGHTS, or --resume with a checkpoint in OUTPUT_DIR."""
    if not getattr(args, "eval_only", False) or cfg.MODEL.WEIGHTS or getattr(args, "allow_random_weights", False):
        return
    if getattr(args, "resume", False) and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return
    raise ValueError(
        "--eval-only with an empty MODEL.WEIGHTS would evaluate a randomly initialised model. Give "
        "the weights to evaluate (MODEL.WEIGHTS <file.pth> among the KEY VALUE overrides), or "
        f"--resume to evaluate the checkpoint that {os.path.join(cfg.OUTPUT_DIR, 'last_checkpoint')} "
        "names, or pass --allow-random-weights to evaluate a random model on purpose."
    )


def pick_device(cfg) -> None:
    """A config asking for CUDA on a machine without it runs on the CPU, with a warning."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("sgr_d2").warning("MODEL.DEVICE is %s but CUDA is not available: using cpu",
                                            cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"


def sync_norms(cfg, world_size: int) -> None:
    """With several workers, BatchNorm becomes detectron2's synchronised BatchNorm: ``SyncBN``
    (torch's ``SyncBatchNorm``, NCCL, CUDA) on GPUs, ``naiveSyncBN`` (its all-reduce runs on any
    backend) on the CPU."""
    if world_size <= 1:
        return
    sync = "SyncBN" if torch.cuda.is_available() else "naiveSyncBN"
    for node in (cfg.MODEL.RESNETS, cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.SGR, cfg.MODEL.GLORE, cfg.MODEL.FPN):
        if node.NORM == "BN":
            node.NORM = sync


def setup_cfg(args):
    """The frozen config of a ``train_net.py`` run: :func:`load_config` of ``--config-file`` and
    the overrides, refused up front when ``--eval-only`` would evaluate random weights or
    test-time augmentation has nothing to evaluate (a long training would fail at its end), moved
    to the CPU when CUDA is missing, with synchronised BatchNorm across several workers."""
    from .evaluation import check_test_time_augmentation

    cfg = load_config(args.config_file, args.opts)
    _check_eval_weights(cfg, args)
    check_test_time_augmentation(cfg)
    pick_device(cfg)
    # the workers of this run: detectron2's flags, or the process group torchrun / srun made
    sync_norms(cfg, comm.get_world_size() if comm.get_world_size() > 1 else args.num_gpus * args.num_machines)
    cfg.freeze()
    return cfg
