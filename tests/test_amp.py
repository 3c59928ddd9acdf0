"""Mixed precision (SOLVER.AMP.ENABLED; bfloat16 autocast on the CPU) against float32.

The parts that must stay float32 are compared with float32 computations on the same inputs
(exact up to float32 rounding), and the SGR losses of one batch with float32 within a stated
tolerance (tools/amp_runs.py, which bench/amp_loss_spread.py measures); a few bfloat16 training
steps against float32's are tests/test_toy_training.py's.
"""
from __future__ import annotations

import glob
import math
import os
import sys

import pytest
import torch
from conftest import REPO, folder_opts, libyaml, log_records, tiny_toy_cfg, toy_batch

from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model

from sgr_d2.engine import Trainer
from sgr_d2.config import load_config
from sgr_d2.engine.amp import CPUAutocastTrainer
from sgr_d2.modeling.maskformer import HungarianMatcher, SetCriterion, mask_classification_weight_dict
from sgr_d2.sgr import SGRCriterion, SGRModule, autocast_off

sys.path.insert(0, os.path.join(REPO, "tools"))
from amp_runs import (ABS_TOL, DIL_FCN_SGR, MASK2FORMER_SGR, REL_TOL, SGR_KEYS, TOY,  # noqa: E402
                      float32_and_bf16_losses)

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)

pytestmark = pytest.mark.usefixtures("one_thread")  # whole-model forwards and training steps


def _bf16():
    return torch.autocast(**BF16)


def _cpu_autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")  # torch >= 2.4
    except TypeError:
        return torch.is_autocast_cpu_enabled()


# ------------------------------------------------------------------ float32 islands
def test_autocast_off_disables_cpu_autocast_only_inside():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with _bf16():
        assert (a @ b).dtype == torch.bfloat16  # what autocast does to a float32 matmul
        with autocast_off("cpu"):
            assert (a @ b).dtype == torch.float32
            assert torch.equal(a @ b, torch.mm(a, b))
        assert (a @ b).dtype == torch.bfloat16
    with autocast_off(torch.device("meta")):  # a device type without autocast: a no-op context
        pass


def test_sgr_region_softmax_and_token_average_are_float32_under_autocast():
    torch.manual_seed(0)
    # no encoder layers: the returned tokens are the token average itself
    sgr = SGRModule(16, num_tokens=8, token_dim=12, num_layers=0, num_heads=4, num_classes=5).eval()
    x = torch.randn(2, 16, 9, 11)
    with torch.no_grad(), _bf16():
        y, out = sgr(x)
        values = sgr.value_conv(x)  # the same bfloat16 values the module averaged
    assert out["region_logits"].dtype == torch.bfloat16  # the 1x1 conv itself runs in bfloat16
    assert out["region_maps"].dtype == torch.float32
    # the softmax of the (bfloat16) logits, computed in float32: equal to float32 rounding, which a
    # bfloat16 softmax (8 bits of mantissa) is not
    expected = out["region_logits"].double().softmax(1)
    assert torch.allclose(out["region_maps"].double(), expected, atol=1e-6, rtol=0)
    assert torch.allclose(out["region_maps"].sum(1), torch.ones(2, 9, 11), atol=1e-6)
    p = out["region_maps"].double().flatten(2)
    v = values.double().flatten(2).transpose(1, 2)
    tokens = torch.bmm(p, v) / (p.sum(2, keepdim=True) + sgr.eps)
    assert out["tokens"].dtype == torch.float32
    assert torch.allclose(out["tokens"].double(), tokens, rtol=1e-5, atol=1e-6)
    assert y.shape == x.shape


def _sgr_outputs_and_targets():
    torch.manual_seed(0)
    k, h, w = 12, 8, 10
    logits = torch.randn(2, k, h, w) * 4  # confident maps: probabilities near 0 and 1
    outputs = {"region_maps": logits.softmax(1), "token_logits": torch.randn(2, k, 6)}
    targets = []
    for i in range(2):
        labels = torch.full((32, 40), -1)
        labels[:16, :24] = 0
        labels[16:, :] = 1
        labels[:16, 24:] = 2 if i == 0 else 1
        targets.append({"labels": labels, "classes": torch.tensor([3, 1, 4][: int(labels.max()) + 1])})
    return outputs, targets


def test_sgr_criterion_is_float32_whatever_the_autocast_state_and_input_dtype():
    """bfloat16 region maps (what a bfloat16 softmax would give) under autocast give the float32
    losses of the same maps: the criterion upcasts its inputs (else log(1 - P) of a P rounded to 1
    is -inf) and switches autocast off (else its matrix products, cost and diversity, run in
    bfloat16)."""
    outputs, targets = _sgr_outputs_and_targets()
    crit = SGRCriterion(num_matched=8, union_dice_weight=0.5, diversity_weight=2.0)
    low = {k: v.bfloat16() for k, v in outputs.items()}
    ref = crit({k: v.float() for k, v in low.items()}, targets)
    with _bf16():
        got = crit(low, targets)
    for key in SGR_KEYS:
        assert got[key].dtype == torch.float32 and torch.isfinite(got[key]), key
        assert torch.allclose(got[key], ref[key], rtol=1e-6, atol=1e-7), (key, got[key], ref[key])
    assert ref["loss_sgr_div"] > 0 and ref["loss_sgr_union"] > 0  # the comparison is not 0 == 0


def test_per_pixel_cross_entropy_is_float32_with_autocast_off(monkeypatch):
    """The per-pixel heads' loss under bfloat16 autocast, on bfloat16 logits (what the head's
    last conv gives there): equal to the float32 loss of the same logits computed without
    autocast, and autocast is off while it runs (seen from inside F.cross_entropy)."""
    from torch.nn import functional as F

    from sgr_d2.modeling.heads.fcn_head import per_pixel_loss
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 8, 8, generator=g)).bfloat16()
    targets = torch.randint(0, 5, (2, 32, 32), generator=g)
    targets[0, :4] = 255
    ref = per_pixel_loss(logits.float(), targets, 255, 0.7, 4)["loss_sem_seg"]
    states, real = [], F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: (states.append(_cpu_autocast_on()), real(*a, **k))[1])
    with torch.autocast(**BF16):
        got = per_pixel_loss(logits, targets, 255, 0.7, 4)["loss_sem_seg"]
    assert states == [False]
    assert got.dtype == torch.float32 and torch.equal(got, ref)


def test_maskformer_criterion_and_matcher_are_float32_under_autocast():
    torch.manual_seed(0)
    q, k = 6, 4
    logits = torch.randn(2, q, k + 1)
    masks = torch.randn(2, q, 12, 16) * 3
    targets = [{"labels": torch.tensor([0, 2]), "masks": (torch.rand(2, 48, 64) > 0.5).float()},
               {"labels": torch.tensor([1, 3, 0]), "masks": (torch.rand(3, 48, 64) > 0.5).float()}]
    for num_points in (0, 50):  # MaskFormer (full masks), Mask2Former (point sampling)
        matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=num_points)
        crit = SetCriterion(k, matcher, mask_classification_weight_dict(2.0, 5.0, 5.0, 0), eos_coef=0.1,
                            num_points=num_points)
        low = {"pred_logits": logits.bfloat16(), "pred_masks": masks.bfloat16()}
        torch.manual_seed(1)
        ref = crit({n: v.float() for n, v in low.items()}, targets)
        cost_ref = matcher.cost_matrix(low["pred_logits"][0].float(), low["pred_masks"][0].float(),
                                       targets[0]["labels"], targets[0]["masks"]) if num_points == 0 else None
        torch.manual_seed(1)  # the same random points
        with _bf16():
            got = crit(low, targets)
            if num_points == 0:
                cost = matcher.cost_matrix(low["pred_logits"][0], low["pred_masks"][0], targets[0]["labels"],
                                           targets[0]["masks"])
        assert set(got) == {"loss_ce", "loss_mask", "loss_dice"}
        for key in got:
            assert got[key].dtype == torch.float32
            assert torch.allclose(got[key], ref[key], rtol=1e-6, atol=1e-7), (num_points, key, got[key], ref[key])
        if num_points == 0:
            assert cost.dtype == torch.float32 and torch.allclose(cost, cost_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config", [DIL_FCN_SGR, os.path.join(TOY, "maskformer_r18_sgr.yaml"), MASK2FORMER_SGR],
                         ids=["dil_fcn_sgr", "maskformer_sgr", "mask2former_sgr"])
def test_sgr_loss_terms_of_one_batch_under_bf16_autocast_equal_float32(config):
    """The whole model (backbone, SGR, head) forward in bfloat16 autocast, same weights and batch:
    each SGR loss term is finite, float32, and within 5% (or 2e-3) of the float32 forward's."""
    cfg = tiny_toy_cfg(config)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    ref, got = float32_and_bf16_losses(model, toy_batch(cfg))
    for key in SGR_KEYS:
        a, b = ref[key].item(), got[key].item()
        assert got[key].dtype == torch.float32 and math.isfinite(b), (key, b)
        assert abs(a - b) <= max(REL_TOL * abs(a), ABS_TOL), (key, a, b)
        assert a > 0, key  # not trivially equal
    for key, value in got.items():  # the head's losses are float32 and finite too
        assert value.dtype == torch.float32 and torch.isfinite(value), key


# ------------------------------------------------------------------ the trainer
# Mask R-CNN samples fewer proposals and RoIs than its toy config (the box and mask heads' bfloat16
# convolutions and matrix products are most of its step): what is checked is where autocast is on
_FEW_ROIS = ("MODEL.RPN.POST_NMS_TOPK_TRAIN", "20", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16")


@pytest.mark.parametrize("config, opts",
                         [(DIL_FCN_SGR, ()), (os.path.join(TOY, "mask_rcnn_r18_fpn_sgr.yaml"), _FEW_ROIS)],
                         ids=["dil_fcn_sgr", "mask_rcnn_fpn_sgr"])
def test_amp_on_the_cpu_trains_the_forward_in_bfloat16_and_the_backward_in_float32(config, opts, tmp_path):
    # 64 px images (bfloat16 is slow on a CPU without bfloat16 instructions)
    cfg = tiny_toy_cfg(config, "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()",
                       "OUTPUT_DIR", str(tmp_path), "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.EVAL_PERIOD", "0",
                       "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.CROP.SIZE", "(64, 64)",
                       *opts)
    cfg.freeze()
    trainer = Trainer(cfg)
    model = trainer.model
    conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))  # the stem's
    seen = []  # (training, conv output dtype, autocast on) per forward
    grad_autocast = []

    def record(module, args, output):
        seen.append((model.training, output.dtype, _cpu_autocast_on()))
        if output.requires_grad:
            output.register_hook(lambda g: grad_autocast.append((g.dtype, _cpu_autocast_on())))

    conv.register_forward_hook(record)
    trainer.resume_or_load(resume=False)
    trainer.train()
    train = [s for s in seen if s[0]]
    assert train == [(True, torch.bfloat16, True)] * 2
    # the backward pass runs outside autocast (the gradient of a bfloat16 output is bfloat16)
    assert grad_autocast == [(torch.bfloat16, False)] * 2
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not _cpu_autocast_on()
    model.eval()  # a forward pass outside run_step (evaluation) is not under autocast
    with torch.no_grad():
        model([{"image": torch.zeros(3, 64, 64)}])
    assert seen[-1] == (False, torch.float32, False)
    losses = {k: h.latest() for k, h in trainer.storage.histories().items() if k.startswith("loss")}
    assert len(losses) >= 4 and all(math.isfinite(v) for v in losses.values()), losses


def test_amp_picks_detectron2s_amp_trainer_for_a_model_on_cuda(monkeypatch):
    """No GPU here: a stand-in model whose parameters say "cuda" gets detectron2's AMPTrainer
    (float16 autocast and GradScaler; replaced by a recorder, since the real one asserts CUDA),
    a CPU model the bfloat16 CPUAutocastTrainer. This checks the choice only; float16 training
    itself was not run."""
    from types import SimpleNamespace

    from sgr_d2.engine import amp
    made = []

    class _AMPTrainer:
        def __init__(self, model, data_loader, optimizer, *args, **kwargs):
            made.append((model, data_loader, optimizer))

    class _OnCuda(torch.nn.Module):
        def parameters(self, recurse=True):
            yield SimpleNamespace(device=torch.device("cuda"))

    monkeypatch.setattr(amp, "AMPTrainer", _AMPTrainer)
    cfg = SimpleNamespace(SOLVER=SimpleNamespace(AMP=SimpleNamespace(ENABLED=True)))
    model, loader, opt = _OnCuda(), object(), object()
    with log_records("sgr_d2.engine.amp") as logged:
        assert isinstance(amp.build_step_trainer(cfg, model, loader, opt), _AMPTrainer)
        assert made == [(model, loader, opt)]
        cpu = torch.nn.Linear(2, 2)
        trainer = amp.build_step_trainer(cfg, cpu, [], torch.optim.SGD(cpu.parameters(), lr=0.1))
        assert type(trainer) is amp.CPUAutocastTrainer and trainer.precision == torch.bfloat16 and len(made) == 1
        cfg.SOLVER.AMP.ENABLED = False
        assert type(amp.build_step_trainer(cfg, cpu, [], torch.optim.SGD(cpu.parameters(), lr=0.1))) is SimpleTrainer
    assert len(logged) == 3
    assert logged[0].startswith("Training on cuda in mixed precision") and "float16 autocast with gradient scaling (detectron2's AMPTrainer)" in logged[0]
    assert logged[1].startswith("Training on cpu in mixed precision") and "bfloat16 autocast without gradient scaling" in logged[1]
    assert logged[2] == "Training on cpu in float32 (detectron2's SimpleTrainer)"


def test_a_failing_forward_leaves_autocast_off():
    cfg = tiny_toy_cfg(DIL_FCN_SGR)
    model = build_model(cfg).train()
    trainer = CPUAutocastTrainer(model, [[{"image": torch.zeros(3, 32, 32)}]], torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(KeyError):  # no sem_seg in the batch
        trainer.run_step()
    assert not _cpu_autocast_on()


def test_maskformer_and_mask2former_configs_enable_amp():
    """The MaskFormer / Mask2Former configs train with AMP (the official Mask2Former configs do;
    ours enable it for MaskFormer too); the per-pixel baselines (mmseg recipes) and the toy
    configs (CPU float32; also the CPU-sized R-18 folder configs, which inherit from them) do not.
    (The configs are parsed by libyaml: conftest.libyaml.)"""
    checked = 0
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.yaml"))):
        name = os.path.basename(path)
        if name.startswith("Base-"):
            continue
        with libyaml():
            cfg = load_config(path, folder_opts(path))
        is_mask_cls = cfg.MODEL.META_ARCHITECTURE == "MaskFormer"
        is_toy = os.path.basename(os.path.dirname(path)) == "toy" or "_r18" in name
        assert cfg.SOLVER.AMP.ENABLED == (is_mask_cls and not is_toy), path
        checked += is_mask_cls and not is_toy
    # semantic: datasets x {MaskFormer, Mask2Former} x {R-50, R-101, Swin-T} x {-, SGR}, and the
    # fine-tuning recipe on a published model (configs/ade20k/finetune_mask2former_r50_sgr.yaml);
    # panoptic and instance: 3 datasets x 2 tasks x Mask2Former {R-50, Swin-T} x {-, SGR}; the
    # folder datasets' Mask2Former x {R-50, Swin-T} x {-, SGR} (semantic) and R-50 x {instance,
    # panoptic} x {-, SGR}
    assert checked == 3 * 2 * 3 * 2 + 1 + 3 * 2 * 2 * 2 + 4 + 4
