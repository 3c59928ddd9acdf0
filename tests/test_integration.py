"""SGR inside detectron2: backbone wrapper, meta-architecture, config, mapper, solver, TTA."""

import numpy as np
import pytest
import torch
import yaml
from conftest import TOY_BASE, TOY_SGR, tiny_toy_cfg
from PIL import Image

from detectron2.data import DatasetCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from detectron2.structures import ImageList

from sgr_d2.data import SemSegDatasetMapper
from sgr_d2.engine import build_optimizer, build_poly_lr_scheduler
from sgr_d2.config import load_config
from sgr_d2.modeling import SGR_OUTPUTS, SGRBackbone, SemanticSegmentorWithTTA
from sgr_d2.sgr import connected_components


def _batch(n=2, size=64, num_classes=6, seed=0, all_ignore=False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        sem = np.kron(rng.integers(0, num_classes, (4, 4)), np.ones((size // 4, size // 4), int)).astype(np.uint8)
        if all_ignore:
            sem[:] = 255
        masks, classes = connected_components(sem)
        out.append({
            "image": torch.as_tensor(rng.integers(0, 255, (3, size, size)), dtype=torch.uint8),
            "sem_seg": torch.as_tensor(sem.astype(np.int64)),
            "components": {"masks": masks, "classes": classes},
            "height": size, "width": size,
        })
    return out


# ------------------------------------------------------------------ build_sgr_backbone
@pytest.mark.parametrize("stride", [8, 32])
def test_sgr_backbone_keeps_the_wrapped_output_shapes(stride):
    cfg = tiny_toy_cfg(TOY_SGR, "MODEL.RESNETS.OUTPUT_STRIDE", str(stride),
                       "MODEL.RESNETS.OUT_FEATURES", "['res3', 'res4', 'res5']")
    inner = BACKBONE_REGISTRY.get(cfg.MODEL.SGR.BACKBONE_NAME)(cfg, ShapeSpec(channels=3))
    wrapped = BACKBONE_REGISTRY.get("build_sgr_backbone")(cfg, ShapeSpec(channels=3))
    assert isinstance(wrapped, SGRBackbone)
    assert wrapped.output_shape() == inner.output_shape()
    x = torch.randn(1, 3, 64, 64)
    inner.eval(), wrapped.eval()
    a, b = inner(x), wrapped(x)
    outputs = b.pop(SGR_OUTPUTS)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert b["res5"].shape[-1] == 64 // stride
    assert outputs["region_maps"].shape[-2:] == b["res5"].shape[-2:]


def test_sgr_after_an_inner_stage_feeds_the_later_stages():
    # res4 is not among the outputs: its width comes from the stage's last block
    cfg = tiny_toy_cfg(TOY_SGR, "MODEL.SGR.IN_FEATURE", "res4", "MODEL.RESNETS.OUT_FEATURES", "['res5']")
    model = BACKBONE_REGISTRY.get("build_sgr_backbone")(cfg, ShapeSpec(channels=3)).eval()
    torch.nn.init.constant_(model.sgr.out_norm.weight, 1.0)  # make SGR change its input
    x = torch.randn(1, 3, 64, 64)
    with_sgr = model(x)
    model.sgr.out_norm.weight.data.zero_()  # back to the identity map
    model.sgr.out_norm.bias.data.zero_()
    without = model(x)
    assert model.sgr.in_channels == 128  # half-width ResNet-18: res2..res5 have 32-64-128-256 channels
    assert not torch.allclose(with_sgr["res5"], without["res5"])  # res5 consumed SGR's res4


def test_gradients_reach_the_backbone_through_sgr():
    cfg = tiny_toy_cfg(TOY_SGR)
    model = build_model(cfg).train()
    losses = model(_batch())
    sgr_only = losses["loss_sgr_union"] + losses["loss_sgr_cls"] + losses["loss_sgr_div"]
    sgr_only.backward()
    stem_grad = model.backbone.backbone.stem.conv1.weight.grad
    assert stem_grad is not None and stem_grad.abs().sum() > 0
    assert model.sem_seg_head.predictor.weight.grad is None  # the head is not on this path


def test_mask_and_label_map_targets_give_the_same_loss():
    """Also with images of two sizes: the smaller one's targets are padded to the batch, with
    component id -1 (labels) or False (masks); a padding counted as component 0 would differ."""
    from sgr_d2.sgr import component_label_map

    model = build_model(tiny_toy_cfg()).train()
    torch.manual_seed(0)
    batch = _batch(1, size=64) + _batch(1, size=40, seed=1)
    a = model(batch)
    for x in batch:
        labels, classes = component_label_map(x["sem_seg"].numpy())
        x["components"] = {"labels": torch.from_numpy(labels), "classes": torch.from_numpy(classes)}
    torch.manual_seed(0)
    b = model(batch)
    for k in ("loss_sgr_union", "loss_sgr_cls", "loss_sgr_div"):
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-5)


SGR_WEIGHTS = {"UNION_WEIGHT": 0.7, "UNION_DICE_WEIGHT": 1.3, "CLASS_WEIGHT": 0.9, "DIVERSITY_WEIGHT": 1.1,
               "LOSS_WEIGHT": 0.4, "COST_DICE_WEIGHT": 0.6, "EPS": 1e-5}


@pytest.mark.parametrize("config", [TOY_SGR, TOY_SGR.replace("dil_fcn_r18_sgr", "maskformer_r18_sgr")],
                         ids=["per_pixel", "maskformer"])
def test_every_sgr_loss_setting_goes_from_the_config_into_the_criterion(config):
    opts = [x for k, v in SGR_WEIGHTS.items() for x in (f"MODEL.SGR.{k}", str(v))]
    model = build_model(tiny_toy_cfg(config, *opts, "MODEL.SGR.NUM_MATCHED", "5", "MODEL.SGR.MATCHING", "greedy"))
    crit = model.sgr_criterion
    got = {"UNION_WEIGHT": crit.union_weight, "UNION_DICE_WEIGHT": crit.union_dice_weight,
           "CLASS_WEIGHT": crit.class_weight, "DIVERSITY_WEIGHT": crit.diversity_weight,
           "LOSS_WEIGHT": crit.loss_weight, "COST_DICE_WEIGHT": crit.cost_dice_weight, "EPS": crit.eps}
    assert got == pytest.approx(SGR_WEIGHTS)
    assert (crit.num_matched, crit.matching) == (5, "greedy")


def test_sgr_loss_terms_scale_with_their_config_weights():
    """The same model, batch and seed with β and the term weights changed: each term scales by
    its own weight times β (hand-computed factors); the head's loss does not change."""
    def losses(*opts):
        torch.manual_seed(0)
        model = build_model(tiny_toy_cfg(TOY_SGR, *opts)).train()
        torch.manual_seed(0)
        return {k: v.item() for k, v in model(_batch()).items()}

    a = losses("MODEL.SGR.LOSS_WEIGHT", "1.0")
    b = losses("MODEL.SGR.LOSS_WEIGHT", "0.4", "MODEL.SGR.UNION_WEIGHT", "0.7", "MODEL.SGR.CLASS_WEIGHT", "0.9",
               "MODEL.SGR.DIVERSITY_WEIGHT", "1.1")
    assert min(a["loss_sgr_union"], a["loss_sgr_cls"], a["loss_sgr_div"]) > 0
    assert b["loss_sgr_union"] == pytest.approx(0.4 * 0.7 * a["loss_sgr_union"], rel=1e-5)
    assert b["loss_sgr_cls"] == pytest.approx(0.4 * 0.9 * a["loss_sgr_cls"], rel=1e-5)
    assert b["loss_sgr_div"] == pytest.approx(0.4 * 1.1 * a["loss_sgr_div"], rel=1e-5)
    assert b["loss_sem_seg"] == pytest.approx(a["loss_sem_seg"], rel=1e-6)


def test_all_ignore_image_trains_with_zero_sgr_loss():
    """No labelled pixel: every loss term is 0, not NaN (0/0), and backward gives every parameter
    a gradient, zero and finite: the heads and the SGR terms add zero times their outputs, so the
    graph reaches every parameter, as DistributedDataParallel(find_unused_parameters=False)
    needs on a worker whose batch has no label (a term that drops its zero leaves a parameter
    without a gradient; a normaliser without its clamp gives NaN)."""
    model = build_model(tiny_toy_cfg()).train()
    losses = model(_batch(all_ignore=True))
    assert set(losses) == {"loss_sem_seg", "loss_sgr_union", "loss_sgr_cls", "loss_sgr_div"}
    assert all(v.item() == 0.0 for v in losses.values()), losses
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and not p.grad.any(), name


def test_inference_gives_probabilities_and_region_maps():
    cfg = tiny_toy_cfg()
    model = build_model(cfg).eval()
    x = _batch(1, size=64)[0]
    x["height"], x["width"] = 100, 90
    with torch.no_grad():
        out = model([x])[0]
    assert out["sem_seg"].shape == (6, 100, 90)
    assert torch.allclose(out["sem_seg"].sum(0), torch.ones(100, 90), atol=1e-5)
    assert out["sgr_regions"].shape == (cfg.MODEL.SGR.NUM_TOKENS, 8, 8)
    # in a batch with a larger image, a smaller one's region maps are cropped to its own pixels
    from sgr_d2.modeling.sgr_outputs import crop_region_maps

    small = _batch(1, size=40, seed=1)[0]
    with torch.no_grad():
        outs = model([x, small])
        # the region maps over the padded 64x64 batch: (2, K, 8, 8)
        images = ImageList.from_tensors([(b["image"] - model.pixel_mean) / model.pixel_std for b in (x, small)],
                                        model.size_divisibility)
        regions = model.backbone(images.tensor)[SGR_OUTPUTS]["region_maps"]
    assert outs[1]["sgr_regions"].shape == (cfg.MODEL.SGR.NUM_TOKENS, 5, 5)  # ceil(40 * 8 / 64)
    assert torch.equal(outs[1]["sgr_regions"], crop_region_maps(regions[1], (40, 40), (64, 64)))
    assert torch.equal(outs[0]["sgr_regions"], regions[0])


def test_region_maps_of_a_padded_image_are_cropped_exactly():
    """A 512x683 image padded to 512x704 (stride 32: 16x22 cells, the last column 11/32 inside the
    image). The region maps are linear ramps over the feature cells; read as the token metrics
    read them (resized bilinearly onto the image), pixel x must get the ramp's value at its own
    feature coordinate (x + 0.5) * 22 / 704 - 0.5, not at (x + 0.5) * 22 / 683 - 0.5 (the 22
    cells stretched over the image: ~19 px off at the right edge)."""
    from torch.nn import functional as F

    from sgr_d2.modeling.sgr_outputs import attach_sgr_regions

    fh, fw, (h, w), padded = 16, 22, (512, 683), (512, 704)
    v, u = torch.meshgrid(torch.arange(fh, dtype=torch.float64), torch.arange(fw, dtype=torch.float64),
                          indexing="ij")
    ramps = torch.stack([0.1 + 0.01 * u, 0.1 + 0.02 * v, 0.8 - 0.01 * u - 0.02 * v])  # (3, fh, fw), Σ = 1
    sgr_outputs = {"region_maps": torch.stack([ramps, ramps.flip(-1)]).float()}
    (out, other) = attach_sgr_regions([{}, {}], sgr_outputs, [(h, w), padded], padded)
    assert torch.equal(other["sgr_regions"], sgr_outputs["region_maps"][1])  # no padding: as is
    regions = out["sgr_regions"]
    assert regions.shape == (3, 16, 22)  # ceil(683 * 22 / 704) = 22 cells, each 683/22 px wide
    assert torch.allclose(regions.sum(0), torch.ones(16, 22), atol=1e-5)  # Σ_k P_k kept
    on_image = F.interpolate(regions[None].double(), size=(h, w), mode="bilinear", align_corners=False)[0]
    x = torch.arange(w, dtype=torch.float64)
    y = torch.arange(h, dtype=torch.float64)
    fx = (x + 0.5) * fw / padded[1] - 0.5  # feature coordinates of the image's pixels
    fy = (y + 0.5) * fh / padded[0] - 0.5
    # away from the borders, where both resamplings clamp (the first cell centre lies 0.5 px left
    # of the first feature cell's centre)
    inner_x, inner_y = slice(48, w - 32), slice(32, h - 32)
    np.testing.assert_allclose(on_image[0, 100, inner_x], (0.1 + 0.01 * fx)[inner_x], atol=1e-6)
    np.testing.assert_allclose(on_image[1, inner_y, 300], (0.1 + 0.02 * fy)[inner_y], atol=1e-6)


# ------------------------------------------------------------------ config
def test_every_sgr_key_round_trips(tmp_path):
    cfg = load_config(TOY_SGR)
    new = {}
    for key, value in cfg.MODEL.SGR.items():
        if isinstance(value, bool):
            new[key] = not value
        elif isinstance(value, (int, float)) and key not in ("NUM_MATCHED", "NUM_TOKENS", "NUM_HEADS", "TOKEN_DIM"):
            new[key] = type(value)(value * 3 + 1)
        elif key == "MATCHING":
            new[key] = "greedy"
        elif key == "COMPONENTS":
            new[key] = "instances"
        elif key in ("NUM_MATCHED", "NUM_TOKENS", "NUM_HEADS", "TOKEN_DIM"):
            new[key] = {"NUM_MATCHED": 7, "NUM_TOKENS": 9, "NUM_HEADS": 2, "TOKEN_DIM": 10}[key]
        else:
            new[key] = value + "_x" if key != "NORM" else "GN"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"_BASE_": TOY_SGR, "MODEL": {"SGR": new}}))
    loaded = load_config(str(path))
    assert {k: loaded.MODEL.SGR[k] for k in new} == new
    dumped = tmp_path / "dump.yaml"
    dumped.write_text(loaded.dump())
    again = load_config(str(dumped))
    assert dict(again.MODEL.SGR) == dict(loaded.MODEL.SGR)


# ------------------------------------------------------------------ data
def _write_pair(folder, size_img, size_lbl, values):
    img = np.random.default_rng(0).integers(0, 255, (*size_img, 3), dtype=np.uint8)
    lbl = np.zeros(size_lbl, np.uint8)
    lbl.flat[: len(values)] = values
    Image.fromarray(img).save(folder / "a.jpg")
    Image.fromarray(lbl).save(folder / "a.png")
    return {"file_name": str(folder / "a.jpg"), "sem_seg_file_name": str(folder / "a.png")}


def test_mapper_pads_small_crops_with_ignore_and_emits_components(tmp_path):
    cfg = tiny_toy_cfg(TOY_SGR, "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.COLOR_AUG", "False")
    mapper = SemSegDatasetMapper(cfg, True)
    d = _write_pair(tmp_path, (64, 80), (64, 80), [1, 2, 3])
    out = mapper(d)
    assert out["image"].shape == (3, 128, 128)
    sem = out["sem_seg"].numpy()
    assert (sem[64:, :] == 255).all() and (sem[:, 80:] == 255).all()
    assert (sem[:64, :80] != 255).all()
    labels = out["components"]["labels"].numpy()
    masks = labels[None] == np.arange(len(out["components"]["classes"]))[:, None, None]
    assert (masks.any(0) == (sem != 255)).all()
    for m, c in zip(masks, out["components"]["classes"].tolist()):
        assert (sem[m] == c).all()


def test_mapper_reports_bad_labels_by_file(tmp_path):
    mapper = SemSegDatasetMapper(tiny_toy_cfg(), True)
    d = _write_pair(tmp_path, (40, 40), (40, 40), [1, 9])
    with pytest.raises(ValueError, match=r"a\.png.*\[9\].*0\.\.5"):
        mapper(d)
    d = _write_pair(tmp_path, (40, 40), (40, 30), [1])
    with pytest.raises(ValueError, match=r"a\.png is 30x40"):
        mapper(d)
    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image file .*a\.jpg"):
        mapper(d)


def test_toy_dataset_is_deterministic_and_has_disconnected_instances():
    from sgr_d2.data.toy import draw_scene

    a, b = draw_scene(1234), draw_scene(1234)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    dicts = DatasetCatalog.get("sgr_toy_sem_seg_val")
    assert len(dicts) == 40
    multi = 0
    for d in dicts[:10]:
        sem = np.asarray(Image.open(d["sem_seg_file_name"]))
        assert set(np.unique(sem)) <= {0, 1, 2, 3, 4, 5, 255}
        _, classes = connected_components(sem)
        multi += sum(int((classes == c).sum() > 1) for c in (3, 4, 5))
    assert multi >= 10  # most object classes appear as several separate regions


# ------------------------------------------------------------------ solver
def test_poly_schedule_and_head_multiplier():
    cfg = tiny_toy_cfg(TOY_SGR, "SOLVER.MAX_ITER", "100", "SOLVER.BASE_LR", "0.01")
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    sched = build_poly_lr_scheduler(cfg, opt)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["backbone.backbone.stem.conv1.weight"]["lr"] == pytest.approx(0.01)
    assert by_name["backbone.sgr.region_conv.weight"]["lr"] == pytest.approx(0.1)
    assert by_name["sem_seg_head.predictor.weight"]["lr"] == pytest.approx(0.1)
    assert by_name["backbone.backbone.stem.conv1.norm.weight"]["weight_decay"] == 0.0
    assert by_name["backbone.backbone.stem.conv1.weight"]["weight_decay"] == pytest.approx(1e-4)
    # the model without SGR: its backbone parameters are named without the wrapper's prefix
    base_cfg = tiny_toy_cfg(TOY_BASE, "SOLVER.MAX_ITER", "100", "SOLVER.BASE_LR", "0.01")
    base = {g["name"]: g for g in build_optimizer(base_cfg, build_model(base_cfg)).param_groups}
    assert base["backbone.stem.conv1.weight"]["lr"] == pytest.approx(0.01)
    assert base["sem_seg_head.predictor.weight"]["lr"] == pytest.approx(0.1)
    for _ in range(30):
        opt.step()
        sched.step()
    expected = 0.01 * (1 - 30 / 100) ** 0.9
    assert by_name["backbone.backbone.stem.conv1.weight"]["lr"] == pytest.approx(expected, rel=1e-6)
    assert by_name["sem_seg_head.predictor.weight"]["lr"] == pytest.approx(10 * expected, rel=1e-6)


# ------------------------------------------------------------------ TTA
class _FlipEquivariant(torch.nn.Module):
    """sem_seg = per-pixel softmax over (intensity, -intensity) resized to the output size."""

    def forward(self, batched):
        out = []
        for x in batched:
            img = x["image"].float().mean(0, keepdim=True)[None]
            img = torch.nn.functional.interpolate(img, size=(x["height"], x["width"]), mode="bilinear",
                                                  align_corners=False)[0, 0] / 255.0
            out.append({"sem_seg": torch.stack([img, -img]).softmax(0)})
        return out


def test_multiscale_flip_averages_probabilities():
    model = _FlipEquivariant()
    img = torch.arange(3 * 8 * 12, dtype=torch.float32).reshape(3, 8, 12) % 255
    tta = SemanticSegmentorWithTTA(model, scales=[0.5, 1.0, 1.5], flip=True)
    got = tta([{"image": img, "height": 8, "width": 12}])[0]["sem_seg"]
    expected = []
    for s in (0.5, 1.0, 1.5):
        size = (int(round(8 * s)), int(round(12 * s)))
        scaled = img if s == 1.0 else torch.nn.functional.interpolate(img[None], size=size, mode="bilinear",
                                                                       align_corners=False)[0]
        for flip in (False, True):
            inp = scaled.flip(-1) if flip else scaled
            p = model([{"image": inp, "height": 8, "width": 12}])[0]["sem_seg"]
            expected.append(p.flip(-1) if flip else p)
    assert torch.allclose(got, torch.stack(expected).mean(0), atol=1e-6)
    # a flip-equivariant model gives the same prediction for an image and its mirror: the flip
    # pair of the identity scale averages to exactly the plain prediction
    # wrapping an eval-mode model leaves it in eval mode after detectron2's inference_context
    from detectron2.evaluation.evaluator import inference_context

    model.eval()
    with inference_context(SemanticSegmentorWithTTA(model, scales=[1.0])):
        pass
    assert not model.training
    one = SemanticSegmentorWithTTA(model, scales=[1.0], flip=True)([{"image": img, "height": 8, "width": 12}])
    plain = model([{"image": img, "height": 8, "width": 12}])[0]["sem_seg"]
    assert torch.allclose(one[0]["sem_seg"], plain, atol=1e-6)


def test_full_model_gradient_clipping_bounds_the_global_norm():
    cfg = tiny_toy_cfg(TOY_SGR, "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
                       "full_model", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.01", "SOLVER.BASE_LR", "0.0")
    model = build_model(cfg).train()
    opt = build_optimizer(cfg, model)
    assert "FullModelGradientClipping" in type(opt).__name__
    sum(model(_batch()).values()).backward()
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    before = torch.norm(torch.stack([p.grad.norm() for p in params]))
    assert before > 0.01
    opt.step()
    after = torch.norm(torch.stack([p.grad.norm() for p in params]))
    assert after.item() == pytest.approx(0.01, rel=1e-3)
