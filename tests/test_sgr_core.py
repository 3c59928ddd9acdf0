"""The framework-agnostic SGR core against independent expectations (SGR_SPEC §1–§2)."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from sgr_d2.sgr import (
    SGRCriterion,
    SGRModule,
    component_label_map,
    connected_components,
    match_tokens,
    pairwise_cost,
    weighted_bce,
    weighted_dice,
)

EIGHT = np.ones((3, 3), dtype=int)


def _random_label_map(rng, shape=(37, 41), classes=5, blocks=(6, 7), ignore_frac=0.05):
    small = rng.integers(0, classes, size=blocks)
    sem = np.kron(small, np.ones((shape[0] // blocks[0] + 1, shape[1] // blocks[1] + 1), dtype=int))
    sem = sem[: shape[0], : shape[1]].astype(np.uint8)
    sem[rng.random(shape) < ignore_frac] = 255
    return sem


# ------------------------------------------------------------------ connected components
@pytest.mark.parametrize("seed", range(6))
def test_components_match_scipy_label_per_class(seed):
    rng = np.random.default_rng(seed)
    sem = _random_label_map(rng)
    masks, classes = connected_components(sem, ignore_label=255)
    assert masks.dtype == torch.bool and masks.shape[1:] == sem.shape
    for c in range(5):
        ref, n = ndimage.label(sem == c, structure=EIGHT)
        ours = masks[classes == c].numpy()
        assert len(ours) == n
        # every scipy component is exactly one of ours
        ref_sets = sorted(tuple(np.flatnonzero(ref == i)) for i in range(1, n + 1))
        our_sets = sorted(tuple(np.flatnonzero(m)) for m in ours)
        assert ref_sets == our_sets


def test_components_partition_the_labelled_pixels_and_skip_ignore():
    sem = np.array([[0, 0, 255, 1],
                    [255, 0, 255, 1],
                    [1, 255, 0, 255]], dtype=np.uint8)
    masks, classes = connected_components(sem)
    # class 0: {(0,0),(0,1),(1,1),(2,2)} are 8-connected through (1,1)-(2,2): one component
    # class 1: {(0,3),(1,3)} and {(2,0)}: two components
    assert sorted(classes.tolist()) == [0, 1, 1]
    assert (masks.sum(0) <= 1).all()
    assert (masks.any(0).numpy() == (sem != 255)).all()


def test_components_all_ignore_and_other_dtypes():
    masks, classes = connected_components(np.full((5, 6), 255, np.uint8))
    assert masks.shape == (0, 5, 6) and classes.shape == (0,)
    sem = torch.tensor([[3, 3, 7], [7, 7, 3]], dtype=torch.int64)
    masks, classes = connected_components(sem, ignore_label=255)
    # 3 at (0,0),(0,1),(1,2): (0,1)-(1,2) touch diagonally; 7 at (0,2),(1,0),(1,1) likewise
    assert sorted(classes.tolist()) == [3, 7]
    labels, cls2 = component_label_map(sem.numpy())
    for j in range(len(cls2)):
        assert (masks[j].numpy() == (labels == j)).all()


def test_components_reject_bad_input():
    with pytest.raises(ValueError, match="label map"):
        connected_components(np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(ValueError, match="integer"):
        connected_components(np.zeros((3, 4), np.float32))



@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (2, 2), (64, 80)])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_component_label_map_numbers_like_scipy(shape, dtype):
    # Speckled maps (many tiny regions touching only at corners) against scipy.ndimage.label,
    # including the numbering: by class, then in scipy's (raster) order inside the class.
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    sem = rng.integers(0, 4, size=shape).astype(dtype)
    sem[rng.random(shape) < 0.1] = 255
    labels, classes = component_label_map(sem)
    assert labels.dtype == np.int32 and labels.shape == shape
    assert (labels[sem == 255] == -1).all()
    assert list(classes) == sorted(classes)
    for c in np.unique(sem[sem != 255]):
        ref, n = ndimage.label(sem == c, structure=EIGHT)
        ids = np.flatnonzero(classes == c)
        assert len(ids) == n
        ours = np.where(sem == c, labels - ids[0] + 1, 0)
        np.testing.assert_array_equal(ours, ref)
    masks, cls2 = connected_components(sem)
    np.testing.assert_array_equal(cls2.numpy(), classes)
    np.testing.assert_array_equal(masks.numpy(), labels[None] == np.arange(len(classes))[:, None, None])


def test_components_diagonal_links_do_not_cross_classes():
    # a checkerboard: each class is one diagonal chain per anti-diagonal direction
    sem = (np.indices((6, 6)).sum(0) % 2).astype(np.uint8)
    _, classes = component_label_map(sem)
    assert sorted(classes.tolist()) == [0, 1]
    sem[:, 3] = 255  # the ignore column cuts every diagonal chain: 2 components per class
    _, classes = component_label_map(sem)
    assert sorted(classes.tolist()) == [0, 0, 1, 1]

# ------------------------------------------------------------------ cost and matching
def test_pairwise_cost_hand_computed():
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    m = torch.tensor([[1.0, 0.0]])
    c = pairwise_cost(p, m, dice_weight=1.0)
    bce0 = -(math.log(0.9) + math.log(0.9)) / 2
    dice0 = 1 - (2 * 0.9 + 1) / (1.0 + 1.0 + 1)
    bce1 = -(math.log(0.2) + math.log(0.2)) / 2
    dice1 = 1 - (2 * 0.2 + 1) / (1.0 + 1.0 + 1)
    assert c.shape == (2, 1)
    assert c[0, 0].item() == pytest.approx(bce0 + dice0, rel=1e-5)
    assert c[1, 0].item() == pytest.approx(bce1 + dice1, rel=1e-5)
    # an ignored pixel (weight 0) does not count
    w = torch.tensor([1.0, 0.0])
    c = pairwise_cost(p, m, weight=w)
    assert c[0, 0].item() == pytest.approx(-math.log(0.9) + 1 - (2 * 0.9 + 1) / (0.9 + 1 + 1), rel=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_reaches_the_optimum(seed):
    rng = np.random.default_rng(seed)
    k, n = 7, 4
    cost = torch.tensor(rng.random((k, n)), dtype=torch.float32)
    tok, comp = match_tokens(cost, num_matched=n, mode="hungarian")
    ours = cost[tok, comp].sum().item()
    r, c = linear_sum_assignment(cost.numpy())
    assert ours == pytest.approx(cost.numpy()[r, c].sum(), abs=1e-6)
    # and the brute-force optimum over every injective assignment
    brute = min(sum(cost[t, j].item() for j, t in enumerate(perm)) for perm in itertools.permutations(range(k), n))
    assert ours == pytest.approx(brute, abs=1e-5)
    assert len(set(tok.tolist())) == len(tok) == n and sorted(comp.tolist()) == list(range(n))


@pytest.mark.parametrize("k,n,l", [(10, 3, 6), (10, 6, 6), (12, 9, 4), (8, 1, 8)])
def test_hybrid_matches_exactly_num_matched(k, n, l):
    rng = np.random.default_rng(k * 100 + n * 10 + l)
    cost = torch.tensor(rng.random((k, n)), dtype=torch.float32)
    tok, comp = match_tokens(cost, num_matched=l, mode="hybrid")
    assert len(tok) == l and len(set(tok.tolist())) == l  # L distinct tokens
    if l >= n:
        assert set(comp.tolist()) == set(range(n))  # every component gets one
        # the extra tokens are the unmatched ones with the lowest min-cost, each to its argmin
        r, c = linear_sum_assignment(cost.numpy())
        free = [t for t in range(k) if t not in set(r.tolist())]
        best = sorted(free, key=lambda t: cost[t].min().item())[: l - n]
        extra = tok[n:].tolist()
        assert sorted(extra) == sorted(best)
        for t, j in zip(tok[n:].tolist(), comp[n:].tolist()):
            assert j == int(cost[t].argmin())


def test_greedy_takes_the_lowest_min_costs():
    cost = torch.tensor([[0.5, 0.9], [0.1, 0.2], [0.7, 0.05], [0.3, 0.4]])
    tok, comp = match_tokens(cost, num_matched=2, mode="greedy")
    assert tok.tolist() == [2, 1] and comp.tolist() == [1, 0]


def test_match_tokens_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        match_tokens(torch.zeros(3, 2), 2, mode="nearest")
    with pytest.raises(ValueError, match="num_matched"):
        match_tokens(torch.zeros(3, 2), 4)
    tok, comp = match_tokens(torch.zeros(3, 0), 2)
    assert len(tok) == len(comp) == 0


# ------------------------------------------------------------------ losses
def _one_hot_regions(assign, k):
    """(H, W) token index per pixel -> (1, K, H, W) one-hot region maps."""
    a = torch.as_tensor(assign)
    return torch.nn.functional.one_hot(a, k).permute(2, 0, 1)[None].float()


def test_bce_and_dice_hand_computed():
    pred = torch.tensor([[0.25, 0.75]])
    tgt = torch.tensor([[0.0, 1.0]])
    w = torch.tensor([1.0, 1.0])
    assert weighted_bce(pred, tgt, w).item() == pytest.approx(-math.log(0.75), rel=1e-5)
    assert weighted_dice(pred, tgt, w).item() == pytest.approx(1 - (2 * 0.75 + 1) / (1.0 + 1.0 + 1), rel=1e-6)


def test_union_loss_zero_for_perfect_union_and_positive_otherwise():
    # 8x8 map, two components (left half class 0, right half class 1) and 4 tokens:
    # tokens 0,1 tile the left half, tokens 2,3 the right half.
    assign = np.zeros((8, 8), dtype=np.int64)
    assign[:4, :4], assign[4:, :4], assign[:4, 4:], assign[4:, 4:] = 0, 1, 2, 3
    regions = _one_hot_regions(assign, 4)
    sem = np.zeros((8, 8), np.uint8)
    sem[:, 4:] = 1
    masks, classes = connected_components(sem)
    crit = SGRCriterion(num_matched=4, loss_weight=1.0, class_weight=0.0, diversity_weight=0.0)
    loss = crit({"region_maps": regions}, [{"masks": masks, "classes": classes}])
    assert loss["loss_sgr_union"].item() < 1e-4
    blurred = 0.7 * regions + 0.3 / 4
    worse = crit({"region_maps": blurred}, [{"masks": masks, "classes": classes}])
    assert worse["loss_sgr_union"].item() > 0.1


def test_class_and_diversity_terms_hand_computed():
    assign = np.zeros((4, 4), dtype=np.int64)
    assign[:, 2:] = 1
    regions = _one_hot_regions(assign, 2)
    sem = np.zeros((4, 4), np.uint8)
    sem[:, 2:] = 1
    masks, classes = connected_components(sem)
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    crit = SGRCriterion(num_matched=2, loss_weight=0.25)
    out = crit({"region_maps": regions, "token_logits": logits}, [{"masks": masks, "classes": classes}])
    ce = (-torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0] - torch.log_softmax(torch.tensor([0.0, 1.0]), 0)[1]) / 2
    assert out["loss_sgr_cls"].item() == pytest.approx(0.25 * ce.item(), rel=1e-5)
    assert out["loss_sgr_div"].item() == pytest.approx(0.0, abs=1e-7)  # disjoint regions
    same = torch.full((1, 2, 4, 4), 0.5)
    out = crit({"region_maps": same}, [{"masks": masks, "classes": classes}])
    assert out["loss_sgr_div"].item() == pytest.approx(0.25 * 1.0, rel=1e-5)  # cos = 1


@pytest.mark.parametrize("size,reduced", [((32, 48), (4, 6)), ((30, 45), (4, 6))])
def test_label_map_downsampling_equals_mask_interpolation(size, reduced):
    from sgr_d2.sgr import downsample_component_labels, downsample_components

    sem = _random_label_map(np.random.default_rng(3), shape=size)
    masks, classes = connected_components(sem)
    labels, _ = component_label_map(sem)
    t1, w1 = downsample_components(masks, reduced)
    t2, w2 = downsample_component_labels(torch.from_numpy(labels), len(classes), reduced)
    assert torch.allclose(t1, t2, atol=1e-6) and torch.allclose(w1, w2, atol=1e-6)
    # weights are the labelled fraction of each reduced cell
    if size[0] % reduced[0] == 0:
        f = (size[0] // reduced[0]) * (size[1] // reduced[1])
        valid = torch.from_numpy(sem != 255).float()
        expected = valid.view(reduced[0], size[0] // reduced[0], reduced[1], size[1] // reduced[1]).sum((1, 3)) / f
        assert torch.allclose(w2, expected.flatten(), atol=1e-6)


def test_all_ignore_gives_zero_loss_not_nan():
    m = SGRModule(16, num_tokens=8, token_dim=16, num_heads=2, ffn_dim=16, num_classes=3)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    _, outputs = m(x)
    empty = {"masks": torch.zeros((0, 48, 48), dtype=torch.bool), "classes": torch.zeros(0, dtype=torch.int64)}
    losses = SGRCriterion(num_matched=4)(outputs, [empty, empty])
    total = sum(losses.values())
    assert all(v.item() == 0.0 for v in losses.values())
    total.backward()
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------ the module
def test_module_starts_as_identity_and_regions_are_a_softmax():
    m = SGRModule(12, num_tokens=5, token_dim=8, num_heads=2, ffn_dim=16).eval()
    x = torch.randn(2, 12, 7, 9)
    y, out = m(x)
    assert torch.equal(y, x)  # zero-initialised last norm
    p = out["region_maps"]
    assert p.shape == (2, 5, 7, 9)
    assert torch.allclose(p.sum(1), torch.ones(2, 7, 9), atol=1e-6)


def test_tokens_are_region_weighted_means():
    m = SGRModule(4, num_tokens=3, token_dim=4, num_layers=0, num_heads=1).eval()
    x = torch.randn(1, 4, 5, 5)
    _, out = m(x)
    p = out["region_maps"][0].flatten(1)
    v = m.value_conv(x)[0].flatten(1)  # (C, HW)
    expected = (p @ v.T) / (p.sum(1, keepdim=True) + m.eps)
    assert torch.allclose(out["tokens"][0], expected, atol=1e-5)


def test_module_rejects_wrong_input():
    m = SGRModule(8, num_tokens=4, token_dim=8, num_heads=2)
    with pytest.raises(ValueError, match="feature map"):
        m(torch.randn(1, 7, 4, 4))
    with pytest.raises(ValueError, match="divisible"):
        SGRModule(8, token_dim=10, num_heads=4)
