"""The framework-agnostic SGR core against independent expectations (docs/method.md#the-sgr-component, docs/method.md#supervision-from-connected-components)."""
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
    instance_component_map,
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


def test_instance_components_split_touching_objects_and_keep_stuff_pieces():
    """MODEL.SGR.COMPONENTS: two touching objects of class 2 are one connected component but
    two instance components; the stuff class 1, cut in two by the class-3 object, stays two
    pieces either way; an object hidden in two pieces is one instance component."""
    sem = np.array([[1, 1, 3, 1, 1, 255],
                    [2, 2, 3, 1, 1, 1],
                    [2, 2, 3, 0, 0, 0],
                    [255, 255, 3, 2, 0, 2]], dtype=np.uint8)
    inst = np.array([[0, 0, 7, 0, 0, 0],
                     [4, 5, 7, 0, 0, 0],
                     [4, 5, 7, 0, 0, 0],
                     [0, 0, 7, 9, 0, 9]])  # objects 4 and 5 touch; 9 is in two pieces
    connected, classes = component_label_map(sem)
    assert classes.tolist() == [0, 1, 1, 2, 2, 2, 3]  # class 1: two pieces; class 2: {4, 5} and two 9s
    assert connected[1, 0] == connected[1, 1] == 3  # the touching objects: one component
    ids, inst_classes = instance_component_map(sem, inst)
    # instances first, by (class, id): (2, 4), (2, 5), (2, 9), (3, 7); then the connected rest
    assert inst_classes.tolist() == [2, 2, 2, 3, 0, 1, 1]
    assert ids.dtype == np.int32 and ids[0, 5] == -1 and ids[3, 0] == -1
    assert (ids[1:3, 0] == 0).all() and (ids[1:3, 1] == 1).all()
    assert ids[3, 3] == ids[3, 5] == 2 and (ids[:, 2] == 3).all()
    assert ids[2, 3] == ids[3, 4] == 4  # class 0
    assert (ids[0, :2] == 5).all() and (ids[0, 3:5] == 6).all() and (ids[1, 3:] == 6).all()  # class 1
    # no instance map: the connected components themselves
    np.testing.assert_array_equal(instance_component_map(sem, None)[0], connected)
    with pytest.raises(ValueError, match="does not match"):
        instance_component_map(sem, inst[:, :5])

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


# Two 4x6 images of component ids (-1 = ignore), read at a 2x3 resolution (2x2 pixels a cell):
# image 0 has 2 components and 5 ignored pixels (cell weights 1, 1, 1/2, 1, 3/4, 0), image 1 has
# 3 components (two of the same class) and 2 ignored pixels.
CRIT_LABELS = [np.array([[0, 0, 0, 1, 1, -1], [0, 0, 1, 1, 1, -1], [0, 0, -1, 1, -1, -1], [0, 0, 0, 1, -1, -1]]),
               np.array([[0, 0, 1, 1, 2, 2], [0, -1, 1, 1, 2, 2], [0, 0, 1, 2, 2, 2], [0, 0, 1, 2, 2, -1]])]
CRIT_CLASSES = [np.array([3, 1]), np.array([0, 2, 2])]
# (token, component) pairs of the hybrid matching with L = 4: image 0: 2 by Hungarian + 2 extra
# tokens on component 1; image 1: 3 + 1 extra on component 0 (checked below)
CRIT_MATCH = [[(0, 0), (2, 1), (1, 1), (3, 1)], [(0, 0), (1, 1), (2, 2), (3, 0)]]
CRIT_WEIGHTS = dict(union_weight=0.7, union_dice_weight=1.3, class_weight=0.9, diversity_weight=1.1,
                    loss_weight=0.4)


def _crit_inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 2, 3, generator=g) * 1.5
    logits[0, 0, :, 0] += 2
    logits[0, 1, :, 1:] += 2
    logits[0, 2, :, 1] += 1
    for k in range(3):
        logits[1, k, :, k] += 2
    return logits.softmax(1), torch.randn(2, 4, 4, generator=g)  # regions (2, K, 2, 3), token logits


def _expected_criterion(regions, token_logits, w):
    """The SGR loss written out with numpy loops (docs/method.md#supervision-from-connected-components): every union term
    is a BCE + w_dice · Dice weighted by each cell's labelled fraction, summed over the matched
    components of the batch and divided by their number; the class term is divided by the number
    of matched tokens; the diversity term by the number of pairs of tokens on different components."""
    union_sum = cls_sum = div_sum = 0.0
    n_comp = n_tok = n_pairs = 0
    for i, (lab, classes, match) in enumerate(zip(CRIT_LABELS, CRIT_CLASSES, CRIT_MATCH)):
        p = regions[i].double().numpy()  # (K, 2, 3)
        cells = lab.reshape(2, 2, 3, 2).transpose(0, 2, 1, 3).reshape(2, 3, 4)  # the 4 pixels of each cell
        frac = np.stack([(cells == j).mean(-1) for j in range(len(classes))])  # area fraction per component
        weight = frac.sum(0)
        target = np.divide(frac, weight, out=np.zeros_like(frac), where=weight > 0)
        for j in sorted({c for _, c in match}):
            u = sum(p[k] for k, c in match if c == j)
            bce = -(target[j] * np.log(u) + (1 - target[j]) * np.log(1 - u))
            bce = (bce * weight).sum() / weight.sum()
            dice = 1 - (2 * (u * target[j] * weight).sum() + 1) / ((u * weight).sum() + (target[j] * weight).sum() + 1)
            union_sum += bce + w["union_dice_weight"] * dice
            n_comp += 1
        for k, j in match:
            z = token_logits[i, k].double().numpy()
            cls_sum += -(z[classes[j]] - np.log(np.exp(z).sum()))
            n_tok += 1
        for a in range(len(match)):
            for b in range(a + 1, len(match)):
                if match[a][1] != match[b][1]:
                    pa, pb = p[match[a][0]].ravel(), p[match[b][0]].ravel()
                    div_sum += max(0.0, pa @ pb / (np.linalg.norm(pa) * np.linalg.norm(pb)))
                    n_pairs += 1
    assert (n_comp, n_tok, n_pairs) == (5, 8, 8)
    beta = w["loss_weight"]
    return {"loss_sgr_union": beta * w["union_weight"] * union_sum / n_comp,
            "loss_sgr_cls": beta * w["class_weight"] * cls_sum / n_tok,
            "loss_sgr_div": beta * w["diversity_weight"] * div_sum / n_pairs}


@pytest.mark.parametrize("target_kind", ["labels", "masks"])
def test_criterion_hand_computed_with_unequal_weights_and_counts(target_kind, device):
    """Catches: a dropped Dice term, the class term divided by components instead of tokens, the
    BCE divided by the pixel count instead of the summed pixel weights, a weight not applied
    (on ``--device``: the host and device copies of the matching)."""
    regions, token_logits = _crit_inputs()
    crit = SGRCriterion(num_matched=4, **CRIT_WEIGHTS)
    targets = []
    for lab, classes in zip(CRIT_LABELS, CRIT_CLASSES):
        labels = torch.as_tensor(lab, dtype=torch.int32)
        if target_kind == "labels":
            targets.append({"labels": labels, "classes": torch.as_tensor(classes)})
        else:
            masks = labels[None] == torch.arange(len(classes)).view(-1, 1, 1)
            targets.append({"masks": masks, "classes": torch.as_tensor(classes)})
    from sgr_d2.sgr import downsample_component_labels

    for i, (lab, classes) in enumerate(zip(CRIT_LABELS, CRIT_CLASSES)):
        soft, weight = downsample_component_labels(torch.as_tensor(lab), len(classes), (2, 3))
        tok, comp = match_tokens(pairwise_cost(regions[i].flatten(1), soft, weight), 4, crit.matching)
        assert list(zip(tok.tolist(), comp.tolist())) == CRIT_MATCH[i]
    on_device = [{k: v.to(device) for k, v in t.items()} for t in targets]
    got = crit({"region_maps": regions.to(device), "token_logits": token_logits.to(device)}, on_device)
    assert all(v.device.type == device.type for v in got.values())
    expected = _expected_criterion(regions, token_logits, CRIT_WEIGHTS)
    for key, value in expected.items():
        assert got[key].item() == pytest.approx(value, rel=1e-5), key


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


def test_union_loss_trains_the_region_path_down_to_the_input():
    """The union term sees the features only through P = softmax(region_conv(x)): its gradient
    with respect to x must be that of the same loss on softmax(conv(x)) written out here (a
    detached region path, region_conv(x.detach()), gives none), and the value path gets none."""
    m = SGRModule(8, num_tokens=4, token_dim=8, num_heads=2, ffn_dim=16, num_classes=4).train()
    x = torch.randn(2, 8, 4, 6, requires_grad=True)
    targets = [{"labels": torch.as_tensor(lab, dtype=torch.int32), "classes": torch.as_tensor(c)}
               for lab, c in zip(CRIT_LABELS, CRIT_CLASSES)]
    crit = SGRCriterion(num_matched=4, class_weight=0.0, diversity_weight=0.0, loss_weight=1.0)
    _, out = m(x)
    crit(out, targets)["loss_sgr_union"].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert m.value_conv[0].weight.grad is None  # the union term does not reach the value path
    x2 = x.detach().clone().requires_grad_(True)
    regions = torch.nn.functional.conv2d(x2, m.region_conv.weight, m.region_conv.bias).softmax(1)
    crit({"region_maps": regions}, targets)["loss_sgr_union"].backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-8)


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
