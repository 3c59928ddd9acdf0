"""Every model config under configs/ builds its model and runs one training and one inference step.

The model is the config's own architecture (depths, heads, decoders, norms, where SGR goes) at
reduced widths (:data:`SHRINK`), on a tiny synthetic batch, so that every config's step fits in
the suite on a CPU. The full widths are checked where width is the point: the official
MaskFormer / Mask2Former layouts (tests/test_published_models.py) and the recipes (below and
tests/test_recipe_parity.py).

The three datasets' copies of a model differ only in NUM_CLASSES (and the recipe outside
``MODEL``), and a ResNet-101 model from its ResNet-50 twin only in the depth. Each group of
configs whose ``MODEL`` nodes are equal up to NUM_CLASSES, WEIGHTS and RESNETS.DEPTH runs the
training and inference steps once, on its representative; the other members assert that
equality, build their model (with their class count and depth) and check its structure.

The panoptic and instance task folders (``<dataset>_{panoptic,instance}/``), the panoptic toy and
the panoptic / instance configs of configs/folder/ (their bases on a folder) are grouped further
(:data:`FOLDED`): up to their backbone (R-50 / Swin-T, which
test_panoptic_and_instance_recipes_are_the_official_ones finds to be their only difference), the
ResNet norm (BN / FrozenBN) and SGR (an ``_sgr`` config is its baseline plus SGR, checked here),
so that each inference setting (all outputs; instance only) runs one step, on an ``_sgr`` config;
the steps of those backbones under Mask2Former's head run in the semantic configs.
"""
import functools
import glob
import math
import os
import re

import numpy as np
import pytest
import torch

from detectron2.data.catalog import Metadata
from detectron2.modeling import build_model
from detectron2.structures import Instances

from conftest import folder_opts, libyaml

from sgr_d2.engine import build_optimizer
from sgr_d2.config import load_config
from sgr_d2.sgr import component_label_map

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")
CONFIGS = sorted(
    os.path.relpath(p, CONFIG_DIR)
    for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
)
# One configuration per head runs by default (every other one is marked slow).
FAST = {
    "toy/dil_fcn_r18.yaml",
    "toy/dil_fcn_r18_sgr.yaml",
    "toy/maskformer_r18_sgr.yaml",
    "toy/mask2former_r18_sgr.yaml",
    "ade20k/deeplabv3_r50_sgr.yaml",
    "ade20k/sem_fpn_r50_sgr.yaml",
    "ade20k/upernet_swin_t_sgr.yaml",
}
# Meta-architectures of other tasks: built and tested by their own tests.
NOT_SEMANTIC = {"GeneralizedRCNN", "ProposalNetwork", "RetinaNet", "PanopticFPN", "SemanticSegmentor"}
SGR_LOSSES = ("loss_sgr_union", "loss_sgr_cls", "loss_sgr_div")
SIZE = 64
SHRINK = [  # widths a quarter or less of the configs' (keys a config does not use change nothing)
    "MODEL.WEIGHTS", "",
    "MODEL.SGR.NUM_TOKENS", "16",
    "MODEL.SGR.NUM_MATCHED", "8",
    "MODEL.SGR.TOKEN_DIM", "32",
    "MODEL.SGR.NUM_HEADS", "4",
    "MODEL.SGR.FFN_DIM", "32",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
    "MODEL.SWIN.EMBED_DIM", "32",
    "MODEL.SWIN.NUM_HEADS", "[1, 2, 4, 8]",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
    "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "32",
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "20",
    "MODEL.FPN.OUT_CHANNELS", "32",
]


# configs grouped up to their backbone, ResNet norm and SGR (the module docstring)
FOLDED = re.compile(r"^(\w+_(panoptic|instance)/|(toy|folder)/mask2former_\w*(panoptic|instance))")


def _is_sgr(rel) -> bool:
    """An SGR config by its name: ``*_sgr.yaml`` or ``*_sgr_<variant>.yaml``."""
    return re.search(r"_sgr(_|$)", os.path.splitext(os.path.basename(rel))[0]) is not None


@functools.lru_cache(maxsize=None)
def _shrunk(rel):
    """The config ``rel`` loaded with :data:`SHRINK` (once per process: collection groups the
    configs, the tests read them again; callers clone before changing it)."""
    return load_config(os.path.join(CONFIG_DIR, rel), SHRINK + folder_opts(rel))


def _flat(node, prefix=""):
    """A CfgNode as a sorted tuple of (full key, value): equal for equal nodes, and much cheaper
    than comparing their YAML dumps."""
    items = []
    for k, v in node.items():
        if isinstance(v, dict):
            items += _flat(v, f"{prefix}{k}.")
        else:
            items.append((prefix + k, repr(v)))
    return tuple(sorted(items))


@functools.lru_cache(maxsize=None)
def _model_key(rel):
    """The config's MODEL node without NUM_CLASSES and WEIGHTS (configs that fail to load get a
    key of their own, so the test reports the error); :data:`FOLDED` ones also without the
    backbone, its norm and SGR."""
    try:
        cfg = _shrunk(rel)
    except Exception:  # noqa: BLE001 - reported by the test itself
        return rel
    model = cfg.MODEL.clone()
    model.defrost()
    model.SEM_SEG_HEAD.NUM_CLASSES = 0
    model.WEIGHTS = ""
    model.RESNETS.DEPTH = 0  # R-101 is R-50 with more res4 blocks: the same code runs the step
    if FOLDED.match(rel):
        model.BACKBONE.NAME = model.RESNETS.NORM = ""
        del model["SGR"], model["SWIN"]
    return _flat(model)


def _without_sgr(cfg):
    """The config without what adding SGR changes: MODEL.BACKBONE.NAME, MODEL.SGR, OUTPUT_DIR,
    the device."""
    c = cfg.clone()
    c.defrost()
    c.MODEL.BACKBONE.NAME = c.MODEL.SGR.BACKBONE_NAME if cfg.MODEL.BACKBONE.NAME == "build_sgr_backbone" else \
        c.MODEL.BACKBONE.NAME
    del c.MODEL["SGR"]
    c.OUTPUT_DIR = c.MODEL.DEVICE = ""
    return c


def _representatives():
    """rel -> the config of its group that runs the steps (a FAST one where there is one, else
    an SGR one)."""
    groups = {}
    for rel in sorted(CONFIGS, key=lambda r: (r not in FAST, "r101" in r, not _is_sgr(r), r)):
        groups.setdefault(_model_key(rel), []).append(rel)
    return {rel: members[0] for members in groups.values() for rel in members}


with libyaml():
    REPRESENTATIVE = _representatives()  # loads every config once (_shrunk)


def test_libyaml_reads_every_config_as_pyyaml_does():
    """conftest.libyaml's promise, on every YAML file under configs/ (bug caught: a loader that
    resolves a value differently, e.g. a scientific-notation float, a tuple or a bool, which
    would change what the tests of this module check)."""
    import yaml

    if not getattr(yaml, "__with_libyaml__", False):
        pytest.skip("PyYAML without libyaml: the tests use its pure-Python parser")
    for path in sorted(glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)):
        with open(path) as f:
            text = f.read()
        assert yaml.load(text, Loader=yaml.CSafeLoader) == yaml.safe_load(text), path


def _params():
    out = []
    for rel in CONFIGS:
        marks = [] if rel in FAST else [pytest.mark.slow]
        out.append(pytest.param(rel, marks=marks, id=rel))
    return out


def synthetic_image(num_classes: int, seed: int, size: int = SIZE):
    """An image, its label map (background class, rectangles of other classes, an ignore strip)
    and the dict fields sgr_d2's mapper emits for it."""
    rng = np.random.default_rng(seed)
    sem = np.full((size, size), rng.integers(num_classes), dtype=np.int64)
    for _ in range(4):
        y, x = rng.integers(0, size - 8, size=2)
        h, w = rng.integers(6, size // 2, size=2)
        sem[y:y + h, x:x + w] = rng.integers(num_classes)
    sem[:, -3:] = 255  # padding / ignore
    image = torch.as_tensor(rng.integers(0, 256, size=(3, size, size)), dtype=torch.uint8)
    labels, classes = component_label_map(sem, 255)  # the mapper's compact form of the components
    inst = Instances((size, size))
    present = np.unique(sem[sem != 255])
    inst.gt_classes = torch.as_tensor(present, dtype=torch.int64)
    inst.gt_masks = torch.from_numpy(sem[None] == present.reshape(-1, 1, 1))
    return {
        "image": image,
        "sem_seg": torch.as_tensor(sem),
        "components": {"labels": torch.from_numpy(labels), "classes": torch.from_numpy(classes)},
        "instances": inst,
        "height": size,
        "width": size,
    }


def test_every_dataset_has_the_required_configs():
    required = ["dil_fcn_r101", "deeplabv3_r101", "sem_fpn_r50", "upernet_swin_t", "dil_fcn_r50",
                "deeplabv3_r50"]
    for ds in ("cityscapes", "ade20k", "coco_stuff_10k"):
        for name in required:
            for suffix in ("", "_sgr"):
                assert f"{ds}/{name}{suffix}.yaml" in CONFIGS, f"missing configs/{ds}/{name}{suffix}.yaml"
    for ds in ("coco", "ade20k", "cityscapes"):  # panoptic and instance segmentation
        for task in ("panoptic", "instance"):
            for name in ("mask2former_r50", "mask2former_swin_t"):
                for suffix in ("", "_sgr"):
                    assert f"{ds}_{task}/{name}{suffix}.yaml" in CONFIGS, f"missing configs/{ds}_{task}/{name}{suffix}.yaml"


@pytest.mark.parametrize(
    "rel, crop, batch, lr, max_iter, classes",
    [
        ("cityscapes/dil_fcn_r101.yaml", 768, 8, 0.006, 2975 * 240 // 8, 19),
        ("ade20k/dil_fcn_r101.yaml", 512, 16, 0.004, 20210 * 120 // 16, 150),
        ("coco_stuff_10k/dil_fcn_r101.yaml", 512, 16, 0.004, 9000 * 140 // 16, 171),
    ],
)
def test_dataset_recipes(rel, crop, batch, lr, max_iter, classes):
    """docs/method.md#training-and-evaluation-recipe: the table and the bullet points, read back from the merged configs."""
    cfg = load_config(os.path.join(CONFIG_DIR, rel))
    assert tuple(cfg.INPUT.CROP.SIZE) == (crop, crop) and cfg.INPUT.CROP.ENABLED
    assert cfg.SOLVER.IMS_PER_BATCH == batch and cfg.SOLVER.BASE_LR == pytest.approx(lr)
    assert cfg.SOLVER.MAX_ITER == max_iter and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == classes
    assert cfg.SOLVER.OPTIMIZER == "SGD" and cfg.SOLVER.MOMENTUM == 0.9 and cfg.SOLVER.WEIGHT_DECAY == 1e-4
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR" and cfg.SOLVER.POLY_LR_POWER == 0.9
    assert cfg.SOLVER.HEAD_LR_MULTIPLIER == 10.0
    base = 1024 if "cityscapes" in rel else 512
    sizes = list(cfg.INPUT.MIN_SIZE_TRAIN)
    assert cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice"
    assert min(sizes) == base // 2 and max(sizes) == 2 * base  # random scale 0.5-2.0
    assert cfg.INPUT.MIN_SIZE_TEST == base
    assert cfg.MODEL.RESNETS.OUTPUT_STRIDE == 8 and list(cfg.MODEL.RESNETS.MULTI_GRID) == [1, 2, 4]
    assert cfg.INPUT.DATASET_MAPPER_NAME == "sgr_sem_seg"


@pytest.mark.parametrize("folder, train, test, classes, mapper, max_iter, tasks, norm", [
    ("coco_panoptic", "coco_2017_train_panoptic", "coco_2017_val_panoptic_with_sem_seg", 133, "coco_panoptic_lsj",
     368750, (True, True, True), "FrozenBN"),
    ("coco_instance", "coco_2017_train", "coco_2017_val", 80, "coco_instance_lsj", 368750, (False, True, False),
     "FrozenBN"),
    ("ade20k_panoptic", "ade20k_panoptic_train", "ade20k_panoptic_val", 150, "mask_former_panoptic", 160000,
     (True, True, True), "FrozenBN"),
    ("ade20k_instance", "ade20k_instance_train", "ade20k_instance_val", 100, "mask_former_instance", 160000,
     (True, True, True), "FrozenBN"),
    ("cityscapes_panoptic", "cityscapes_fine_panoptic_train", "cityscapes_fine_panoptic_val", 19,
     "mask_former_panoptic", 90000, (True, True, True), "BN"),
    ("cityscapes_instance", "cityscapes_fine_instance_seg_train", "cityscapes_fine_instance_seg_val", 8,
     "mask_former_instance", 90000, (False, True, False), "BN"),
])
def test_panoptic_and_instance_recipes_are_the_official_ones(folder, train, test, classes, mapper, max_iter, tasks,
                                                             norm):
    """The values of the official Mask2Former configs (configs/<dataset>/<task>-segmentation/
    maskformer2_R50_*.yaml and their Base-*.yaml), read back from the merged configs; the Swin-T
    config differs from the R-50 one in the backbone only (BN: SyncBN across GPUs, as the
    official Cityscapes recipe; FrozenBN: detectron2's default, which the others keep)."""
    cfg = load_config(os.path.join(CONFIG_DIR, folder, "mask2former_r50.yaml"))
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == ((train,), (test,))
    assert cfg.MODEL.META_ARCHITECTURE == "MaskFormer" and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == classes
    assert cfg.INPUT.DATASET_MAPPER_NAME == mapper and cfg.SOLVER.MAX_ITER == max_iter
    t = cfg.MODEL.MASK_FORMER.TEST
    assert (t.SEMANTIC_ON, t.INSTANCE_ON, t.PANOPTIC_ON) == tasks
    assert t.OBJECT_MASK_THRESHOLD == t.OVERLAP_THRESHOLD == 0.8 and cfg.TEST.DETECTIONS_PER_IMAGE == 100
    assert cfg.MODEL.RESNETS.NORM == norm and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    mf, sh = cfg.MODEL.MASK_FORMER, cfg.MODEL.SEM_SEG_HEAD
    assert (mf.NUM_OBJECT_QUERIES, mf.DEC_LAYERS, mf.TRAIN_NUM_POINTS, mf.MASK_LOSS_TYPE) == (100, 10, 12544, "sigmoid_ce")
    assert (mf.CLASS_WEIGHT, mf.MASK_WEIGHT, mf.DICE_WEIGHT, mf.NO_OBJECT_WEIGHT) == (2.0, 5.0, 5.0, 0.1)
    assert (sh.PIXEL_DECODER_NAME, sh.TRANSFORMER_ENC_LAYERS) == ("MSDeformAttnPixelDecoder", 6)
    sol = cfg.SOLVER
    assert (sol.OPTIMIZER, sol.IMS_PER_BATCH, sol.BASE_LR, sol.WEIGHT_DECAY, sol.BACKBONE_MULTIPLIER) == \
        ("ADAMW", 16, 0.0001, 0.05, 0.1)
    assert sol.CLIP_GRADIENTS.CLIP_TYPE == "full_model" and sol.CLIP_GRADIENTS.CLIP_VALUE == 0.01 and sol.AMP.ENABLED
    if folder.startswith("coco"):  # the "new baseline": large-scale jitter, steps at 89% and 96%
        assert (cfg.INPUT.IMAGE_SIZE, cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE) == (1024, 0.1, 2.0)
        assert sol.LR_SCHEDULER_NAME == "WarmupMultiStepLR" and tuple(sol.STEPS) == (327778, 355092)
        assert sol.WARMUP_ITERS == 10 and cfg.INPUT.COLOR_AUG is False
    else:
        short = 640 if folder.startswith("ade20k") else 1024
        assert sol.LR_SCHEDULER_NAME == "WarmupPolyLR" and cfg.INPUT.COLOR_AUG is True
        assert list(cfg.INPUT.MIN_SIZE_TRAIN) == [int(x * 0.1 * short) for x in range(5, 21)]
        assert cfg.INPUT.MIN_SIZE_TEST == short
        assert tuple(cfg.INPUT.CROP.SIZE) == ((640, 640) if short == 640 else (512, 1024))
    swin = load_config(os.path.join(CONFIG_DIR, folder, "mask2former_swin_t.yaml"))
    assert swin.MODEL.BACKBONE.NAME == "build_swin_backbone" and swin.MODEL.SWIN.DEPTHS == [2, 2, 6, 2]
    for c in (cfg, swin):
        c.defrost()
        c.MODEL.BACKBONE.NAME, c.MODEL.WEIGHTS, c.OUTPUT_DIR = "", "", ""
        del c.MODEL["SWIN"]
    assert swin == cfg


def test_fast_configs_run_their_steps():
    for rel in FAST:
        assert REPRESENTATIVE[rel] == rel, f"{rel} is fast but {REPRESENTATIVE[rel]} runs its steps"


def _sample_parameters(model):
    """A few trainable parameters of the backbone, the SGR component and the rest (the step must
    change each)."""
    picks = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or p.dim() < 2:
            continue
        part = "sgr" if ".sgr." in name or name.startswith("backbone.sgr.") else \
            "backbone" if name.startswith("backbone.") else "head"
        picks.setdefault(part, (name, p, p.detach().clone()))
    return picks


@pytest.mark.parametrize("rel", _params())
def test_config_builds_trains_and_infers(rel, device):
    """One training step: the SGR terms are there exactly with SGR, MaskFormer's and Mask2Former's
    a classification, mask and Dice term per decoder output; every term is finite and the update
    moves the backbone, the head and SGR. Then inference: probabilities over the classes at the
    requested size, and the region maps with SGR."""
    from sgr_d2.modeling import find_sgr_backbone

    cfg = _shrunk(rel).clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = str(device)
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch in NOT_SEMANTIC:
        pytest.skip(f"{rel}: META_ARCHITECTURE {arch} is not one of sgr_d2's semantic segmentors "
                    "(detection transfer configs are tested with their own task)")
    with_sgr = _is_sgr(rel)
    assert (cfg.MODEL.BACKBONE.NAME == "build_sgr_backbone") == with_sgr, \
        f"{rel}: the name says SGR={with_sgr} but MODEL.BACKBONE.NAME is {cfg.MODEL.BACKBONE.NAME}"
    baseline_rel = re.sub(r"_sgr(_\w+)?\.yaml$", ".yaml", rel)
    if with_sgr and baseline_rel in CONFIGS:
        # the SGR config is its baseline with SGR: the backbone wrapper and MODEL.SGR, nothing else
        assert _without_sgr(cfg) == _without_sgr(_shrunk(baseline_rel)), rel
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    torch.manual_seed(0)
    model = build_model(cfg)
    assert (find_sgr_backbone(model) is not None) == with_sgr
    predictor = getattr(getattr(model, "sem_seg_head", None), "predictor", None)
    if isinstance(predictor, torch.nn.Conv2d):
        assert predictor.out_channels == num_classes
    rep = REPRESENTATIVE[rel]
    if rep != rel:
        # same MODEL node as `rep` up to NUM_CLASSES (the grouping key): `rep` runs the steps
        assert _model_key(rel) == _model_key(rep)
        return

    model.train()
    batch = [synthetic_image(num_classes, seed) for seed in (1, 2)]
    losses = model(batch)
    for key in SGR_LOSSES:
        assert (key in losses) == with_sgr, f"{rel}: {key} present={key in losses}, SGR={with_sgr}"
    if arch == "MaskFormer":
        mask = {"loss_ce", "loss_mask", "loss_dice"}
        aux = {f"{k}_{i}" for k in mask for i in range(cfg.MODEL.MASK_FORMER.DEC_LAYERS - 1)}
        assert set(losses) - set(SGR_LOSSES) == mask | aux, sorted(losses)
    else:
        assert set(losses) - set(SGR_LOSSES) == {"loss_sem_seg"}, sorted(losses)
    for key, value in losses.items():
        assert value.dim() == 0 and math.isfinite(value.item()), f"{rel}: {key} = {value}"
    optimizer = build_optimizer(cfg, model)
    picks = _sample_parameters(model)
    assert set(picks) == ({"backbone", "head", "sgr"} if with_sgr else {"backbone", "head"})
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    for part, (name, p, before) in picks.items():
        assert not torch.equal(p.detach(), before), f"{rel}: the step left {name} ({part}) unchanged"
        assert torch.isfinite(p).all(), f"{rel}: {name} is not finite after the step"

    model.eval()
    tests = cfg.MODEL.MASK_FORMER.TEST if arch == "MaskFormer" else None
    if tests is not None and tests.PANOPTIC_ON and not hasattr(model.metadata, "thing_dataset_id_to_contiguous_id"):
        # the dataset is not registered here: the first classes are things
        model.metadata = Metadata(name="synthetic", thing_dataset_id_to_contiguous_id={i: i for i in range(4)})
    with torch.no_grad():
        out = model([{"image": b["image"], "height": SIZE, "width": SIZE} for b in batch])
    assert len(out) == 2
    for r in out:
        expected = {"sem_seg"} if tests is None else {
            key for key, on in (("sem_seg", tests.SEMANTIC_ON), ("panoptic_seg", tests.PANOPTIC_ON),
                                ("instances", tests.INSTANCE_ON)) if on}
        assert set(r) == expected | ({"sgr_regions"} if with_sgr else set()), sorted(r)
        if "sem_seg" in r:
            assert tuple(r["sem_seg"].shape) == (num_classes, SIZE, SIZE)
            assert torch.isfinite(r["sem_seg"]).all()
        if "panoptic_seg" in r:
            assert r["panoptic_seg"][0].shape == (SIZE, SIZE) and r["panoptic_seg"][0].dtype == torch.int32
        if "instances" in r:
            inst = r["instances"]
            assert inst.image_size == (SIZE, SIZE) and torch.isfinite(inst.scores).all()
            if not tests.PANOPTIC_ON:  # (with it, only the thing classes among them)
                assert len(inst) == min(cfg.TEST.DETECTIONS_PER_IMAGE,
                                        cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES * num_classes)
        if with_sgr:
            assert r["sgr_regions"].shape[0] == cfg.MODEL.SGR.NUM_TOKENS


MASK2FORMER_TOY = os.path.join(CONFIG_DIR, "toy", "mask2former_r18_sgr.yaml")
TOY_SGR = os.path.join(CONFIG_DIR, "toy", "dil_fcn_r18_sgr.yaml")


@pytest.mark.parametrize("config, override, words", [
    (TOY_SGR, ["MODEL.SGR.NUM_MATCHED", "40"], ["NUM_MATCHED (40)", "NUM_TOKENS (32)"]),
    (TOY_SGR, ["MODEL.SGR.NUM_MATCHED", "-3"], ["MODEL.SGR.NUM_MATCHED is -3; expected a positive"]),
    (TOY_SGR, ["MODEL.SGR.MATCHING", "nearest"], ["MODEL.SGR.MATCHING is 'nearest'", "'hungarian'"]),
    (TOY_SGR, ["MODEL.SGR.NUM_HEADS", "5"], ["TOKEN_DIM (128)", "NUM_HEADS (5)"]),
    (TOY_SGR, ["MODEL.RESNETS.OUTPUT_STRIDE", "4"], ["OUTPUT_STRIDE is 4"]),
    (TOY_SGR, ["SOLVER.OPTIMIZER", "Adam"], ["SOLVER.OPTIMIZER is 'Adam'"]),
    (TOY_SGR, ["MODEL.SGR.NUM_TOKEN", "3"], ["command-line override", "MODEL.SGR.NUM_TOKEN", "not a key"]),
    (MASK2FORMER_TOY, ["MODEL.MASK_FORMER.MASK_LOSS_TYPE", "l1"], ["MASK_LOSS_TYPE", "'l1'"]),
    (MASK2FORMER_TOY, ["MODEL.MASK_FORMER.HIDDEN_DIM", "60", "MODEL.MASK_FORMER.NHEADS", "8"], ["HIDDEN_DIM", "NHEADS"]),
    (MASK2FORMER_TOY, ["MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO", "1.5"], ["IMPORTANCE_SAMPLE_RATIO", "1.5"]),
    (MASK2FORMER_TOY, ["MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "False"], ["SEMANTIC_ON", "PANOPTIC_ON", "INSTANCE_ON",
                                                                       "all False"]),
    (MASK2FORMER_TOY, ["MODEL.META_ARCHITECTURE", "Mask2Former"], ["META_ARCHITECTURE is 'Mask2Former'",
                                                                   "use 'MaskFormer'"]),
    # found when the model is built
    (MASK2FORMER_TOY, ["MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE", "res9"], ["TRANSFORMER_IN_FEATURE", "res9"]),
    (MASK2FORMER_TOY, ["MODEL.SEM_SEG_HEAD.IN_FEATURES", "['res2', 'p7']"], ["IN_FEATURES", "p7"]),
    (MASK2FORMER_TOY, ["MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "Nope"], ["PIXEL_DECODER_NAME", "Nope"]),
    (MASK2FORMER_TOY, ["MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES", "['res1']"],
     ["DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES", "res1"]),
    (TOY_SGR, ["MODEL.SGR.IN_FEATURE", "res9"], ["MODEL.SGR.IN_FEATURE is 'res9'"]),
])
def test_bad_config_values_name_the_key(config, override, words):
    """Every check of a config value: the error names the key and the value (each row catches its
    check dropped or its message losing the key)."""
    with pytest.raises((ValueError, KeyError)) as err:
        build_model(load_config(config, ["MODEL.DEVICE", "cpu", *override]))
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_a_config_file_names_itself_in_its_errors(tmp_path):
    import yaml

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"_BASE_": TOY_SGR, "MODEL": {"SGR": {"NUM_TOKEN": 3}}}))
    with pytest.raises(ValueError, match=r"config file .*bad\.yaml: .*MODEL\.SGR\.NUM_TOKEN.*not a key"):
        load_config(str(bad))
    with pytest.raises(FileNotFoundError, match="config file .*nope.yaml does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
