"""ONNX export (sgr_d2/export.py, tools/export_onnx.py, demo --onnx) against PyTorch.

Every toy meta-architecture, with and without SGR, is exported at a small size and run by
onnxruntime on other images than the one it was traced with; its outputs must equal PyTorch's
(max |Δ| ≤ 1e-4 on scores in [0, 1], argmax agreement ≥ 99.9%). What cannot be exported is a
clear error naming the part.
"""
from __future__ import annotations

import functools
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_toy_cfg

from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model

from sgr_d2.export import (
    ATOL,
    MIN_ARGMAX_AGREEMENT,
    ExportError,
    OnnxSemanticPredictor,
    SemanticSegmentationExport,
    compare_with_onnxruntime,
    export_onnx,
    onnxruntime_session,
    run_onnxruntime,
)

pytest.importorskip("onnxruntime", reason="the deploy extra (pip install '.[deploy]') is not installed")

pytestmark = pytest.mark.usefixtures("one_thread")  # tracing and forward passes: one intra-op thread

TOY = os.path.join(REPO, "configs", "toy")
CONFIGS = ["dil_fcn_r18", "dil_fcn_r18_sgr", "maskformer_r18_sgr",
           "mask2former_r18_sgr"]
H, W = 64, 96  # the export size: not square, a multiple of every toy model's size divisibility


def _model(name, seed=0):
    cfg = tiny_toy_cfg(os.path.join(TOY, name + ".yaml"))
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    # Non-trivial BatchNorm statistics, so that the exported graph must carry them.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return cfg, model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(name)``: ``(cfg, model, path, names, reports, session)`` of the toy model ``name``
    (``_model(name)``, seed 0) exported at H x W with export_onnx's onnxruntime check, and an
    onnxruntime session of the file. Each model is exported once per module: the tests that only
    read the file, or run the model, share it (the export is most of their time)."""
    done, folder = {}, tmp_path_factory.mktemp("exported")

    def get(name):
        if name not in done:
            cfg, model = _model(name)
            path = str(folder / f"{name}.onnx")
            names, reports = export_onnx(model, path, H, W)
            done[name] = (cfg, model, path, names, reports, onnxruntime_session(path))
        return done[name]

    yield get
    done.clear()
    shutil.rmtree(folder, ignore_errors=True)


def _image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 8, w // 8, generator=g)
    return (torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear") * 255).float()


def _toy_val_image(cfg, index=0):
    return _read_val_image(cfg.DATASETS.TEST[0], cfg.INPUT.FORMAT, index).clone()


@functools.lru_cache(maxsize=None)
def _read_val_image(dataset, fmt, index):
    d = DatasetCatalog.get(dataset)[index]
    img = read_image(d["file_name"], format=fmt)  # (H, W, 3) uint8
    return torch.as_tensor(img.astype("float32").transpose(2, 0, 1))[None]


@pytest.mark.parametrize("name", CONFIGS)
def test_onnxruntime_reproduces_pytorch_for_every_toy_meta_architecture(name, exported):
    cfg, model, path, names, reports, session = exported(name)
    has_sgr = name.endswith("_sgr")
    assert names == (["sem_seg", "sgr_regions"] if has_sgr else ["sem_seg"])
    assert list(reports) == [f"{H}x{W}"]
    assert [o.name for o in session.get_outputs()] == names
    import onnx
    graph = onnx.load(path)
    assert {o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {17}  # docs/deploy.md
    wrapper = SemanticSegmentationExport(model)
    real = _toy_val_image(cfg)  # a 128x128 scene, resized to the export size
    real = torch.nn.functional.interpolate(real, size=(H, W), mode="bilinear")
    for image in (_image(H, W, seed=5), real):
        report = compare_with_onnxruntime(wrapper, session, image)
        sem = report["sem_seg"]
        assert sem["shape"] == sem["onnx_shape"] == (1, 6, H, W)
        assert sem["max_abs_diff"] <= ATOL, report
        assert sem["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT, report
        if has_sgr:
            k = cfg.MODEL.SGR.NUM_TOKENS
            assert report["sgr_regions"]["onnx_shape"][:2] == (1, k)
            assert report["sgr_regions"]["max_abs_diff"] <= ATOL, report


def test_the_output_is_the_models_own_inference_output(exported):
    """sem_seg is exactly the model's ``sem_seg`` (softmax probabilities of the per-pixel head)
    for the image, and sgr_regions its ``sgr_regions``; a model with other weights is not
    reproduced (the comparison can fail)."""
    cfg, model, path, _, _, session = exported("dil_fcn_r18_sgr")
    image = _image(H, W, seed=3)
    out = run_onnxruntime(session, image.numpy())
    with torch.no_grad():
        ref = model([{"image": image[0]}])[0]
    assert np.allclose(out["sem_seg"][0].sum(0), 1.0, atol=1e-5)  # probabilities
    assert np.abs(out["sem_seg"][0] - ref["sem_seg"].numpy()).max() <= ATOL
    assert np.abs(out["sgr_regions"][0] - ref["sgr_regions"].numpy()).max() <= ATOL
    _, other = _model("dil_fcn_r18_sgr", seed=1)
    report = compare_with_onnxruntime(SemanticSegmentationExport(other), session, image)
    assert report["sem_seg"]["max_abs_diff"] > 100 * ATOL


@pytest.mark.parametrize("hw", [(12, 12), (7, 10), (5, 16)])
def test_the_exportable_adaptive_pooling_equals_pytorchs(hw, monkeypatch):
    """UperNet's pyramid pooling during export (matrix products) averages PyTorch's bins,
    including sizes that the output size does not divide."""
    from torch.nn import functional as F

    from sgr_d2.modeling.heads.upernet_head import adaptive_avg_pool2d

    x = torch.randn(2, 3, *hw)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    for s in (1, 2, 3, 6):
        assert torch.allclose(adaptive_avg_pool2d(x, s), F.adaptive_avg_pool2d(x, s), atol=1e-6), (hw, s)


def test_dynamic_export_takes_other_sizes(tmp_path, exported):
    cfg, model, _, _, _, fixed_session = exported("dil_fcn_r18_sgr")
    path = str(tmp_path / "dyn.onnx")
    _, reports = export_onnx(model, path, H, W, dynamic=True)
    assert len(reports) == 2  # the export size and a second one, checked by export_onnx
    session = onnxruntime_session(path)
    wrapper = SemanticSegmentationExport(model)
    for h, w in ((50, 70), (128, 128)):  # 50x70 is padded to the size divisibility inside the graph
        report = compare_with_onnxruntime(wrapper, session, _image(h, w, seed=7))
        assert report["sem_seg"]["onnx_shape"] == (1, 6, h, w)
        assert report["sem_seg"]["max_abs_diff"] <= ATOL and report["sem_seg"]["argmax_agreement"] >= 0.999
        assert report["sgr_regions"]["onnx_shape"] == report["sgr_regions"]["shape"]
    # the same model exported at a fixed size (H x W) refuses another size
    assert [tuple(d) for d in (i.shape for i in fixed_session.get_inputs())] == [(1, 3, H, W)]
    with pytest.raises(Exception, match="(?i)dimension|shape|invalid"):
        run_onnxruntime(fixed_session, _image(50, 70, seed=7).numpy())


@pytest.mark.parametrize("name, part", [
    ("mask2former_r18_sgr", "sem_seg_head.pixel_decoder (MSDeformAttnPixelDecoder"),
    ("maskformer_r18_sgr", "region maps (output 'sgr_regions')"),  # region stride 16 < size divisibility 32
])
def test_dynamic_export_of_a_size_bound_part_is_a_clear_error_naming_it(name, part, tmp_path):
    _, model = _model(name)
    with pytest.raises(ExportError) as err:
        export_onnx(model, str(tmp_path / "m.onnx"), H, W, dynamic=True)
    assert part in str(err.value) and "fixed size" in str(err.value)
    assert not (tmp_path / "m.onnx").exists()


def test_dynamic_export_of_upernets_pyramid_pooling_is_a_clear_error_naming_it(tmp_path):
    """UperNet (configs/{ade20k,cityscapes,coco_stuff_10k}/upernet_swin_t*.yaml): its pyramid
    pooling is exported with pooling matrices for the export size, so --dynamic is refused by
    name before anything is traced. The ADE20K config at a CPU size (a narrower, shallower Swin
    and head; 0.8 M parameters instead of 59 M): the refusal depends on the head's kind only."""
    cfg = tiny_toy_cfg(os.path.join(REPO, "configs", "ade20k", "upernet_swin_t.yaml"), "MODEL.WEIGHTS", "",
                       "MODEL.SWIN.EMBED_DIM", "24", "MODEL.SWIN.DEPTHS", "[1, 1, 1, 1]",
                       "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16")
    model = build_model(cfg).eval()
    with pytest.raises(ExportError) as err:
        export_onnx(model, str(tmp_path / "m.onnx"), H, W, dynamic=True)
    assert "UperNet's PyramidPooling" in str(err.value) and "fixed size" in str(err.value), str(err.value)
    assert not (tmp_path / "m.onnx").exists()


class _ShiftedWhenNotTraced(torch.nn.Module):
    """PyTorch and the traced graph disagree: the eager model adds 3 to the first class's logit."""

    def forward(self, x):
        if torch.jit.is_tracing():
            return x
        return x + 3 * (torch.arange(x.shape[1]) == 0).to(x).view(1, -1, 1, 1)


def _export_error_after_the_classifier(part, tmp_path):
    """The ExportError message of exporting the toy Dilated-FCN with ``part`` after its classifier."""
    _, model = _model("dil_fcn_r18")
    model.sem_seg_head.predictor = torch.nn.Sequential(model.sem_seg_head.predictor, part)
    with pytest.raises(ExportError) as err:
        export_onnx(model, str(tmp_path / "m.onnx"), H, W)
    return str(err.value)


def test_an_export_that_onnxruntime_does_not_reproduce_is_an_error(tmp_path):
    msg = _export_error_after_the_classifier(_ShiftedWhenNotTraced(), tmp_path)
    assert f"onnxruntime does not reproduce PyTorch at {H}x{W}" in msg, msg
    assert "output 'sem_seg' differs by up to" in msg and f"(tolerance {ATOL:g})" in msg, msg
    assert "the argmax of 'sem_seg' agrees on" in msg, msg


class _CumMax(torch.nn.Module):
    """An op the ONNX exporter does not support (aten::cummax)."""

    def forward(self, x):
        return torch.cummax(x, dim=2)[0]


def test_an_unsupported_part_is_named(tmp_path):
    msg = _export_error_after_the_classifier(_CumMax(), tmp_path)
    assert "sem_seg_head.predictor.1 (_CumMax)" in msg and "aten::cummax" in msg, msg


class _FailsWhenTraced(torch.nn.Module):
    def forward(self, x):
        if torch.jit.is_tracing():
            raise RuntimeError("this part cannot be traced")
        return x


def test_an_error_while_tracing_names_the_innermost_module(tmp_path):
    _, model = _model("dil_fcn_r18")
    model.sem_seg_head.convs.append(_FailsWhenTraced())
    with pytest.raises(ExportError) as err:
        export_onnx(model, str(tmp_path / "m.onnx"), H, W)
    msg = str(err.value)
    assert "in sem_seg_head.convs.1 (_FailsWhenTraced)" in msg and "this part cannot be traced" in msg, msg


def test_a_detector_is_refused_by_name(tmp_path):
    cfg = tiny_toy_cfg(os.path.join(TOY, "mask_rcnn_r18_fpn.yaml"))
    model = build_model(cfg).eval()
    with pytest.raises(ExportError, match="GeneralizedRCNN .*not a semantic-segmentation model"):
        export_onnx(model, str(tmp_path / "m.onnx"), H, W)
    # so is a MaskFormer with panoptic inference on: the export returns sem_seg only
    cfg = tiny_toy_cfg(os.path.join(TOY, "maskformer_r18.yaml"), "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "True")
    with pytest.raises(ExportError, match="SEMANTIC_ON / PANOPTIC_ON / INSTANCE_ON are True / True / False"):
        export_onnx(build_model(cfg).eval(), str(tmp_path / "m.onnx"), H, W)


def test_export_tool_loads_the_weights_and_the_demo_runs_the_file(tmp_path, capsys):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    sys.path.insert(0, os.path.join(REPO, "demo"))
    import demo as demo_script
    import export_onnx as tool
    from predictor import VisualizationDemo

    config = os.path.join(TOY, "dil_fcn_r18_sgr.yaml")
    cfg, model = _model("dil_fcn_r18_sgr", seed=2)
    weights = str(tmp_path / "w.pth")
    torch.save({"model": model.state_dict()}, weights)
    out = str(tmp_path / "toy.onnx")
    names, reports = tool.main(["--config-file", config, "--weights", weights, "--output", out,
                                "MODEL.DEVICE", "cpu"])
    printed = capsys.readouterr().out
    assert "128x128 sem_seg (1, 6, 128, 128)" in printed and "argmax agreement" in printed  # MIN_SIZE_TEST
    # the file holds the checkpoint's weights, not a fresh initialisation
    session = onnxruntime_session(out)
    image = _toy_val_image(cfg)
    report = compare_with_onnxruntime(SemanticSegmentationExport(model), session, image)
    assert report["sem_seg"]["max_abs_diff"] <= ATOL

    # demo: the ONNX predictor draws the same classes as DefaultPredictor with the checkpoint
    cfg = tiny_toy_cfg(config, "MODEL.WEIGHTS", weights)
    bgr = read_image(DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]["file_name"], format="BGR")
    torch_pred = VisualizationDemo(cfg).predictor(bgr)
    onnx_predictor = OnnxSemanticPredictor(cfg, out)
    onnx_pred = onnx_predictor(bgr)
    assert onnx_pred["sem_seg"].shape == torch_pred["sem_seg"].shape == (6, *bgr.shape[:2])
    agree = (onnx_pred["sem_seg"].argmax(0) == torch_pred["sem_seg"].argmax(0)).float().mean()
    assert agree >= MIN_ARGMAX_AGREEMENT
    assert torch.allclose(onnx_pred["sgr_regions"], torch_pred["sgr_regions"], atol=ATOL)
    # an image of another size than the file's 128x128: resized to it, the scores resized back,
    # as the model itself does when asked for another output size
    from detectron2.data import transforms as T
    small = T.ResizeTransform(128, 128, 96, 160).apply_image(bgr)
    onnx_small = onnx_predictor(small)
    x = torch.as_tensor(T.ResizeTransform(96, 160, 128, 128).apply_image(small).astype("float32").transpose(2, 0, 1))
    with torch.no_grad():
        ref = model.eval()([{"image": x, "height": 96, "width": 160}])[0]["sem_seg"]
    assert onnx_small["sem_seg"].shape == ref.shape == (6, 96, 160)
    assert (onnx_small["sem_seg"] - ref).abs().max().item() <= ATOL
    files = demo_script.main(["--config-file", config, "--onnx", out, "--input", DatasetCatalog.get(
        cfg.DATASETS.TEST[0])[0]["file_name"], "--output", str(tmp_path / "demo")])
    assert sorted(os.path.basename(f) for f in files) == ["0000_regions.png", "0000_seg.png"]
    assert all(os.path.getsize(f) > 0 for f in files)


def test_export_tool_names_a_missing_weights_file(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import export_onnx as tool

    with pytest.raises(FileNotFoundError, match="nope.pth"):
        tool.main(["--config-file", os.path.join(TOY, "dil_fcn_r18.yaml"), "--weights", str(tmp_path / "nope.pth"),
                   "--output", str(tmp_path / "m.onnx")])
