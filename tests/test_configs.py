"""Every model config under configs/ builds its model and runs one training and one inference step.

The model is the config's own (depth, widths, heads); only the SGR component is shrunk and the
input is a tiny synthetic batch, so a step fits on a CPU. The heavy builds (ResNet-101, ...) are
marked slow; one representative per head runs by default.

The three datasets' copies of a model differ only in NUM_CLASSES (and the recipe outside
``MODEL``). Each group of configs whose ``MODEL`` nodes are equal up to NUM_CLASSES and WEIGHTS
runs the training and inference steps once, on its representative; the other members assert that
equality, build their model (with their class count) and check its structure, which keeps the
whole suite within a few CPU minutes.
"""
import glob
import math
import os

import numpy as np
import pytest
import torch

import sgr_d2  # noqa: F401  (before detectron2)
from detectron2.modeling import build_model
from detectron2.structures import Instances

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
    "ade20k/deeplabv3_r50_sgr.yaml",
    "ade20k/sem_fpn_r50_sgr.yaml",
    "ade20k/upernet_swin_t_sgr.yaml",
}
# Meta-architectures of other tasks: built and tested by their own tests.
NOT_SEMANTIC = {"GeneralizedRCNN", "ProposalNetwork", "RetinaNet", "PanopticFPN", "SemanticSegmentor"}
SGR_LOSSES = ("loss_sgr_union", "loss_sgr_cls", "loss_sgr_div")
SIZE = 64
SHRINK = [
    "MODEL.WEIGHTS", "",
    "MODEL.DEVICE", "cpu",
    "MODEL.SGR.NUM_TOKENS", "16",
    "MODEL.SGR.NUM_MATCHED", "8",
    "MODEL.SGR.TOKEN_DIM", "32",
    "MODEL.SGR.NUM_HEADS", "4",
    "MODEL.SGR.FFN_DIM", "32",
]


def _model_key(rel):
    """The config's MODEL node without NUM_CLASSES and WEIGHTS (configs that fail to load get a
    key of their own, so the test reports the error)."""
    try:
        cfg = load_config(os.path.join(CONFIG_DIR, rel), SHRINK)
    except Exception:  # noqa: BLE001 - reported by the test itself
        return rel
    model = cfg.MODEL.clone()
    model.defrost()
    model.SEM_SEG_HEAD.NUM_CLASSES = 0
    model.WEIGHTS = ""
    return model.dump()


def _representatives():
    """rel -> the config of its group that runs the steps (a FAST one where there is one)."""
    groups = {}
    for rel in sorted(CONFIGS, key=lambda r: (r not in FAST, r)):
        groups.setdefault(_model_key(rel), []).append(rel)
    return {rel: members[0] for members in groups.values() for rel in members}


REPRESENTATIVE = _representatives()


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


@pytest.mark.parametrize(
    "rel, crop, batch, lr, max_iter, classes",
    [
        ("cityscapes/dil_fcn_r101.yaml", 768, 8, 0.006, 2975 * 240 // 8, 19),
        ("ade20k/dil_fcn_r101.yaml", 512, 16, 0.004, 20210 * 120 // 16, 150),
        ("coco_stuff_10k/dil_fcn_r101.yaml", 512, 16, 0.004, 9000 * 140 // 16, 171),
    ],
)
def test_dataset_recipes(rel, crop, batch, lr, max_iter, classes):
    """SGR_SPEC §4, the table and the bullet points, read back from the merged configs."""
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
def test_config_builds_trains_and_infers(rel):
    from sgr_d2.modeling import find_sgr_backbone

    cfg = load_config(os.path.join(CONFIG_DIR, rel), SHRINK)
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch in NOT_SEMANTIC:
        pytest.skip(f"{rel}: META_ARCHITECTURE {arch} is not one of sgr_d2's semantic segmentors "
                    "(detection transfer configs are tested with their own task)")
    with_sgr = os.path.splitext(rel)[0].endswith("_sgr")
    assert (cfg.MODEL.BACKBONE.NAME == "build_sgr_backbone") == with_sgr, \
        f"{rel}: the name says SGR={with_sgr} but MODEL.BACKBONE.NAME is {cfg.MODEL.BACKBONE.NAME}"
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
    assert losses, f"{rel}: no losses"
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
    with torch.no_grad():
        out = model([{"image": b["image"], "height": SIZE, "width": SIZE} for b in batch])
    assert len(out) == 2
    for r in out:
        assert tuple(r["sem_seg"].shape) == (num_classes, SIZE, SIZE)
        assert torch.isfinite(r["sem_seg"]).all()
