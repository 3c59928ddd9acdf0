"""Swin and dilated ResNet backbones, the DeepLabV3 and UperNet heads, weight conversion,
optimiser groups, SyncBN conversion and the FLOPs counter."""
from __future__ import annotations

import copy
import math
import os
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sgr_d2  # noqa: F401  (before detectron2)
from conftest import load_reporting_incompatible
from detectron2.layers import NaiveSyncBatchNorm, ShapeSpec
from detectron2.modeling import build_backbone, build_model, build_sem_seg_head

from sgr_d2.engine import build_optimizer
from sgr_d2.config import load_config
from sgr_d2.config import sync_norms
from sgr_d2.modeling.backbone.swin import SwinBackbone
from sgr_d2.modeling.heads import DeepLabV3Head, UperNetHead
from sgr_d2.modeling.backbone.sgr_backbone import SGR_OUTPUTS, SGRBackbone, sgr_module_from_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_pretrained  # noqa: E402
import flops as flops_tool  # noqa: E402

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

SMALL_SGR = ["MODEL.SGR.NUM_TOKENS", "16", "MODEL.SGR.NUM_MATCHED", "8", "MODEL.SGR.TOKEN_DIM", "32",
             "MODEL.SGR.NUM_HEADS", "4", "MODEL.SGR.FFN_DIM", "32"]
CPU = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]


def cfg_of(rel, *opts):
    return load_config(os.path.join(REPO, "configs", rel), CPU + list(opts))


def close(a, b, tol=1e-4):
    scale = max(a.abs().max().item(), b.abs().max().item(), 1.0)
    return a.shape == b.shape and (a - b).abs().max().item() <= tol * scale


# --------------------------------------------------------------------------- fixtures (built once)


@pytest.fixture(scope="module")
def swin_upernet_sgr():
    """The Swin-T + UperNet + SGR model of configs/coco_stuff_10k (SGR and head narrowed: the full
    model is built by tests/test_configs.py)."""
    cfg = cfg_of("coco_stuff_10k/upernet_swin_t_sgr.yaml", *SMALL_SGR, "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32")
    torch.manual_seed(0)
    return cfg, build_model(cfg)


@pytest.fixture(scope="module")
def r50_dilfcn_sgr():
    """The Dilated-FCN + dilated ResNet-50 (OS 8) + SGR model of configs/coco_stuff_10k (SGR and
    head narrowed)."""
    cfg = cfg_of("coco_stuff_10k/dil_fcn_r50_sgr.yaml", *SMALL_SGR, "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32")
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def randomize_norms(model: nn.Module, seed: int = 0):
    """Non-trivial affine parameters and running statistics, so that converted norms matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def load_converted(model: nn.Module, pkl: str):
    """Load a converted file as MODEL.WEIGHTS would; returns the incompatible keys."""
    return load_reporting_incompatible(model, pkl)


# --------------------------------------------------------------------------- Swin backbone


def test_swin_outputs_strides_and_stage_modules(swin_upernet_sgr):
    wrapped = swin_upernet_sgr[1].backbone.eval()
    assert isinstance(wrapped, SGRBackbone) and isinstance(wrapped.backbone, SwinBackbone)
    assert wrapped.sgr.in_channels == 768
    assert wrapped.output_shape() == wrapped.backbone.output_shape() and wrapped.size_divisibility == 32
    backbone = wrapped.backbone
    assert backbone.size_divisibility == 32
    shapes = backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "res2": (96, 4), "res3": (192, 8), "res4": (384, 16), "res5": (768, 32)}
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = backbone(x)
    for name, spec in shapes.items():
        assert tuple(feats[name].shape) == (1, spec.channels, 64 // spec.stride, 96 // spec.stride)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        backbone(torch.randn(1, 3, 62, 64))


def test_swin_config_errors():
    with pytest.raises(ValueError, match="MODEL.SWIN.OUT_FEATURES"):
        build_backbone(cfg_of("ade20k/upernet_swin_t.yaml", "MODEL.SWIN.OUT_FEATURES", "['res6']"))
    with pytest.raises(ValueError, match=r"MODEL.SWIN.NUM_HEADS\[0\]"):
        SwinBackbone(embed_dim=32, num_heads=(5, 6, 12, 24))


def test_sgr_after_swin_res5_adds_only_its_residual():
    torch.manual_seed(0)
    inner = SwinBackbone(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        base = inner(x)
    cfg = cfg_of("ade20k/upernet_swin_t_sgr.yaml", *SMALL_SGR)
    sgr = sgr_module_from_config(cfg, 256, num_classes=None).eval()
    wrapped = SGRBackbone(inner, "res5", sgr).eval()
    with torch.no_grad():
        same = wrapped(x)
    assert tuple(same.pop(SGR_OUTPUTS)["region_maps"].shape) == (2, 16, 2, 2)
    assert same.keys() == base.keys()
    for name in base:  # zero-initialised last norm: identical output at initialisation
        assert torch.equal(same[name], base[name]), name
    with torch.no_grad():
        sgr.out_norm.weight.normal_()
        sgr.out_norm.bias.normal_()
        out = wrapped(x)
        expected_res5 = sgr(base["res5"])[0]
    for name in ("res2", "res3", "res4"):
        assert torch.equal(out[name], base[name]), name
    assert not torch.allclose(out["res5"], base["res5"])
    assert close(out["res5"], expected_res5, 1e-5)


# --------------------------------------------------------------------------- dilated ResNet


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_dilated_resnet_output_strides(output_stride):
    """On the toy's narrow ResNet-18 (the ResNet-50 at OS 8 is checked against torchvision below)."""
    cfg = cfg_of("toy/dil_fcn_r18.yaml", "MODEL.RESNETS.OUTPUT_STRIDE", str(output_stride),
                 "MODEL.RESNETS.MULTI_GRID", "[1, 2, 4]",
                 "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']")
    backbone = build_backbone(cfg).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 64))
    expected = {"res2": 4, "res3": 8, "res4": min(16, output_stride), "res5": output_stride}
    for name, stride in expected.items():
        assert feats[name].shape[-2:] == (64 // stride, 64 // stride), name
        assert backbone.output_shape()[name].stride == stride, name
    res5_dilation = {8: 4, 16: 2, 32: 1}[output_stride]
    grid = [1, 2] if output_stride < 32 else [1, 1]  # ResNet-18's res5 has 2 blocks
    assert [b.conv2.dilation[0] for b in backbone.res5] == [res5_dilation * g for g in grid]


# --------------------------------------------------------------------------- heads


def test_deeplabv3_head_from_config_and_shapes():
    cfg = cfg_of("ade20k/deeplabv3_r101.yaml", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16")
    head = build_sem_seg_head(cfg, {"res5": ShapeSpec(channels=64, stride=8)})
    assert isinstance(head, DeepLabV3Head)
    assert [b.dilation[0] for b in head.aspp.branches] == [1, 12, 24, 36]
    assert [b.kernel_size[0] for b in head.aspp.branches] == [1, 3, 3, 3]
    feats = {"res5": torch.randn(2, 64, 8, 8)}
    head.eval()
    with torch.no_grad():
        logits, losses = head(feats)
    assert tuple(logits.shape) == (2, 150, 64, 64) and losses == {}
    head.train()
    targets = torch.randint(0, 150, (2, 64, 64))
    targets[:, :, :4] = 255
    _, losses = head(feats, targets)
    # a near-zero classifier at initialisation: cross-entropy ~ log(num_classes)
    assert losses["loss_sem_seg"].item() == pytest.approx(math.log(150), abs=0.02)
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.IN_FEATURE"):
        build_sem_seg_head(cfg, {"res4": ShapeSpec(channels=64, stride=8)})


def test_aspp_rate_beyond_feature_size_is_a_1x1_conv():
    """On an 8×8 map every off-centre tap of a rate-12 3×3 conv reads padding, so the branch
    equals the 1×1 conv made of the kernels' centres (checks padding = dilation = rate)."""
    torch.manual_seed(0)
    head = DeepLabV3Head(input_shape={"res5": ShapeSpec(channels=8, stride=8)}, in_feature="res5",
                         num_classes=3, conv_dims=4, dilations=[12, 24, 36], aspp_dropout=0.0,
                         dropout=0.0, norm="BN").eval()
    x = torch.randn(2, 8, 8, 8)
    for branch in head.aspp.branches[1:]:
        expected = F.relu(branch.norm(F.conv2d(x, branch.weight[:, :, 1:2, 1:2], branch.bias)))
        assert close(branch(x), expected, 1e-6)


def test_upernet_head_shapes_and_uses_every_level():
    cfg = cfg_of("ade20k/upernet_swin_t.yaml", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16")
    shapes = {f"res{i + 2}": ShapeSpec(channels=8 * 2**i, stride=4 * 2**i) for i in range(4)}
    head = build_sem_seg_head(cfg, shapes)
    assert isinstance(head, UperNetHead) and head.ppm.scales == [1, 2, 3, 6]
    feats = {k: torch.randn(2, s.channels, 64 // s.stride, 64 // s.stride, requires_grad=True)
             for k, s in shapes.items()}
    head.eval()
    logits, _ = head(feats)
    assert tuple(logits.shape) == (2, 150, 64, 64)
    logits.sum().backward()
    for k, f in feats.items():  # the fused prediction depends on every input level
        assert f.grad is not None and f.grad.abs().sum() > 0, k
    head.train()
    _, losses = head({k: v.detach() for k, v in feats.items()}, torch.randint(0, 150, (2, 64, 64)))
    assert losses["loss_sem_seg"].item() == pytest.approx(math.log(150), abs=0.02)
    with pytest.raises(ValueError, match="fine to coarse"):
        UperNetHead(input_shape=shapes, in_features=["res5", "res2"], num_classes=3, conv_dims=4,
                    pool_scales=[1], dropout=0.0, norm="BN")


# --------------------------------------------------------------------------- weight conversion


def torchvision_features(tv, x):
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    out = {}
    for i, layer in enumerate((tv.layer1, tv.layer2, tv.layer3, tv.layer4)):
        x = layer(x)
        out[f"res{i + 2}"] = x
    return out


def dilate_torchvision_os8(tv, grid=(1, 2, 4)):
    """torchvision's ResNet rewritten by hand to output stride 8: layer3 dilation 2, layer4
    dilation 4 × multi-grid, no stride in either (the reference for the dilated backbone)."""
    tv = copy.deepcopy(tv)
    for layer, dilations in ((tv.layer3, [2] * len(tv.layer3)),
                             (tv.layer4, [4 * grid[i % len(grid)] for i in range(len(tv.layer4))])):
        for block, d in zip(layer, dilations):
            block.conv2.stride, block.conv2.dilation, block.conv2.padding = (1, 1), (d, d), (d, d)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
    return tv


@pytest.fixture(scope="module")
def resnet50_pkl(module_tmp):
    d = module_tmp
    torch.manual_seed(1)
    tv = randomize_norms(torchvision.models.resnet50()).eval()
    torch.save(tv.state_dict(), d / "resnet50.pth")
    assert convert_pretrained.main(["--input", str(d / "resnet50.pth"), "--output", str(d / "R-50.pkl")]) == 0
    return tv, str(d / "R-50.pkl")


def test_convert_resnet50_into_dilated_os8_sgr_model(resnet50_pkl, r50_dilfcn_sgr):
    tv, pkl = resnet50_pkl
    cfg, model = r50_dilfcn_sgr
    incompatible = load_converted(model, pkl)
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    missing = [k for k in incompatible.missing_keys if k.startswith("backbone.") and ".sgr." not in k
               and not k.startswith("backbone.sgr.")]
    assert missing == []
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.backbone(x)["res5"]  # SGR's zero-initialised residual adds nothing
        ref = torchvision_features(dilate_torchvision_os8(tv), x)["res5"]
    assert ours.shape[-2:] == (8, 8)
    assert close(ours, ref)
    # multi-grid (1, 2, 4) on res5's dilation 4; res4 dilated by 2
    assert [b.conv2.dilation[0] for b in model.backbone.backbone.res5] == [4, 8, 16]
    assert all(b.conv2.dilation[0] == 2 for b in model.backbone.backbone.res4)


@pytest.mark.slow
def test_convert_resnet50_into_os32_and_fpn_backbones(resnet50_pkl):
    tv, pkl = resnet50_pkl
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = torchvision_features(tv, x)
    dil = build_backbone(cfg_of("ade20k/dil_fcn_r50.yaml", "MODEL.RESNETS.OUTPUT_STRIDE", "32",
                                "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']"))
    fpn = build_backbone(cfg_of("ade20k/sem_fpn_r50.yaml"))
    for backbone, net in ((dil, dil), (fpn, fpn.bottom_up)):
        incompatible = load_converted(backbone, pkl)
        assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
        assert [k for k in incompatible.missing_keys if not k.startswith("fpn_")] == []
        net.eval()
        with torch.no_grad():
            ours = net(x)
        for name in ("res2", "res3", "res4", "res5"):
            assert close(ours[name], ref[name]), name


def test_convert_resnet18_basic_blocks(tmp_path):
    torch.manual_seed(2)
    tv = randomize_norms(torchvision.models.resnet18()).eval()
    torch.save({"state_dict": tv.state_dict()}, tmp_path / "r18.pth")
    convert_pretrained.convert_file(str(tmp_path / "r18.pth"), str(tmp_path / "R-18.pkl"))
    backbone = build_backbone(cfg_of(
        "toy/dil_fcn_r18.yaml", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.STEM_OUT_CHANNELS", "64",
        "MODEL.RESNETS.OUTPUT_STRIDE", "32", "MODEL.RESNETS.OUT_FEATURES", "['res5']")).eval()
    incompatible = load_converted(backbone, str(tmp_path / "R-18.pkl"))
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert close(backbone(x)["res5"], torchvision_features(tv, x)["res5"])


@pytest.mark.slow
def test_convert_resnet101_into_dilated_os8(tmp_path):
    torch.manual_seed(3)
    tv = randomize_norms(torchvision.models.resnet101()).eval()
    torch.save(tv.state_dict(), tmp_path / "resnet101.pth")
    convert_pretrained.convert_file(str(tmp_path / "resnet101.pth"), str(tmp_path / "R-101.pkl"))
    backbone = build_backbone(cfg_of("coco_stuff_10k/dil_fcn_r101.yaml")).eval()
    incompatible = load_converted(backbone, str(tmp_path / "R-101.pkl"))
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert close(backbone(x)["res5"], torchvision_features(dilate_torchvision_os8(tv), x)["res5"])


@pytest.fixture(scope="module")
def timm_swin_t():
    torch.manual_seed(4)
    net = timm.models.swin_transformer.SwinTransformer(always_partition=True, strict_img_size=False,
                                                       drop_path_rate=0.0)
    randomize_norms(net)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_()  # make the relative position biases matter
    return net.eval()


def test_convert_timm_swin_into_sgr_model(timm_swin_t, swin_upernet_sgr, tmp_path):
    torch.save(timm_swin_t.state_dict(), tmp_path / "swin_t.pth")
    assert convert_pretrained.main(["--input", str(tmp_path / "swin_t.pth"),
                                    "--output", str(tmp_path / "swin_t.pkl")]) == 0
    cfg, model = swin_upernet_sgr
    incompatible = load_converted(model, str(tmp_path / "swin_t.pkl"))
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    assert [k for k in incompatible.missing_keys if k.startswith("backbone.backbone.")] == []
    model.eval()
    # 224x224: every stage's map (56, 28, 14, 7) is a multiple of the window, where the official
    # pad-then-shift order and timm's shift-then-pad agree
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = model.backbone.backbone(x)
        ref = timm_swin_t.forward_intermediates(x, norm=False, intermediates_only=True)
    for i, name in enumerate(("res2", "res3", "res4", "res5")):
        # the output norms start at LayerNorm's initial values (weight 1, bias 0)
        expected = F.layer_norm(ref[i].permute(0, 2, 3, 1), (ref[i].shape[1],)).permute(0, 3, 1, 2)
        assert close(ours[name], expected), name


def test_swin_windows_pad_before_the_shift_as_the_official_code():
    """On a 16x16 map (window 7, shift 3) the official order pads to 21 and then shifts: row 0 shares
    its window only with rows 1-2 (and masked padding). timm's order shifts the 16 rows first, which
    puts row 0 in a window with rows 10-15."""
    torch.manual_seed(5)
    backbone = SwinBackbone(embed_dim=32, depths=(2, 1, 1, 1), num_heads=(2, 2, 4, 8),
                            drop_path_rate=0.0).eval()
    shifted = backbone.layers[0].blocks[1]
    assert tuple(shifted.shift_size) == (3, 3) and tuple(shifted.window_size) == (7, 7)
    x = torch.randn(1, 16, 16, 32)
    far = x.clone()
    far[:, 3:] += torch.randn(1, 13, 16, 32)  # change rows 3..15
    with torch.no_grad():
        a, b = shifted(x), shifted(far)
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-6)  # row 0 sees rows 0..2 only
    assert not torch.allclose(a[:, 10], b[:, 10], atol=1e-3)
    near = x.clone()
    near[:, 2] += torch.randn(1, 16, 32)
    with torch.no_grad():
        assert not torch.allclose(shifted(near)[:, 0], a[:, 0], atol=1e-3)
    # timm's own order (the same weights) mixes row 0 with the far rows
    timm_block = copy.deepcopy(shifted)
    timm_block.__class__ = timm.models.swin_transformer.SwinTransformerBlock
    with torch.no_grad():
        assert not torch.allclose(timm_block(x)[:, 0], timm_block(far)[:, 0], atol=1e-3)


def test_convert_official_swin_layout_matches_timm_layout(timm_swin_t):
    timm_sd = timm_swin_t.state_dict()
    official = {}
    for k, v in timm_sd.items():  # patch merging belongs to the end of the previous stage
        if k.startswith("layers.") and ".downsample." in k:
            i = int(k.split(".")[1])
            k = f"layers.{i - 1}." + k.split(".", 2)[2]
        official[k.replace("head.fc.", "head.")] = v
    a = convert_pretrained.convert_state_dict(timm_sd)
    b = convert_pretrained.convert_state_dict(official)
    assert sorted(a) == sorted(b)
    assert all((a[k] == b[k]).all() for k in a)


def test_convert_errors(tmp_path, capsys):
    assert convert_pretrained.main(["--input", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "o.pkl")]) == 1
    assert "nope.pth" in capsys.readouterr().err
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="cannot tell the kind"):
        convert_pretrained.convert_file(str(tmp_path / "other.pth"), str(tmp_path / "o.pkl"))
    with pytest.raises(ValueError, match=r"must end with \.pkl"):
        convert_pretrained.convert_file(str(tmp_path / "other.pth"), str(tmp_path / "o.pth"))


# --------------------------------------------------------------------------- optimiser, SyncBN


def _groups_by_name(optimizer):
    return {g["name"]: g for g in optimizer.param_groups}


def test_swin_upernet_optimizer_is_adamw_with_one_lr(swin_upernet_sgr):
    cfg, model = swin_upernet_sgr
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    groups = _groups_by_name(opt)
    assert all(g["lr"] == pytest.approx(6e-5) for g in groups.values())
    assert any(n.startswith("backbone.sgr.") for n in groups)
    norms = {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d))
             for pn, _ in m.named_parameters(recurse=False)}
    assert norms and all(groups[n]["weight_decay"] == 0.0 for n in norms)
    tables = [n for n in groups if n.endswith("relative_position_bias_table")]
    assert len(tables) == 12 and all(groups[n]["weight_decay"] == 0.0 for n in tables)
    assert groups["backbone.backbone.layers.0.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.01
    assert groups["sem_seg_head.predictor.weight"]["weight_decay"] == 0.01


def test_resnet_optimizer_is_sgd_with_x10_for_head_and_sgr(r50_dilfcn_sgr):
    cfg, model = r50_dilfcn_sgr
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    for name, g in _groups_by_name(opt).items():
        head_like = name.startswith(("sem_seg_head.", "backbone.sgr."))
        assert g["lr"] == pytest.approx(0.04 if head_like else 0.004), name
    groups = _groups_by_name(opt)
    assert groups["backbone.backbone.res5.0.conv2.norm.weight"]["weight_decay"] == 0.0
    assert groups["backbone.sgr.out_norm.weight"]["weight_decay"] == 0.0
    assert groups["backbone.backbone.res5.0.conv2.weight"]["weight_decay"] == 1e-4
    assert groups["sem_seg_head.convs.0.weight"]["weight_decay"] == 1e-4


def test_sync_norms_converts_batchnorm_for_several_workers():
    cfg = cfg_of("toy/dil_fcn_r18_sgr.yaml", *SMALL_SGR)
    single = cfg.clone()
    sync_norms(single, 1)
    assert single == cfg
    sync_norms(cfg, 2)
    # detectron2's get_norm names: "SyncBN" (NCCL) or "naiveSyncBN" (gloo, CPU workers)
    sync = "SyncBN" if torch.cuda.is_available() else "naiveSyncBN"
    assert (cfg.MODEL.RESNETS.NORM, cfg.MODEL.SEM_SEG_HEAD.NORM, cfg.MODEL.SGR.NORM) == (sync,) * 3
    model = build_model(cfg)
    plain = [n for n, m in model.named_modules() if type(m) is nn.BatchNorm2d]
    assert plain == []
    if sync == "naiveSyncBN":
        assert sum(isinstance(m, NaiveSyncBatchNorm) for m in model.modules()) > 10
    fpn = cfg_of("ade20k/sem_fpn_r50_sgr.yaml", "MODEL.FPN.NORM", "BN")
    sync_norms(fpn, 8)
    assert fpn.MODEL.FPN.NORM == sync and fpn.MODEL.SEM_SEG_HEAD.NORM == "GN"


# --------------------------------------------------------------------------- FLOPs counter


@pytest.mark.parametrize("grad", [True, False])
def test_flop_handles_count_fused_attention(grad):
    """A pre-norm encoder layer on L tokens of width E (FFN width Fd) is, in multiply-adds,
    4·L·E² (projections) + 2·L²·E (attention) + 2·L·E·Fd (FFN), plus fvcore's 5 per LayerNorm
    element. Without grad PyTorch runs fused kernels fvcore cannot count; the handles must."""
    from fvcore.nn import FlopCountAnalysis

    L, E, Fd = 16, 32, 48
    layer = nn.TransformerEncoderLayer(E, 4, Fd, dropout=0.0, batch_first=True, norm_first=True).eval()
    x = torch.randn(1, L, E)
    analysis = FlopCountAnalysis(layer, (x,)).set_op_handle(**flops_tool.EXTRA_HANDLES)
    analysis.unsupported_ops_warnings(False)
    with torch.set_grad_enabled(grad):
        total = analysis.total()
        unsupported = analysis.unsupported_ops()
    expected = 4 * L * E * E + 2 * L * L * E + 2 * L * E * Fd
    assert not [op for op in unsupported if "attention" in op or "transformer" in op], unsupported
    assert total == expected + 2 * 5 * L * E


@pytest.mark.slow
def test_flops_tool_counts_the_sgr_component():
    cfg = cfg_of("toy/dil_fcn_r18_sgr.yaml", "MODEL.SGR.CLASS_WEIGHT", "0.0")
    with torch.no_grad():
        res, unsupported = flops_tool.count_flops(cfg, 128)
    assert not unsupported
    s = cfg.MODEL.SGR
    d, hw, k, c, f, n = 256, 16 * 16, s.NUM_TOKENS, s.TOKEN_DIM, s.FFN_DIM, s.NUM_LAYERS
    # region and value 1x1 convs, token pooling and re-projection bmm, output 1x1 conv, encoder
    expected = hw * d * k + hw * d * c + 2 * k * hw * c + hw * c * d
    expected += n * (4 * k * c * c + 2 * k * k * c + 2 * k * c * f)
    assert res["has_sgr"] and res["sgr_module"] == "backbone.sgr"
    assert res["sgr_gflops"] * 1e9 == pytest.approx(expected, rel=0.02)
    assert 0 < res["sgr_gflops"] < res["gflops"]
