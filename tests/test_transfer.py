"""Transfer to detection (docs/method.md#transfer-to-detection): GloRe, the toy instance dataset, tools/export_backbone.py,
the Mask R-CNN configs and the trainer's detection path."""
import importlib.util
import math
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from conftest import REPO, TOY_BASE, TOY_SGR, cheap_init, load_reporting_incompatible, tiny_toy_cfg

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, SemSegEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.env import seed_all_rng

from sgr_d2.engine import Trainer
from sgr_d2.config import load_config
from sgr_d2.modeling.backbone.glore import GloReBackbone, GloReUnit

TOY = os.path.join(REPO, "configs", "toy")
COCO = os.path.join(REPO, "configs", "coco")
TOY_FPN, TOY_FPN_SGR = os.path.join(TOY, "mask_rcnn_r18_fpn.yaml"), os.path.join(TOY, "mask_rcnn_r18_fpn_sgr.yaml")
TOY_C4, TOY_C4_SGR = os.path.join(TOY, "mask_rcnn_r18_c4.yaml"), os.path.join(TOY, "mask_rcnn_r18_c4_sgr.yaml")
CPU = ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"]
# SGR after res4 of the segmentation model (what a C4 transfer needs); build_sgr_backbone reads
# the stage's width from the ResNet's outputs, so res4 must be one of them
SGR_RES4 = ["MODEL.SGR.IN_FEATURE", "res4", "MODEL.RESNETS.OUT_FEATURES", '["res4", "res5"]']

pytestmark = pytest.mark.usefixtures("one_thread")  # training, and building R-101 models


def _export_module():
    spec = importlib.util.spec_from_file_location("export_backbone", os.path.join(REPO, "tools", "export_backbone.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


eb = _export_module()


# ----------------------------------------------------------------------------------- GloRe
def test_glore_unit_keeps_the_shape_and_builds_a_graph_of_the_configured_size():
    unit = GloReUnit(32, num_state=16, num_nodes=8)
    x = torch.randn(2, 32, 5, 7)
    assert unit(x).shape == x.shape
    # the projection gives N = 8 node maps, the reduction C' = 16 channels, the graph is N x N
    assert unit.project.out_channels == 8 and unit.reduce.out_channels == 16
    assert tuple(unit.adjacency.weight.shape) == (8, 8, 1)
    assert tuple(unit.state_conv.weight.shape) == (16, 16, 1)
    with pytest.raises(ValueError, match=r"\(B, 32, H, W\)"):
        unit(torch.randn(2, 16, 5, 7))


def test_glore_is_a_residual_block_that_starts_as_the_identity():
    torch.manual_seed(0)
    unit = GloReUnit(32, num_state=16, num_nodes=8)
    x = torch.randn(2, 32, 6, 6)
    for mode in (True, False):
        unit.train(mode)
        assert torch.equal(unit(x), x), "zero-initialised output norm: y = x + 0"
    # the branch is live once the norm's weight is not zero: y - x is exactly that branch
    with torch.no_grad():
        unit.out_norm.weight.fill_(1.0)
    unit.eval()
    y = unit(x)
    assert not torch.allclose(y, x) and torch.isfinite(y).all()
    # ... and the block is x + branch(x): zeroing the last conv alone gives the identity again
    with torch.no_grad():
        unit.out_conv.weight.zero_()
        unit.out_norm.running_mean.zero_()
    assert torch.equal(unit(x), x + unit.out_norm.bias.view(1, -1, 1, 1))


def test_glore_parameter_count_follows_the_formula():
    # Hand-derived for D = 32 input channels, C' = 16 state channels, N = 8 nodes, BN:
    #   reduce 1x1 conv D->C' with bias   32*16 + 16 = 528
    #   project 1x1 conv D->N with bias   32*8 + 8   = 264
    #   adjacency Conv1d N->N with bias   8*8 + 8    =  72
    #   state Conv1d C'->C', no bias      16*16      = 256
    #   output 1x1 conv C'->D, no bias    16*32      = 512
    #   BatchNorm weight + bias           2*32       =  64
    #                                            total 1696
    unit = GloReUnit(32, num_state=16, num_nodes=8)
    assert sum(p.numel() for p in unit.parameters()) == 1696
    # the defaults on ResNet-101's res5 (D = 2048, C' = 256, N = 128):
    #   524,544 + 262,272 + 16,512 + 65,536 + 524,288 + 4,096 = 1,397,248
    big = GloReUnit(2048)
    assert sum(p.numel() for p in big.parameters()) == 1_397_248


def _glore_cfg(*opts):
    return tiny_toy_cfg(TOY_BASE, "MODEL.BACKBONE.NAME", "build_glore_backbone",
                        "MODEL.GLORE.NUM_STATE", "16", "MODEL.GLORE.NUM_NODES", "8", *opts)


def test_glore_backbone_wraps_the_stage_and_starts_unchanged():
    cfg = _glore_cfg("MODEL.GLORE.IN_FEATURE", "res4", "MODEL.RESNETS.OUT_FEATURES", '["res4", "res5"]')
    torch.manual_seed(0)
    wrapped = BACKBONE_REGISTRY.get("build_glore_backbone")(cfg, ShapeSpec(channels=3))
    assert isinstance(wrapped, GloReBackbone) and wrapped.glore.in_channels == 128  # half-width res4
    plain = BACKBONE_REGISTRY.get("build_dilated_resnet_backbone")(cfg, ShapeSpec(channels=3))
    plain.load_state_dict(wrapped.backbone.state_dict())
    keys = {k.split(".")[0] for k in wrapped.state_dict()}
    assert keys == {"backbone", "glore"}
    wrapped.eval(), plain.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = wrapped(x), plain(x)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        wrapped.glore.out_norm.weight.fill_(1.0)
        c = wrapped(x)
    # the unit sits after res4: res4 and the res5 computed from it change
    assert not torch.allclose(c["res4"], b["res4"]) and not torch.allclose(c["res5"], b["res5"])


def test_glore_backbone_runs_under_a_segmentation_head_without_sgr_losses():
    cfg = _glore_cfg()
    model = build_model(cfg)
    assert model.sgr_criterion is None  # GloRe has no loss of its own
    batch = [{"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8),
              "sem_seg": torch.randint(0, 6, (64, 64))} for _ in range(2)]
    losses = model(batch)
    assert set(losses) == {"loss_sem_seg"}


def test_glore_bad_stage_is_a_clear_error():
    with pytest.raises(ValueError, match="MODEL.GLORE.IN_FEATURE is 'res9'"):
        build_model(_glore_cfg("MODEL.GLORE.IN_FEATURE", "res9"))


# ------------------------------------------------------------------- export_backbone.py
def _save_seg(path, config, *opts, extra=None):
    """An (untrained) segmentation checkpoint of `config` in train_net.py's format."""
    torch.manual_seed(1)
    model = build_model(tiny_toy_cfg(config, *opts))
    data = {"model": model.state_dict(), "iteration": 3, "optimizer": {"state": {}, "param_groups": []}}
    data.update(extra or {})
    torch.save(data, path)
    return model.state_dict()


def test_export_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    ck = tmp_path / "plain.pth"
    _save_seg(ck, TOY_BASE)  # no SGR
    with pytest.raises(eb.ExportError, match=r"does not fit the segmentation config") as e:
        eb.export_backbone(tiny_toy_cfg(TOY_SGR), str(ck), "fpn")
    msg = str(e.value)
    # the config's model has backbone.backbone.* and backbone.sgr.*; the checkpoint has backbone.*
    assert "not in the checkpoint: backbone.backbone.res2.* (24)" in msg and "backbone.sgr.* (42)" in msg
    assert "not in the config's model: backbone.res2.* (24)" in msg
    assert "the config has a SGR component but the checkpoint has none" in msg
    # the same from the command line: exit status 2, the reason on stderr, no file written
    out = tmp_path / "x.pth"
    rc = eb.main(["--config-file", TOY_SGR, "--weights", str(ck), "--output", str(out)])
    assert rc == 2 and not out.exists()
    assert f"does not fit --config-file {TOY_SGR}" in capsys.readouterr().err


def test_export_refuses_shapes_and_components_that_differ(tmp_path):
    ck = tmp_path / "sgr64.pth"
    _save_seg(ck, TOY_SGR, "MODEL.SGR.TOKEN_DIM", "64")
    with pytest.raises(eb.ExportError, match=r"shape \(64,.*in the checkpoint, \(128,.*in the config's model"):
        eb.export_backbone(tiny_toy_cfg(TOY_SGR), str(ck))
    with pytest.raises(eb.ExportError, match=r"has a SGR component \(backbone\.sgr\.\*\) but the config builds none"):
        eb.export_backbone(tiny_toy_cfg(TOY_BASE), str(ck))
    torch.save({"model": {"sem_seg_head.predictor.weight": torch.zeros(1)}}, tmp_path / "head.pth")
    with pytest.raises(eb.ExportError, match="no 'backbone.\\*' tensors"):
        eb.export_backbone(tiny_toy_cfg(TOY_SGR), str(tmp_path / "head.pth"))
    with pytest.raises(FileNotFoundError, match="--weights file .*missing.pth does not exist"):
        eb.export_backbone(tiny_toy_cfg(TOY_SGR), str(tmp_path / "missing.pth"))


def test_export_refuses_c4_for_sgr_after_res5(tmp_path):
    ck = tmp_path / "sgr.pth"
    _save_seg(ck, TOY_SGR)
    with pytest.raises(eb.ExportError, match=r"--target c4: .*SGR after res5.*MODEL.SGR.IN_FEATURE res4"):
        eb.export_backbone(tiny_toy_cfg(TOY_SGR), str(ck), "c4")
    with pytest.raises(eb.ExportError, match="--target fpn, but .* is a C4 model"):
        eb.export_backbone(tiny_toy_cfg(TOY_SGR), str(ck), "fpn", det_cfg=load_config(TOY_C4_SGR))


def _fpn_key(k):  # the expected renaming, written out independently of the tool
    return "backbone.backbone.bottom_up." + k[len("backbone.backbone."):] if k.startswith("backbone.backbone.") else k


def test_export_fpn_renames_keeps_and_drops_as_documented(tmp_path, capsys):
    ck, out = tmp_path / "sgr.pth", tmp_path / "fpn.pth"
    seg = _save_seg(ck, TOY_SGR)
    rc = eb.main(["--config-file", TOY_SGR, "--weights", str(ck), "--output", str(out), "--det-config", TOY_FPN_SGR])
    assert rc == 0
    report = capsys.readouterr().out
    assert "dropped" in report and "sem_seg_head.*" in report and "backbone.sgr.classifier.*" in report
    assert "iteration, optimizer  (training state)" in report
    data = torch.load(out, weights_only=True)
    assert set(data) == {"model", "__author__"} and data["__author__"] == "sgr_d2 export_backbone"
    kept = [k for k in seg if k.startswith("backbone.") and not k.startswith("backbone.sgr.classifier.")]
    assert sorted(data["model"]) == sorted(_fpn_key(k) for k in kept)
    assert all(torch.equal(data["model"][_fpn_key(k)], seg[k]) for k in kept)

    det = build_model(load_config(TOY_FPN_SGR, CPU))
    incompatible = load_reporting_incompatible(det, out)
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    missing_backbone = [k for k in incompatible.missing_keys if k.startswith("backbone.")]
    assert missing_backbone and all(".fpn_lateral" in k or ".fpn_output" in k for k in missing_backbone)
    state = det.state_dict()
    assert all(torch.equal(state[_fpn_key(k)], seg[k]) for k in kept)


def test_export_c4_puts_stem_to_res4_in_the_backbone_and_drops_a_basic_res5(tmp_path, capsys):
    ck, out = tmp_path / "sgr4.pth", tmp_path / "c4.pth"
    seg = _save_seg(ck, TOY_SGR, *SGR_RES4)
    rc = eb.main(["--config-file", TOY_SGR, "--weights", str(ck), "--output", str(out),
                  "--det-config", TOY_C4_SGR, *SGR_RES4])
    assert rc == 0
    assert "does not fit Res5ROIHeads" in capsys.readouterr().out
    data = torch.load(out, weights_only=True)["model"]
    kept = [k for k in seg if k.startswith("backbone.") and not k.startswith("backbone.sgr.classifier.")
            and not k.startswith("backbone.backbone.res5.")]
    assert sorted(data) == sorted(kept)  # C4 with SGR keeps the segmentation names
    det = build_model(load_config(TOY_C4_SGR, CPU))
    DetectionCheckpointer(det).load(str(out))
    state = det.state_dict()
    assert {k for k in state if k.startswith("backbone.")} == set(kept)
    assert all(torch.equal(state[k], seg[k]) for k in kept)


def test_export_c4_moves_a_bottleneck_res5_into_the_roi_head(tmp_path):
    # ResNet-50 layout at a tiny width: res5 has 3 bottleneck blocks, like Res5ROIHeads' res5
    opts = ["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.WIDTH_PER_GROUP", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32"]
    ck = tmp_path / "r50.pth"
    seg = _save_seg(ck, TOY_BASE, *opts)
    det_cfg = load_config(TOY_C4, CPU + opts)
    out, rows, target = eb.export_backbone(tiny_toy_cfg(TOY_BASE, *opts), str(ck), det_cfg=det_cfg)
    assert target == "c4"
    res5 = [k for k in seg if k.startswith("backbone.res5.")]
    assert res5 and all(torch.equal(out["roi_heads." + k[len("backbone."):]], seg[k]) for k in res5)
    det = build_model(det_cfg)
    incompatible = DetectionCheckpointer(det)._load_model({"model": dict(out)})
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    assert not [k for k in incompatible.missing_keys if k.startswith(("backbone.", "roi_heads.res5."))]


def test_export_drops_num_batches_tracked_for_frozen_bn(tmp_path):
    ck = tmp_path / "plain.pth"
    seg = _save_seg(ck, TOY_BASE)
    det_cfg = load_config(TOY_FPN, CPU + ["MODEL.RESNETS.NORM", "FrozenBN"])
    out, rows, _ = eb.export_backbone(tiny_toy_cfg(TOY_BASE), str(ck), det_cfg=det_cfg)
    assert not any(k.endswith("num_batches_tracked") for k in out)
    assert any(r[0] == "dropped" and "num_batches_tracked" in r[1] for r in rows)
    det = build_model(det_cfg)
    incompatible = DetectionCheckpointer(det)._load_model({"model": dict(out)})
    assert not incompatible.unexpected_keys
    state = det.state_dict()
    for k, v in seg.items():  # FrozenBN keeps weight, bias, running mean and variance
        if k.startswith("backbone.") and not k.endswith("num_batches_tracked"):
            assert torch.equal(state["backbone.bottom_up." + k[len("backbone."):]], v), k


# ------------------------------------------------------------------ toy instance dataset
def test_toy_instances_match_the_instance_pngs():
    import cv2

    dicts = DatasetCatalog.get("sgr_toy_instances_val")
    meta = MetadataCatalog.get("sgr_toy_instances_val")
    assert len(dicts) == 40 and meta.thing_classes == ["ball", "box", "kite"] and meta.evaluator_type == "coco"
    assert os.path.isfile(meta.json_file)
    sem_root = os.path.join(os.path.dirname(os.path.dirname(meta.image_root)), "annotations", "val")
    inst_root = os.path.join(os.path.dirname(os.path.dirname(meta.image_root)), "instances", "val")
    for d in dicts[:5]:
        stem = os.path.splitext(os.path.basename(d["file_name"]))[0]
        sem = cv2.imread(os.path.join(sem_root, stem + ".png"), cv2.IMREAD_UNCHANGED)
        inst = cv2.imread(os.path.join(inst_root, stem + ".png"), cv2.IMREAD_UNCHANGED)
        masks = [mask_util.decode(a["segmentation"]).astype(bool) for a in d["annotations"]]
        assert len(masks) == len(np.unique(inst[inst > 0]))  # one annotation per visible object
        union = np.zeros_like(inst, dtype=int)
        for a, m in zip(d["annotations"], masks):
            union += m
            # category (contiguous 0..2) = semantic class of every pixel - 3 (ball, box, kite)
            assert np.all(sem[m] == a["category_id"] + 3)
            ys, xs = np.nonzero(m)
            x, y, w, h = a["bbox"]
            assert a["bbox_mode"] == BoxMode.XYWH_ABS
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert np.array_equal(union, (inst > 0).astype(int))  # disjoint and covering every object


def _mini(name, source, n):
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: DatasetCatalog.get(source)[:n])
        src = MetadataCatalog.get(source)
        MetadataCatalog.get(name).set(thing_classes=src.thing_classes, evaluator_type="coco",
                                      thing_dataset_id_to_contiguous_id=src.thing_dataset_id_to_contiguous_id)
    return name


def test_coco_evaluation_of_the_ground_truth_is_perfect(tmp_path):
    """The detection evaluator (built by the Trainer) gives AP 100 to the ground truth itself."""
    name = _mini("sgr_toy_instances_val_gt4", "sgr_toy_instances_val", 4)
    cfg = load_config(TOY_FPN, CPU + ["OUTPUT_DIR", str(tmp_path)])
    evaluator = Trainer.build_evaluator(cfg, name)
    # (without detectron2's C++ ops, the evaluation below runs only if the Trainer chose the
    # Python COCOeval: the fast one would raise)
    assert isinstance(evaluator, COCOEvaluator)
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        inst = Instances((d["height"], d["width"]))
        anns = d["annotations"]
        inst.pred_boxes = Boxes(torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                                              for a in anns], dtype=torch.float32))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns])
        inst.scores = torch.ones(len(anns))
        inst.pred_masks = torch.from_numpy(np.stack([mask_util.decode(a["segmentation"]) for a in anns]).astype(bool))
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    res = evaluator.evaluate()
    assert res["bbox"]["AP"] == pytest.approx(100.0) and res["segm"]["AP"] == pytest.approx(100.0)


def test_trainer_picks_the_task_from_the_meta_architecture(tmp_path):
    det = load_config(TOY_FPN, CPU + ["OUTPUT_DIR", str(tmp_path)])
    seg = load_config(TOY_BASE, CPU + ["OUTPUT_DIR", str(tmp_path)])
    from sgr_d2.config import is_detection

    assert is_detection(det) and not is_detection(seg)
    assert isinstance(Trainer.build_evaluator(seg, "sgr_toy_sem_seg_val"), SemSegEvaluator)
    # detectron2's DatasetMapper: instances with boxes and bit masks, none of the SGR targets
    train = _mini("sgr_toy_instances_val_gt4", "sgr_toy_instances_val", 4)
    loader = Trainer.build_train_loader(load_config(TOY_FPN, CPU + ["SOLVER.IMS_PER_BATCH", "2",
                                                                    "DATASETS.TRAIN", f"('{train}',)"]))
    batch = next(iter(loader))
    assert len(batch) == 2 and all("instances" in b and "sem_seg" not in b and "components" not in b for b in batch)
    inst = batch[0]["instances"]
    assert inst.gt_masks.tensor.dtype == torch.bool and len(inst) == len(inst.gt_classes) > 0
    assert inst.gt_masks.tensor.shape[-2:] == batch[0]["image"].shape[-2:]
    assert set(inst.gt_classes.tolist()) <= {0, 1, 2}


# ---------------------------------------------------------------------- COCO configs
COCO_CONFIGS = [f"mask_rcnn_r101_{layout}{suffix}.yaml" for layout in ("c4", "fpn") for suffix in ("", "_sgr", "_glore")]


@pytest.mark.parametrize("name", COCO_CONFIGS)
def test_coco_mask_rcnn_configs_follow_the_recipe(name):
    cfg = load_config(os.path.join(COCO, name))
    s, m = cfg.SOLVER, cfg.MODEL
    assert m.META_ARCHITECTURE == "GeneralizedRCNN" and m.MASK_ON and m.RESNETS.DEPTH == 101
    assert s.IMS_PER_BATCH == 8 and s.BASE_LR == 0.02 and s.MOMENTUM == 0.9 and s.WEIGHT_DECAY == 1e-4
    assert s.MAX_ITER == 270000 and tuple(s.STEPS) == (210000, 250000) and s.GAMMA == 0.1
    assert s.LR_SCHEDULER_NAME == "WarmupMultiStepLR" and s.OPTIMIZER == "SGD"
    assert m.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 512 and m.ROI_HEADS.POSITIVE_FRACTION == 0.25
    assert m.ROI_HEADS.NUM_CLASSES == 80
    assert tuple(cfg.DATASETS.TRAIN) == ("coco_2017_train",) and tuple(cfg.DATASETS.TEST) == ("coco_2017_val",)
    sizes, ratios = m.ANCHOR_GENERATOR.SIZES, m.ANCHOR_GENERATOR.ASPECT_RATIOS
    assert [list(r) for r in ratios] == [[0.5, 1.0, 2.0]]
    if "_fpn" in name:
        assert [list(x) for x in sizes] == [[32], [64], [128], [256], [512]]
        assert m.ROI_HEADS.NAME == "StandardROIHeads"
    else:
        assert [list(x) for x in sizes] == [[32, 64, 128, 256, 512]] and m.ROI_HEADS.NAME == "Res5ROIHeads"
    assert m.WEIGHTS.startswith("exported/") and m.WEIGHTS.endswith(".pth")
    assert m.RESNETS.RES5_DILATION == 1 and not m.RESNETS.STRIDE_IN_1X1 and cfg.INPUT.FORMAT == "RGB"
    if name.endswith("_sgr.yaml"):
        assert m.BACKBONE.NAME == "build_sgr_backbone" and m.SGR.CLASS_WEIGHT == 0
        assert m.SGR.IN_FEATURE == ("res5" if "_fpn" in name else "res4")
    elif name.endswith("_glore.yaml"):
        assert m.BACKBONE.NAME == "build_glore_backbone"
        assert m.GLORE.IN_FEATURE == ("res5" if "_fpn" in name else "res4")


# ---------------------------------------------------------------------- slow, end to end
def _train_seg(out, *opts):
    cfg = load_config(TOY_SGR, CPU + ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
                                      "SOLVER.CHECKPOINT_PERIOD", "1000", "DATASETS.TEST", "()",
                                      "OUTPUT_DIR", str(out), *opts])
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    ck = out / "model_final.pth"
    assert ck.is_file()
    return ck, torch.load(ck, weights_only=True)["model"]


def _check_ap(res):
    for task in ("bbox", "segm"):
        assert task in res, res.keys()
        for key in ("AP", "AP50", "AP75", "AP-ball", "AP-box", "AP-kite"):
            assert key in res[task]
            v = res[task][key]
            assert math.isnan(v) or 0.0 <= v <= 100.0, (task, key, v)
        assert not math.isnan(res[task]["AP"])


@pytest.mark.slow
def test_segmentation_backbone_transfers_to_mask_rcnn_c4_and_fpn(tmp_path):
    # every random draw seeded here: after 2 Mask R-CNN iterations whether a detection clears the
    # score threshold depends on the initialisation, which must not depend on the tests run before
    seed_all_rng(0)
    ck5, seg5 = _train_seg(tmp_path / "seg_res5")  # the toy config: SGR after res5
    ck4, seg4 = _train_seg(tmp_path / "seg_res4", *SGR_RES4)

    fpn, c4 = tmp_path / "fpn.pth", tmp_path / "c4.pth"
    assert eb.main(["--config-file", TOY_SGR, "--weights", str(ck5), "--output", str(fpn), "--target", "fpn"]) == 0
    assert eb.main(["--config-file", TOY_SGR, "--weights", str(ck5), "--output", str(c4), "--target", "c4"]) == 2
    assert eb.main(["--config-file", TOY_SGR, "--weights", str(ck4), "--output", str(c4), "--target", "c4",
                    *SGR_RES4]) == 0
    val = _mini("sgr_toy_instances_val_mini3", "sgr_toy_instances_val", 3)

    cases = [
        (TOY_FPN_SGR, fpn, seg5, lambda k: _fpn_key(k), lambda k: ".fpn_" in k),
        (TOY_C4_SGR, c4, seg4, lambda k: None if k.startswith("backbone.backbone.res5.") else k, lambda k: False),
    ]
    for config, weights, seg, rename, fpn_own in cases:
        out = tmp_path / os.path.basename(config)[:-5]
        cfg = load_config(config, CPU + ["MODEL.WEIGHTS", str(weights), "SOLVER.IMS_PER_BATCH", "2",
                                         "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "0",
                                         "SOLVER.CHECKPOINT_PERIOD", "1000", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
                                         "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "TEST.DETECTIONS_PER_IMAGE", "10",
                                         "DATASETS.TEST", "()", "OUTPUT_DIR", str(out)])
        cfg.freeze()
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        state = trainer.model.state_dict()
        mapped = {}
        for k, v in seg.items():
            if k.startswith("backbone.") and not k.startswith("backbone.sgr.classifier."):
                new = rename(k)
                if new is not None:
                    mapped[new] = k
                    assert torch.equal(state[new], v), f"{config}: {new} differs from the segmentation {k}"
        # no backbone tensor of Mask R-CNN is left at its initialisation (the FPN's own convs aside)
        left = [k for k in state if k.startswith("backbone.") and k not in mapped and not fpn_own(k)]
        assert not left, left[:5]
        assert not any(k.startswith("backbone.sgr.classifier") for k in state)

        before = {k: state[k].clone() for k in ("backbone.sgr.out_conv.weight", "backbone.sgr.region_conv.weight")}
        trainer.train()  # a few Mask R-CNN iterations: SGR is trained with it
        after = trainer.model.state_dict()
        assert all(not torch.equal(after[k], v) for k, v in before.items())
        eval_cfg = cfg.clone()
        eval_cfg.defrost()
        eval_cfg.DATASETS.TEST = (val,)
        eval_cfg.freeze()
        res = Trainer.test(eval_cfg, trainer.model)
        _check_ap(res)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fpn", "c4"])
def test_coco_stuff_segmentation_exports_fit_the_coco_mask_rcnn_configs(tmp_path, layout):
    """The R-101 segmentation configs' checkpoints export into every COCO config. The fit is one of
    tensor names and shapes, so the models here (the checkpoint's and export_backbone's two,
    segmentation and detection) are neither trained nor initialised (conftest.cheap_init)."""
    seg_dir = os.path.join(REPO, "configs", "coco_stuff_10k")
    in_feature = "res5" if layout == "fpn" else "res4"
    cases = [
        ("dil_fcn_r101.yaml", [], f"mask_rcnn_r101_{layout}.yaml"),
        ("dil_fcn_r101_sgr.yaml", ["MODEL.SGR.IN_FEATURE", in_feature, "MODEL.RESNETS.OUT_FEATURES", '["res4", "res5"]'],
         f"mask_rcnn_r101_{layout}_sgr.yaml"),
        ("dil_fcn_r101.yaml", ["MODEL.BACKBONE.NAME", "build_glore_backbone", "MODEL.GLORE.IN_FEATURE", in_feature],
         f"mask_rcnn_r101_{layout}_glore.yaml"),
    ]
    for seg_name, opts, det_name in cases:
        seg_cfg = load_config(os.path.join(seg_dir, seg_name), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts])
        ck = tmp_path / "seg.pth"
        det_cfg = load_config(os.path.join(COCO, det_name))
        with cheap_init(values=False):
            torch.save({"model": build_model(seg_cfg).state_dict()}, ck)
            out, rows, target = eb.export_backbone(seg_cfg, str(ck), det_cfg=det_cfg)  # raises if it does not fit
        assert target == layout
        if layout == "c4":
            assert any(k.startswith("roi_heads.res5.") for k in out)
