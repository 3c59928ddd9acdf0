"""The context toy (sgr_d2/data/toy_context.py): its defining properties, checked on generated
scenes and files, the local-classifier ceiling computed from them, and the reach of the baseline
(the receptive field, checked against the gradient support of the built model)."""
import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from torch.nn import functional as F

from detectron2.data import DatasetCatalog, MetadataCatalog

from sgr_d2.data import toy_context as tc
from sgr_d2.config import load_config
from sgr_d2.modeling.backbone.resnet import receptive_field

BASELINE = f"{REPO}/configs/toy/dil_fcn_r18_context.yaml"
SGR = f"{REPO}/configs/toy/dil_fcn_r18_context_sgr.yaml"


def _worlds(seed):
    return [tc.draw_context_scene(seed, team) for team in (tc.RED_TEAM, tc.BLUE_TEAM)]


def _column_gap(a, b):
    """Smallest |column difference| between a True pixel of ``a`` and one of ``b``."""
    ca, cb = np.nonzero(a.any(0))[0], np.nonzero(b.any(0))[0]
    return int(np.abs(ca[:, None] - cb[None, :]).min())


@pytest.mark.parametrize("seed", range(6000, 6012))
def test_the_two_worlds_differ_only_in_the_flag_colour_and_the_team_labels(seed):
    (img_r, sem_r, inst_r), (img_b, sem_b, inst_b) = _worlds(seed)
    differs = (img_r != img_b).any(axis=2)
    # the flag's cloth, and nothing else, changes colour (a draw made for one world only would
    # shift every later draw and change pixels everywhere)
    assert differs.any() and (sem_r[differs] == tc.FLAG).all()
    red = img_r[differs].astype(int)
    blue = img_b[differs].astype(int)
    assert (red[:, 0] > red[:, 2] + 60).all() and (blue[:, 2] > blue[:, 0] + 60).all()
    # labels: the team discs swap class, every other pixel keeps its label; instances unchanged
    assert set(np.unique(sem_r[sem_r != sem_b]).tolist()) == {tc.RED_TEAM}
    assert ((sem_r == tc.RED_TEAM) == (sem_b == tc.BLUE_TEAM)).all()
    assert (sem_r == tc.RED_TEAM).sum() > 0 and not (sem_r == tc.BLUE_TEAM).any()
    assert (inst_r == inst_b).all()
    # every team pixel is farther from every differing pixel than the baseline's reach
    assert _column_gap(differs, sem_r == tc.RED_TEAM) >= tc.TEAM_START - tc.FLAG_ZONE + 1 == 345
    assert _column_gap(differs, sem_r == tc.RED_TEAM) > tc.dilated_fcn_reach(load_config(BASELINE))
    with pytest.raises(ValueError, match="team is 7"):
        tc.draw_context_scene(seed, 7)


def test_the_validation_files_hold_both_worlds_and_the_cue_in_every_image():
    dicts = DatasetCatalog.get("sgr_toy_context_sem_seg_val")
    assert len(dicts) == 40
    meta = MetadataCatalog.get("sgr_toy_context_sem_seg_val")
    assert meta.stuff_classes == tc.CONTEXT_CLASSES
    assert meta.local_miou_ceiling == pytest.approx(100 * (3 + 2 / 3) / 5)  # quoted by compare_sgr.py
    red_team_pixels, blue_team_pixels = [], []
    for i in range(0, len(dicts), 2):
        (img_r, sem_r), (img_b, sem_b) = [
            (np.asarray(Image.open(d["file_name"]).convert("RGB")), np.asarray(Image.open(d["sem_seg_file_name"])))
            for d in dicts[i:i + 2]]
        # stored losslessly: the two images of a scene differ only on the flag's cloth ...
        cloth = (img_r != img_b).any(axis=2)
        assert (sem_r[cloth] == tc.FLAG).all() and (sem_b[cloth] == tc.FLAG).all()
        # ... which is in every image and says which team: red in the first, blue in the second
        assert cloth.sum() >= 20 * 12
        assert (img_r[cloth][:, 0].astype(int) > img_r[cloth][:, 2] + 60).all()
        assert (img_b[cloth][:, 2].astype(int) > img_b[cloth][:, 0] + 60).all()
        for sem, team in ((sem_r, tc.RED_TEAM), (sem_b, tc.BLUE_TEAM)):
            present = set(np.unique(sem).tolist())
            assert team in present and (set(tc.TEAMS) - {team}).isdisjoint(present)
        red_team_pixels.append(img_r[sem_r == tc.RED_TEAM])
        blue_team_pixels.append(img_b[sem_b == tc.BLUE_TEAM])
    # identical local appearance: the two classes' pixels are the same values, in the same order
    assert np.array_equal(np.concatenate(red_team_pixels), np.concatenate(blue_team_pixels))


def test_the_training_files_hold_the_cue_in_every_image_and_both_teams():
    """The training split (one world per scene): every image has the flag's cloth, whose colour
    names the one team class present; the two teams are balanced; and each file is its scene's
    draw, whose other world differs only on the cloth (so the discs look the same whichever team
    they are)."""
    dicts = DatasetCatalog.get("sgr_toy_context_sem_seg_train")
    scenes = tc.split_scenes("train")
    assert len(dicts) == len(scenes) == 200
    teams = []
    for d, (seed, team) in zip(dicts, scenes):
        img = np.asarray(Image.open(d["file_name"]).convert("RGB"))
        sem = np.asarray(Image.open(d["sem_seg_file_name"]))
        flag = img[sem == tc.FLAG].astype(int)
        red_cloth = (flag[:, 0] > flag[:, 2] + 60).sum()
        blue_cloth = (flag[:, 2] > flag[:, 0] + 60).sum()
        assert max(red_cloth, blue_cloth) >= 20 * 12 and min(red_cloth, blue_cloth) == 0, d["file_name"]
        assert team == (tc.RED_TEAM if red_cloth else tc.BLUE_TEAM), d["file_name"]
        present = set(np.unique(sem).tolist())
        assert team in present and (set(tc.TEAMS) - {team}).isdisjoint(present), d["file_name"]
        drawn, labels, _ = tc.draw_context_scene(seed, team)
        assert np.array_equal(img, drawn) and np.array_equal(sem, labels), d["file_name"]
        other = tc.draw_context_scene(seed, tc.BLUE_TEAM if team == tc.RED_TEAM else tc.RED_TEAM)[0]
        assert (sem[(other != img).any(axis=2)] == tc.FLAG).all(), d["file_name"]
        teams.append(team)
    assert teams.count(tc.RED_TEAM) == teams.count(tc.BLUE_TEAM) == 100


def test_a_local_classifier_ceiling_is_half_the_team_pixels_up_to_the_gap():
    seeds = range(6000, 6006)
    labelled = team = 0
    for seed in seeds:
        sem = tc.draw_context_scene(seed, tc.RED_TEAM)[1]
        labelled += sem.size
        team += int((sem == tc.RED_TEAM).sum())
    near = tc.local_accuracy_ceiling(0, seeds)
    assert near["team"] == 0.5
    assert near["all"] == pytest.approx((labelled - team / 2) / labelled, abs=1e-12)
    assert tc.local_accuracy_ceiling(344, seeds) == near
    # a window as wide as the strip always sees the flag; one in between sees it from some pixels
    assert tc.local_accuracy_ceiling(511, seeds) == {"all": 1.0, "team": 1.0}
    assert 0.5 < tc.local_accuracy_ceiling(420, seeds)["team"] < 1.0
    with pytest.raises(ValueError, match="radius is -1"):
        tc.local_accuracy_ceiling(-1, seeds)


def test_team_iou_and_miou_ceilings():
    total, q = tc.team_iou_ceiling()
    assert q == 0.5 and total == pytest.approx(2 / 3)  # 2 * (1/4) / (1/2 + 1/2 - 1/4)
    assert total > 0.25 / 1.25 + 0.75 / 1.75  # q = 1/4: q/(1+q) + (1-q)/(2-q)
    assert tc.local_miou_ceiling() == pytest.approx(100 * (3 + 2 / 3) / 5)


def test_the_baseline_reach_is_its_gradient_support(monkeypatch):
    """The receptive field computed layer by layer (``receptive_field``, ``dilated_fcn_reach``)
    equals how far the gradient of one output pixel spreads in the built baseline. Weights and
    BatchNorm are made positive so that no ReLU blocks a path, and the stem's max-pool is probed
    as an average pool (same window; a max routes the gradient to one pixel only)."""
    # the channel widths do not change the receptive field; narrow ones make the probe cheap
    cfg = load_config(BASELINE, ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.STEM_OUT_CHANNELS", "8",
                                 "MODEL.RESNETS.RES2_OUT_CHANNELS", "8", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "8"])
    size, stride = receptive_field(cfg)
    assert (size, stride) == (611, 8)
    assert tc.dilated_fcn_reach(cfg) == 324
    assert tc.dilated_fcn_reach(load_config(BASELINE, ["MODEL.SEM_SEG_HEAD.NUM_CONVS", "2"])) == 332
    with pytest.raises(ValueError, match="DilatedFCNHead"):
        tc.dilated_fcn_reach(load_config(f"{REPO}/configs/toy/maskformer_r18.yaml"))

    from detectron2.modeling import build_model

    monkeypatch.setattr(F, "max_pool2d", lambda x, kernel_size, stride, padding: F.avg_pool2d(
        x, kernel_size, stride, padding))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.abs_().add_(0.01)
                if m.bias is not None:
                    m.bias.fill_(0.1)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.fill_(1.0)
                m.bias.fill_(0.1)
    x = torch.ones(1, 3, 16, 1024, requires_grad=True)
    feats = model.backbone(x)
    g = torch.autograd.grad(feats["res5"][0, 0, 1, 64], x, retain_graph=True)[0]
    cols = torch.nonzero(g[0].abs().sum((0, 1))).flatten()
    assert (cols.min().item(), cols.max().item()) == (8 * 64 - 305, 8 * 64 + 305)
    logits = model.sem_seg_head(feats)[0]
    reach = 0
    for x0 in range(512, 520):  # every phase of the ×8 upsampling
        g = torch.autograd.grad(logits[0, 0, 8, x0], x, retain_graph=True)[0]
        cols = torch.nonzero(g[0].abs().sum((0, 1))).flatten()
        reach = max(reach, x0 - cols.min().item(), cols.max().item() - x0)
    assert reach == tc.dilated_fcn_reach(cfg)


def test_the_deeplabv3_control_sees_the_flag():
    """tools/compare_sgr.py --control: DeepLabV3's head on the baseline's backbone. Its atrous
    branches reach 305 (res5) + 36 * 8 (the widest rate at stride 8) + 8 (the 3x3 conv after ASPP)
    + 11 (the upsampling) = 612 px > 345, and its image pooling the whole strip: an output pixel at
    one end depends on the input at the other, as it does not for the Dilated-FCN baseline."""
    from detectron2.modeling import build_model

    opts = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.STEM_OUT_CHANNELS", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "8",
            "MODEL.SEM_SEG_HEAD.CONVS_DIM", "8"]
    control = load_config(BASELINE, opts + ["MODEL.SEM_SEG_HEAD.NAME", "DeepLabV3Head"])
    assert tc.head_reach(control) == (612, True) and tc.head_reach(load_config(BASELINE)) == (324, False)
    for cfg, sees in ((control, True), (load_config(BASELINE, opts), False)):
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        x = torch.randn(1, 3, 32, 512, requires_grad=True)
        logits = model.sem_seg_head(model.backbone(x))[0]
        g = torch.autograd.grad(logits[0, 0, 16, 500], x)[0]
        assert bool(g[..., :100].abs().sum() > 0) == sees  # the flag zone, 400+ px away


def test_the_context_configs_share_the_recipe_and_keep_the_flag_out_of_reach():
    base, sgr = load_config(BASELINE), load_config(SGR)
    assert base.MODEL.BACKBONE.NAME != "build_sgr_backbone" and sgr.MODEL.BACKBONE.NAME == "build_sgr_backbone"
    for node in ("SOLVER", "INPUT", "DATASETS", "DATALOADER", "TEST"):
        assert base[node] == sgr[node], node
    # single training scale, no crop, no jitter; multi-scale test only at scales >= 1
    assert tuple(base.INPUT.MIN_SIZE_TRAIN) == (tc.HEIGHT,) and not base.INPUT.CROP.ENABLED
    assert not base.INPUT.COLOR_AUG and base.INPUT.MIN_SIZE_TEST == tc.HEIGHT
    assert min(base.TEST.AUG.SCALES) >= 1.0
    assert base.MODEL.SEM_SEG_HEAD.NUM_CLASSES == len(tc.CONTEXT_CLASSES) and base.SOLVER.IMS_PER_BATCH == 8


def test_the_ceiling_tool_prints_the_figures_of_docs_method(capsys):
    """docs/method.md quotes these rows of `python tools/context_toy_ceiling.py` (validation split)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_ceiling", f"{REPO}/tools/context_toy_ceiling.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--radii", "344", "400"])
    out = capsys.readouterr().out
    assert "sgr_toy_context val: 20 scenes, each drawn with a red and a blue flag" in out
    assert "| 344 | 96.99% | 50.00% |" in out and "| 400 | 98.01% | 66.85% |" in out
    assert "mIoU of a local classifier <= 73.3" in out
    assert "reach of configs/toy/dil_fcn_r18_context.yaml: 324 px" in out
    train = tc.split_scenes("train")
    assert len(train) == 200 and sum(team == tc.RED_TEAM for _, team in train) == 100
    assert len({seed for seed, _ in train}) == 200
    val = tc.split_scenes("val")
    assert val[:4] == [(6000, tc.RED_TEAM), (6000, tc.BLUE_TEAM), (6001, tc.RED_TEAM), (6001, tc.BLUE_TEAM)]
    with pytest.raises(KeyError, match="not 'test'"):
        tc.split_scenes("test")
