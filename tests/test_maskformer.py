"""MaskFormer / Mask2Former (sgr_d2.modeling.maskformer) against independent expectations.

Hand-computed loss and cost values on two-point masks, scipy's assignment and a brute force
for the matcher, a direct bilinear loop for the deformable attention, perturbation of masked
keys for masked attention, a perfect prediction through the semantic, panoptic and instance
inference, hand-made cases of the panoptic and instance inference, the pixel decoder's dtype
under autocast, and one training step of the toy configs.
"""
from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
import torch
from conftest import REPO, toy_batch
from scipy.optimize import linear_sum_assignment
from torch.nn import functional as F

from detectron2.data.catalog import Metadata
from detectron2.modeling import build_model
from detectron2.structures import ImageList, Instances

from sgr_d2.config import load_config
from sgr_d2.modeling.maskformer import (
    HungarianMatcher,
    MultiScaleMaskedTransformerDecoder,
    SetCriterion,
    attention_mask_from_predictions,
    dice_loss,
    mask_classification_weight_dict,
    ms_deform_attn,
    pairwise_dice,
    pairwise_sigmoid_ce,
    pairwise_sigmoid_focal,
    point_sample,
    semantic_inference,
    sigmoid_ce_loss,
    sigmoid_focal_loss,
    uncertain_point_coords,
)
from sgr_d2.modeling.maskformer.transformer import CrossAttentionLayer

TOY = os.path.join(REPO, "configs", "toy")
MASKFORMER_SGR = os.path.join(TOY, "maskformer_r18_sgr.yaml")
MASK2FORMER_SGR = os.path.join(TOY, "mask2former_r18_sgr.yaml")
SGR_KEYS = {"loss_sgr_union", "loss_sgr_cls", "loss_sgr_div"}
LN2, LN3 = math.log(2), math.log(3)

# Two predictions and two targets over two points (or pixels):
#   a: logits (0, ln 3)   -> p = (1/2, 3/4)      t1 = (1, 0)
#   b: logits (-ln 3, 0)  -> p = (1/4, 1/2)      t2 = (1, 1)
PRED = torch.tensor([[0.0, LN3], [-LN3, 0.0]], dtype=torch.float64)
TGT = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
# mean BCE: a-t1 = (ln 2 + ln 4)/2, a-t2 = (ln 2 + ln 4/3)/2, b-t1 = (ln 4 + ln 2)/2, b-t2 = (ln 4 + ln 2)/2
BCE = [[1.5 * LN2, (LN2 + math.log(4 / 3)) / 2], [1.5 * LN2, 1.5 * LN2]]
# dice 1 - (2 Σpt + 1)/(Σp + Σt + 1): a-t1 = 1 - 2/3.25, a-t2 = 1 - 3.5/4.25, b-t1 = 1 - 1.5/2.75,
# b-t2 = 1 - 2.5/3.75
DICE = [[5 / 13, 3 / 17], [5 / 11, 1 / 3]]


def _focal(p, t, alpha=0.25, gamma=2.0):
    """Focal loss of one probability / target pair, from its definition."""
    return -alpha * (1 - p) ** gamma * math.log(p) if t == 1 else -(1 - alpha) * p ** gamma * math.log(1 - p)


PROBS = [[0.5, 0.75], [0.25, 0.5]]
FOCAL = [[sum(_focal(p, t) for p, t in zip(PROBS[i], TGT[j].tolist())) / 2 for j in range(2)] for i in range(2)]


# ------------------------------------------------------------------------------ losses and costs
def test_pairwise_costs_equal_hand_computed_values():
    assert torch.allclose(pairwise_sigmoid_ce(PRED, TGT), torch.tensor(BCE, dtype=torch.float64))
    assert torch.allclose(pairwise_dice(PRED, TGT), torch.tensor(DICE, dtype=torch.float64))
    assert torch.allclose(pairwise_sigmoid_focal(PRED, TGT), torch.tensor(FOCAL, dtype=torch.float64))


def test_dice_bce_and_focal_losses_equal_hand_computed_values():
    # rows matched a-t1 and b-t2, normalised by num_masks = 2
    tgt = TGT[[0, 1]]
    assert dice_loss(PRED, tgt, 2).item() == pytest.approx((5 / 13 + 1 / 3) / 2)
    assert sigmoid_ce_loss(PRED, tgt, 2).item() == pytest.approx((1.5 * LN2 + 1.5 * LN2) / 2)
    assert sigmoid_focal_loss(PRED, tgt, 2).item() == pytest.approx((FOCAL[0][0] + FOCAL[1][1]) / 2)
    # num_masks divides (a different count of target masks in the batch)
    assert dice_loss(PRED, tgt, 4).item() == pytest.approx((5 / 13 + 1 / 3) / 4)


def test_matcher_cost_entries_equal_hand_computed_values():
    # class logits of a: softmax (1/4, 1/2, 1/4); b: uniform 1/3; targets are classes 0 and 1
    logits = torch.tensor([[0.0, LN2, 0.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1])
    masks = PRED.float().view(2, 1, 2)  # 1 x 2 "images"
    tgt = TGT.float().view(2, 1, 2)
    cls_cost = [[-0.25, -0.5], [-1 / 3, -1 / 3]]
    for kind, mask_cost in (("sigmoid_ce", BCE), ("focal", FOCAL)):
        matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=3.0, num_points=0, mask_loss_type=kind)
        cost = matcher.cost_matrix(logits, masks, labels, tgt)
        expected = [[2 * cls_cost[i][j] + 5 * mask_cost[i][j] + 3 * DICE[i][j] for j in range(2)] for i in range(2)]
        assert torch.allclose(cost, torch.tensor(expected), atol=1e-6), kind


def _loop_cost(logits, masks, labels, tgt_masks, wc, wm, wd):
    """The matching cost by a double loop over (query, target), straight from the definitions."""
    q, n = logits.shape[0], labels.shape[0]
    prob = logits.softmax(-1)
    cost = np.zeros((q, n))
    for i in range(q):
        p = masks[i].sigmoid().flatten().double()
        for j in range(n):
            t = tgt_masks[j].flatten().double()
            bce = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
            dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
            cost[i, j] = wc * -prob[i, labels[j]].item() + wm * bce.item() + wd * dice.item()
    return cost


def test_matcher_assignment_equals_scipy_and_brute_force():
    g = torch.Generator().manual_seed(0)
    q, n, k = 6, 4, 5
    logits = torch.randn(2, q, k + 1, generator=g)
    masks = torch.randn(2, q, 5, 7, generator=g) * 3
    targets = []
    for b in range(2):
        tgt = (torch.rand(n, 5, 7, generator=g) > 0.5).float()
        targets.append({"labels": torch.randint(0, k, (n,), generator=g), "masks": tgt})
    targets[1] = {"labels": targets[1]["labels"][:2], "masks": targets[1]["masks"][:2]}  # N < Q, varying
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=0,
                               mask_loss_type="sigmoid_ce")
    indices = matcher({"pred_logits": logits, "pred_masks": masks}, targets)
    for b, (rows, cols) in enumerate(indices):
        t = targets[b]
        cost = _loop_cost(logits[b], masks[b], t["labels"], t["masks"], 2.0, 5.0, 5.0)
        assert np.allclose(matcher.cost_matrix(logits[b], masks[b], t["labels"], t["masks"]).numpy(), cost,
                           atol=1e-5)
        ref_rows, ref_cols = linear_sum_assignment(cost)
        assert rows.tolist() == ref_rows.tolist() and cols.tolist() == ref_cols.tolist()
        n_b = len(t["labels"])
        best = min(sum(cost[perm[j], j] for j in range(n_b)) for perm in itertools.permutations(range(q), n_b))
        assert cost[rows.numpy(), cols.numpy()].sum() == pytest.approx(best)
        assert len(set(rows.tolist())) == n_b  # one query per target


def test_matcher_handles_an_image_without_targets():
    matcher = HungarianMatcher(num_points=16)
    out = {"pred_logits": torch.randn(1, 3, 4), "pred_masks": torch.randn(1, 3, 4, 4)}
    rows, cols = matcher(out, [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8)}])[0]
    assert rows.numel() == 0 and cols.numel() == 0


def test_point_sampled_matching_cost_equals_the_loop_cost_at_the_same_points():
    # Mask2Former's matcher reads predictions and targets at the same uniformly random points;
    # redraw them from the same seed and evaluate both by hand-written bilinear interpolation.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, generator=g)
    masks = torch.randn(5, 6, 7, generator=g) * 2
    tgt = (torch.rand(3, 12, 14, generator=g) > 0.5).float()  # targets at twice the resolution
    labels = torch.tensor([0, 2, 1])
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=40, mask_loss_type="sigmoid_ce")
    torch.manual_seed(7)
    cost = matcher.cost_matrix(logits, masks, labels, tgt)
    torch.manual_seed(7)
    coords = torch.rand(1, 40, 2)[0].tolist()
    pts_pred = torch.tensor([[_bilinear(m[None].double(), x, y).item() for x, y in coords] for m in masks])
    pts_tgt = torch.tensor([[_bilinear(t[None].double(), x, y).item() for x, y in coords] for t in tgt])
    expected = _loop_cost(logits, pts_pred, labels, pts_tgt, 2.0, 5.0, 5.0)
    assert np.allclose(cost.numpy(), expected, atol=1e-5)


# ------------------------------------------------------------------------------ point sampling
def test_point_sample_reads_pixel_centres_exactly_and_interpolates_between():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    ii, jj = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    centres = torch.stack([(jj.flatten() + 0.5) / 4, (ii.flatten() + 0.5) / 3], -1)[None]
    assert torch.allclose(point_sample(x, centres)[0, 0], x.flatten(), atol=1e-5)
    # halfway between pixel (1, 1) and (1, 2): their mean
    mid = torch.tensor([[[2.0 / 4, 1.5 / 3]]])
    assert point_sample(x, mid).item() == pytest.approx((5 + 6) / 2)


def test_uncertain_points_come_from_the_decision_boundary():
    torch.manual_seed(0)
    logits = torch.full((3, 1, 32, 32), 8.0)
    logits[:, :, :, :16] = 0.0  # the left half is maximally uncertain
    coords = uncertain_point_coords(logits, num_points=100, oversample_ratio=3, importance_sample_ratio=0.75)
    assert coords.shape == (3, 100, 2) and (coords >= 0).all() and (coords <= 1).all()
    # the 75 importance-sampled points lie in the left half (x < 0.5 minus the bilinear blend)
    assert (coords[:, :75, 0] < 15.5 / 32).all()
    # the 25 others are uniform: some of them fall in the right half
    assert (coords[:, 75:, 0] > 0.5).any()


def test_set_criterion_losses_follow_the_matching_and_no_object_weight():
    # one target of class 1 on a 1x2 map; query 1 predicts it well, so it is matched
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]]])
    masks = torch.tensor([[[[-2.0, -2.0]], [[LN3, -LN3]]]])
    targets = [{"labels": torch.tensor([1]), "masks": torch.tensor([[[1.0, 0.0]]])}]
    matcher = HungarianMatcher(1.0, 1.0, 1.0, num_points=0)
    crit = SetCriterion(2, matcher, mask_classification_weight_dict(1, 1, 1, 1), eos_coef=0.1,
                        num_points=0, mask_loss_type="sigmoid_ce")
    out = {"pred_logits": logits, "pred_masks": masks,
           "aux_outputs": [{"pred_logits": logits, "pred_masks": masks}]}
    losses = crit(out, targets)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}
    # query 0 -> no object (class 2, weight 0.1), query 1 -> class 1 (weight 1)
    ce0 = -F.log_softmax(logits[0, 0], -1)[2].item()
    ce1 = -F.log_softmax(logits[0, 1], -1)[1].item()
    assert losses["loss_ce"].item() == pytest.approx((0.1 * ce0 + 1.0 * ce1) / 1.1, rel=1e-5)
    # mask of query 1 (p = 3/4, 1/4) against (1, 0): BCE = ln(4/3), dice = 1 - 2.5/3
    assert losses["loss_mask"].item() == pytest.approx(math.log(4 / 3), rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(1 - 2.5 / 3, rel=1e-5)
    assert losses["loss_ce_0"].item() == pytest.approx(losses["loss_ce"].item())


# ------------------------------------------------------------------------------ deformable attention
def _bilinear(v, x, y):
    """Value of the (d, H, W) map ``v`` at normalised (x, y), zero outside, by hand."""
    d, h, w = v.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(d, dtype=v.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * v[:, yy, xx]
    return out


def test_pure_pytorch_deformable_attention_equals_a_bilinear_loop():
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[3, 4], [2, 2], [5, 3]])
    b, heads, d, lq, n_lvl, n_pts = 2, 2, 3, 4, 3, 2
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(b, s, heads, d, generator=g, dtype=torch.float64)
    loc = torch.rand(b, lq, heads, n_lvl, n_pts, 2, generator=g, dtype=torch.float64) * 1.3 - 0.15  # some outside
    attn = torch.rand(b, lq, heads, n_lvl, n_pts, generator=g, dtype=torch.float64)
    out = ms_deform_attn(value, shapes, loc, attn)
    starts = [0] + torch.cumsum(shapes[:, 0] * shapes[:, 1], 0).tolist()
    expected = torch.zeros(b, lq, heads * d, dtype=torch.float64)
    for bi in range(b):
        for q in range(lq):
            for h in range(heads):
                acc = torch.zeros(d, dtype=torch.float64)
                for lvl in range(n_lvl):
                    hh, ww = shapes[lvl].tolist()
                    vmap = value[bi, starts[lvl]:starts[lvl + 1], h].T.reshape(d, hh, ww)
                    for p in range(n_pts):
                        x, y = loc[bi, q, h, lvl, p].tolist()
                        acc += attn[bi, q, h, lvl, p] * _bilinear(vmap, x, y)
                expected[bi, q, h * d:(h + 1) * d] = acc
    assert torch.allclose(out, expected, atol=1e-10)


# ------------------------------------------------------------------------------ masked attention
def test_masked_cross_attention_ignores_masked_keys():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(d_model=8, nhead=2).eval()
    q, s = 2, 6
    tgt, memory, pos = torch.randn(q, 1, 8), torch.randn(s, 1, 8), torch.randn(s, 1, 8)
    mask = torch.zeros(1 * 2, q, s, dtype=torch.bool)
    mask[:, 0, 3:] = True  # query 0 may not see keys 3..5
    mask[:, 1, :2] = True  # query 1 may not see keys 0..1
    out = layer(tgt, memory, memory_mask=mask, pos=pos)
    memory2, pos2 = memory.clone(), pos.clone()
    memory2[3:] = torch.randn(3, 1, 8) * 10
    pos2[3:] = torch.randn(3, 1, 8)
    out2 = layer(tgt, memory2, memory_mask=mask, pos=pos2)
    assert torch.allclose(out[0], out2[0], atol=1e-6)  # query 0 does not see the change
    assert not torch.allclose(out[1], out2[1], atol=1e-3)  # query 1 does


def test_attention_mask_from_predictions():
    logits = torch.tensor([[[[1.0, -1.0], [-1.0, 1.0]], [[-1.0, -2.0], [-3.0, -4.0]]]])  # (1, 2, 2, 2)
    m = attention_mask_from_predictions(logits, (2, 2), num_heads=3)
    assert m.shape == (3, 2, 4)
    assert m[0, 0].tolist() == [False, True, True, False]  # blocked where sigmoid < 0.5
    assert m[0, 1].tolist() == [False] * 4  # an empty mask blocks nothing
    assert torch.equal(m[0], m[2])  # the same mask for every head


def test_masked_attention_decoder_ignores_features_outside_the_predicted_masks():
    torch.manual_seed(0)
    dec = MultiScaleMaskedTransformerDecoder(16, True, num_classes=3, hidden_dim=16, num_queries=4, nheads=2,
                                             dim_feedforward=32, dec_layers=1, pre_norm=False, mask_dim=8,
                                             enforce_input_project=False).eval()
    # every query's mask embedding is the same vector e; mask features are -e on the left half
    # and +e on the right half, so every query's first mask covers exactly the right half
    e = torch.randn(8)
    with torch.no_grad():
        dec.mask_embed.layers[-1].weight.zero_()
        dec.mask_embed.layers[-1].bias.copy_(e)
    mask_features = torch.zeros(1, 8, 8, 8)
    mask_features[..., :4] = -e[:, None, None]
    mask_features[..., 4:] = e[:, None, None]
    x = [torch.randn(1, 16, 4, 4), torch.randn(1, 16, 8, 8), torch.randn(1, 16, 2, 2)]
    out = dec(x, mask_features)
    left = [x[0].clone()] + x[1:]
    left[0][..., :2] = torch.randn(1, 16, 4, 2) * 5
    right = [x[0].clone()] + x[1:]
    right[0][..., 2:] = torch.randn(1, 16, 4, 2) * 5
    assert torch.allclose(dec(left, mask_features)["pred_logits"], out["pred_logits"], atol=1e-5)
    assert not torch.allclose(dec(right, mask_features)["pred_logits"], out["pred_logits"], atol=1e-3)


# ------------------------------------------------------------------------------ semantic inference
def test_semantic_inference_values_by_hand():
    cls = torch.tensor([[0.0, LN3, 0.0], [0.0, 0.0, 0.0]])  # softmax (1/5, 3/5, 1/5), (1/3, 1/3, 1/3)
    masks = torch.tensor([[[0.0]], [[LN3]]])  # sigmoid 1/2, 3/4
    sem = semantic_inference(cls, masks)
    assert sem.shape == (2, 1, 1)  # the no-object column is dropped
    assert sem[0, 0, 0].item() == pytest.approx(1 / 5 * 1 / 2 + 1 / 3 * 3 / 4)
    assert sem[1, 0, 0].item() == pytest.approx(3 / 5 * 1 / 2 + 1 / 3 * 3 / 4)


def _label_map(h=40, w=52, k=6, seed=0):
    rng = np.random.default_rng(seed)
    sem = np.zeros((h, w), np.int64)
    for c in range(1, k):
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
        sem[y:y + rng.integers(6, 20), x:x + rng.integers(6, 20)] = c
    return torch.as_tensor(sem)


def test_one_query_per_class_perfect_prediction_reproduces_the_label_map():
    k, q = 6, 9
    sem = _label_map(k=k)
    cls = torch.full((q, k + 1), -10.0)
    masks = torch.full((q, *sem.shape), -10.0)
    for c in range(k):
        cls[c, c] = 10.0
        masks[c][sem == c] = 10.0
    cls[k:, k] = 10.0  # the remaining queries predict "no object"
    assert torch.equal(semantic_inference(cls, masks).argmax(0), sem)


@pytest.fixture(scope="module")
def toy_maskformer():
    """The toy MaskFormer + SGR (6 classes), every inference on; classes 0 and 1 are things
    (dataset ids 10 and 20), the others stuff."""
    cfg = load_config(MASKFORMER_SGR, ["MODEL.DEVICE", "cpu", "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "True",
                                       "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True",
                                       "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.8",
                                       "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD", "0.8"])
    model = build_model(cfg).eval()
    model.metadata = Metadata(name="hand_made", thing_dataset_id_to_contiguous_id={10: 0, 20: 1})
    return model


@pytest.mark.parametrize("tasks", ["semantic", "all"])
def test_model_inference_crops_padding_and_resizes_to_the_requested_size(tasks, toy_maskformer):
    """Perfect predictions for a 40 x 52 image padded to 64 x 64: every output is the label map at
    the requested size (with panoptic and instance inference on, the masks are resized first, as
    the official code does)."""
    model = toy_maskformer
    on = tasks == "all"
    model.panoptic_on = model.instance_on = model.sem_seg_postprocess_before_inference = on
    try:
        _check_inference_of_perfect_predictions(model, on)
    finally:
        model.panoptic_on = model.instance_on = model.sem_seg_postprocess_before_inference = True


def _check_inference_of_perfect_predictions(model, on):
    k = model.sem_seg_head.num_classes
    sem = _label_map(k=k)
    q = model.num_queries
    cls = torch.full((1, q, k + 1), -10.0)
    cls[0, k:, k] = 10.0
    padded = torch.full((1, q, 64, 64), -10.0)
    for c in range(k):
        cls[0, c, c] = 10.0
        padded[0, c, :40, :52][sem == c] = 10.0
    images = ImageList(torch.zeros(1, 3, 64, 64), [(40, 52)])
    out = model.inference({"pred_logits": cls, "pred_masks": padded}, [{"height": 40, "width": 52}], images)[0]
    assert set(out) == ({"sem_seg", "panoptic_seg", "instances"} if on else {"sem_seg"})
    assert out["sem_seg"].shape == (k, 40, 52)
    assert torch.equal(out["sem_seg"].argmax(0), sem)
    big = model.inference({"pred_logits": cls, "pred_masks": padded}, [{"height": 80, "width": 104}], images)[0]
    assert torch.equal(big["sem_seg"].argmax(0)[::2, ::2], sem)
    if not on:
        return
    seg, info = out["panoptic_seg"]
    assert seg.dtype == torch.int32 and seg.shape == (40, 52)
    present = sorted(int(c) for c in sem.unique())
    assert [s["category_id"] for s in info] == present and [s["id"] for s in info] == list(range(1, len(present) + 1))
    assert [s["isthing"] for s in info] == [c in (0, 1) for c in present]
    categories = torch.tensor([-1] + [s["category_id"] for s in info])
    assert torch.equal(categories[seg.long()], sem)
    inst = out["instances"]
    assert inst.image_size == (40, 52)
    best = inst.scores.argsort(descending=True)[:2]  # the two thing queries, sure of class and mask
    assert sorted(inst.pred_classes[best].tolist()) == [0, 1] and (inst.pred_classes <= 1).all()
    for i in best:
        assert torch.equal(inst.pred_masks[i].bool(), sem == inst.pred_classes[i])


def _logits(rows, k):
    """(Q, K+1) class logits: row q is 0 but ``value`` at column ``cls``."""
    out = torch.zeros(len(rows), k + 1)
    for q, (cls, value) in enumerate(rows):
        out[q, cls] = value
    return out


def test_panoptic_inference_by_hand(toy_maskformer):
    """A 4 x 7 image, six queries (classes 0, 1 things, 3 stuff; thresholds 0.8):
    q0 thing 0 on columns 0-2, sure; q1 thing 0 on columns 1-3, less sure, so it keeps column 3
    only, 4 of its 12 pixels (< 0.8): dropped; q2 and q3 stuff 3 on the top / bottom of columns
    4-5: one segment; q4 "no object" and q5 (class 2 at probability 0.31 < 0.8) on column 6,
    which stays 0."""
    model, k = toy_maskformer, toy_maskformer.sem_seg_head.num_classes
    cls = _logits([(0, 10.0), (0, 5.0), (3, 10.0), (3, 10.0), (k, 10.0), (2, 1.0)], k)
    masks = torch.full((6, 4, 7), -5.0)
    masks[0, :, 0:3] = 5.0
    masks[1, :, 1:4] = 5.0
    masks[2, :2, 4:6] = 5.0
    masks[3, 2:, 4:6] = 5.0
    masks[4, :, 6] = 5.0
    masks[5, :, 6] = 5.0
    seg, info = model.panoptic_inference(cls, masks)
    expected = torch.tensor([[1, 1, 1, 0, 2, 2, 0]] * 4, dtype=torch.int32)
    assert seg.dtype == torch.int32 and torch.equal(seg, expected)
    assert info == [{"id": 1, "isthing": True, "category_id": 0}, {"id": 2, "isthing": False, "category_id": 3}]
    # nothing above the class threshold: an empty segmentation
    seg, info = model.panoptic_inference(_logits([(k, 10.0), (2, 1.0)], k), masks[4:])
    assert info == [] and not seg.any()


def test_instance_inference_by_hand(toy_maskformer):
    """The best (query, class) pairs by class probability, scored by probability x the mean mask
    probability inside the mask, masks binarised at 0; with panoptic inference on, only the
    thing classes among them; boxes all zero, as the official."""
    model, k = toy_maskformer, toy_maskformer.sem_seg_head.num_classes
    g = torch.Generator().manual_seed(0)
    cls = torch.randn(3, k + 1, generator=g) * 2
    masks = torch.randn(3, 5, 6, generator=g) * 3
    prob = cls.softmax(-1)[:, :k]
    pairs = sorted(((prob[q, c].item(), q, c) for q in range(3) for c in range(k)), reverse=True)
    for topk, panoptic in ((4, False), (4, True), (100, False)):
        model.test_topk_per_image, model.panoptic_on = topk, panoptic
        try:
            inst = model.instance_inference(cls, masks)
        finally:
            model.test_topk_per_image, model.panoptic_on = 100, True
        kept = [(p, q, c) for p, q, c in pairs[:topk] if c in (0, 1) or not panoptic]
        assert len(inst) == len(kept)  # topk 100 > 3 x 6 pairs: all of them
        order = inst.scores.argsort(descending=True).tolist()
        expected = []
        for p, q, c in kept:
            inside = masks[q] > 0
            expected.append((p * masks[q].sigmoid()[inside].sum().item() / (inside.sum().item() + 1e-6), q, c))
        expected.sort(reverse=True)
        assert inst.scores[order].tolist() == pytest.approx([e[0] for e in expected], rel=1e-5)
        assert inst.pred_classes[order].tolist() == [e[2] for e in expected]
        for i, (_, q, _) in zip(order, expected):
            assert torch.equal(inst.pred_masks[i], (masks[q] > 0).float())
        assert inst.pred_boxes.tensor.shape == (len(kept), 4) and not inst.pred_boxes.tensor.any()


def test_panoptic_inference_without_thing_classes_names_the_dataset(toy_maskformer):
    model = toy_maskformer
    model.metadata, things = Metadata(name="sgr_toy_sem_seg_val"), model.metadata
    try:
        with pytest.raises(ValueError, match="'sgr_toy_sem_seg_val'.*thing_dataset_id_to_contiguous_id.*PANOPTIC_ON"):
            model.panoptic_inference(_logits([(0, 10.0)], model.sem_seg_head.num_classes), torch.ones(1, 2, 2))
    finally:
        model.metadata = things


# ------------------------------------------------------------------------------ configs and models


def test_toy_baselines_have_no_sgr():
    for name in ("maskformer_r18.yaml", "mask2former_r18.yaml"):
        cfg = load_config(os.path.join(TOY, name), ["MODEL.DEVICE", "cpu"])
        assert cfg.MODEL.BACKBONE.NAME != "build_sgr_backbone"
        sgr_cfg = load_config(os.path.join(TOY, name.replace(".yaml", "_sgr.yaml")), ["MODEL.DEVICE", "cpu"])
        # the two differ in the backbone wrapper only
        assert sgr_cfg.MODEL.MASK_FORMER == cfg.MODEL.MASK_FORMER
        assert sgr_cfg.MODEL.SEM_SEG_HEAD == cfg.MODEL.SEM_SEG_HEAD
    model = build_model(load_config(os.path.join(TOY, "mask2former_r18.yaml"), ["MODEL.DEVICE", "cpu"]))
    assert model.sgr_criterion is None


@pytest.mark.parametrize("decoder, in_feature, strides", [
    ("BasePixelDecoder", "res5", [16, 16, 8]),
    ("TransformerEncoderPixelDecoder", "transformer_encoder", [16, 16, 8]),
    ("BasePixelDecoder", "pixel_embedding", [16, 16, 8]),
    ("MSDeformAttnPixelDecoder", "res5", [16, 16, 8]),
])
def test_pixel_decoders_and_transformer_inputs(decoder, in_feature, strides):
    """Every pixel decoder gives stride-4 mask features and three levels, coarsest first (res5 and
    res4 are both stride 16 in the toy backbone), and the standard decoder reads any of its inputs."""
    cfg = load_config(os.path.join(TOY, "maskformer_r18.yaml"), [
        "MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", decoder,
        "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE", in_feature, "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    images = torch.randn(2, 3, 64, 96)
    features = model.backbone(images)
    mask_features, enc, multi = model.sem_seg_head.pixel_decoder.forward_features(features)
    assert mask_features.shape == (2, cfg.MODEL.SEM_SEG_HEAD.MASK_DIM, 16, 24)
    assert [64 // m.shape[-2] for m in multi] == strides and [96 // m.shape[-1] for m in multi] == strides
    assert (enc is None) == (decoder == "BasePixelDecoder")
    out = model.sem_seg_head(features)
    q, k = cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    assert out["pred_logits"].shape == (2, q, k + 1) and out["pred_masks"].shape == (2, q, 16, 24)
    assert len(out["aux_outputs"]) == cfg.MODEL.MASK_FORMER.DEC_LAYERS - 1
    sem = torch.zeros(64, 96, dtype=torch.int64)
    sem[:, 40:] = 3
    inst = Instances((64, 96))
    inst.gt_classes = torch.tensor([0, 3])
    inst.gt_masks = torch.stack([sem == 0, sem == 3])
    batch = [{"image": (torch.rand(3, 64, 96) * 255).to(torch.uint8), "instances": inst} for _ in range(2)]
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values()) and "loss_sgr_union" not in losses


def test_training_without_instances_names_the_missing_key():
    cfg = load_config(MASKFORMER_SGR, ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg).train()
    batch = toy_batch(cfg, n=1)
    del batch[0]["instances"]
    with pytest.raises(KeyError, match="instances"):
        model(batch)


def test_deformable_pixel_decoder_runs_in_float32_under_autocast():
    """As the official ``@autocast(enabled=False)`` on MSDeformAttnPixelDecoder.forward_features
    ("deformable detr does not support half precision"), for whichever device autocast is on:
    under CPU bfloat16 autocast every linear and conv of the pixel decoder outputs float32, while
    the transformer decoder after it does run in bfloat16."""
    cfg = load_config(os.path.join(TOY, "mask2former_r18.yaml"), ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    dtypes = {}

    def record(name):
        return lambda module, args, output: dtypes.__setitem__(name, output.dtype)

    for prefix, part in (("pixel_decoder.", model.sem_seg_head.pixel_decoder), ("predictor.", model.sem_seg_head.predictor)):
        for name, m in part.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.register_forward_hook(record(prefix + name))
    # the backbone's outputs under autocast: bfloat16 (the decoder casts them to float32)
    features = {name: torch.randn(1, shape.channels, 64 // shape.stride, 64 // shape.stride, dtype=torch.bfloat16)
                for name, shape in model.backbone.output_shape().items()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.sem_seg_head(features)
    decoder = {k: v for k, v in dtypes.items() if k.startswith("pixel_decoder.")}
    # 3 input projections, 2 encoder layers x (4 linears of the deformable attention + 2 of the
    # FFN), the FPN step's lateral and output convs, the mask-feature conv
    assert len(decoder) == 3 + 2 * 6 + 2 + 1
    assert set(decoder.values()) == {torch.float32}, {k: v for k, v in decoder.items() if v != torch.float32}
    assert dtypes["predictor.class_embed"] == torch.bfloat16  # autocast was on
