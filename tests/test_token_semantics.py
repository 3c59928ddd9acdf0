"""Token-semantics metrics (docs/method.md#token-semantics-metrics-s_c-d_c-s_i-d_i) against hand-computed values."""
import sgr_d2  # noqa: F401  (before any detectron2 import)

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from sgr_d2.evaluation import (
    TokenSemanticsEvaluator,
    image_token_semantics,
    instance_segments,
    read_instance_map,
    read_label_map,
    semantics_from_masses,
    summarize,
)

LN2, LN3 = math.log(2), math.log(3)


def entropy(*p):
    return -sum(x * math.log(x) for x in p if x > 0)


def one_hot_tokens(assign, k):
    """Region maps (k, H, W) with P_k(x) = 1 where assign(x) == k: each pixel wholly one token's."""
    assign = torch.as_tensor(assign)
    return torch.nn.functional.one_hot(assign, k).permute(2, 0, 1).float()


# ----------------------------------------------------------------------------- S_C, D_C
def test_token_inside_one_class_scores_one():
    labels = np.array([[0, 0, 1, 1]] * 4)
    p = one_hot_tokens([[0, 0, 1, 1]] * 4, 2)  # token 0 on class 0, token 1 on class 1
    r = image_token_semantics(p, labels)
    assert r["S_C"] == pytest.approx(1.0)
    assert r["D_C"] == pytest.approx(1.0)  # two dominant classes / two classes
    assert r["num_classes"] == 2


def test_token_spread_uniformly_scores_zero():
    labels = np.array([[0, 0, 1, 1, 2, 2]] * 2)  # three classes of equal area
    p = torch.ones(1, 2, 6)  # one token, the same weight everywhere
    r = image_token_semantics(p, labels)
    assert r["S_C"] == pytest.approx(0.0, abs=1e-12)
    # h = (1/3, 1/3, 1/3): the tie goes to the lowest class, one dominant class of three
    assert r["D_C"] == pytest.approx(1 / 3)


def test_partial_mixture_matches_the_entropy_formula():
    labels = np.array([[0, 0, 0, 1]])
    p = torch.ones(1, 1, 4)  # h = (3/4, 1/4)
    r = image_token_semantics(p, labels)
    assert r["S_C"] == pytest.approx(1 - entropy(0.75, 0.25) / LN2)  # = 0.18872...
    assert r["S_C"] == pytest.approx(0.188722, abs=1e-6)


def test_mean_over_tokens_of_a_pure_and_a_uniform_token():
    labels = np.array([[0, 0, 1, 1]])
    p = torch.zeros(2, 1, 4)
    p[0, 0, :2] = 0.5  # token 0 only on class 0 (half of each pixel)
    p[1] = 0.5  # token 1 everywhere: with token 0, both halves sum to 1 on class 0
    p[1, 0, :2] = 0.5
    p[1, 0, 2:] = 1.0  # token 1: 0.5, 0.5, 1, 1 -> h = (1/3, 2/3)
    r = image_token_semantics(p, labels)
    expected = (1.0 + (1 - entropy(1 / 3, 2 / 3) / LN2)) / 2
    assert r["S_C"] == pytest.approx(expected)


def test_d_c_counts_distinct_dominant_classes():
    labels = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    # tokens 0 and 1 share class 0; tokens 2 and 3 each hold one pixel of class 1 and two of
    # class 2: four tokens, two dominant classes (0 and 2), class 1 dominated by none
    assign = [[0, 1, 0, 3, 2, 2, 2, 3, 3]]
    r = image_token_semantics(one_hot_tokens(assign, 4), labels)
    assert r["D_C"] == pytest.approx(2 / 3)
    expected_s = (1 + 1 + 2 * (1 - entropy(1 / 3, 2 / 3) / LN3)) / 4
    assert r["S_C"] == pytest.approx(expected_s)


def test_tokens_without_enough_mass_do_not_count_in_d():
    labels = np.array([[0, 0, 0, 0, 1, 1, 1, 2]])
    p = torch.zeros(3, 1, 8)
    p[0, 0, :4] = 1.0
    p[1, 0, 4:] = 1.0
    p[2, 0, 7] = 0.02  # mass 0.02 on class 2; an equal share is (8.02 / 3): 0.02 < 0.1 · 2.67
    r = image_token_semantics(p, labels)
    assert r["D_C"] == pytest.approx(2 / 3)  # token 2 carries no mass: class 2 uncovered
    assert r["tokens_with_mass_C"] == 2
    # it still counts in S_C (its histogram is normalised): it sees one class only
    assert r["S_C"] == pytest.approx((1 + (1 - entropy(3 / 4, 1 / 4) / LN3) + 1) / 3)
    r0 = image_token_semantics(p, labels, min_mass_fraction=0.0)
    assert r0["D_C"] == pytest.approx(1.0)
    # the threshold is a fraction of an equal share: at f = 0.007, 0.02 >= 0.007 · 8.02 / 3
    assert image_token_semantics(p, labels, min_mass_fraction=0.007)["D_C"] == pytest.approx(1.0)
    assert image_token_semantics(p, labels, min_mass_fraction=0.008)["D_C"] == pytest.approx(2 / 3)


def test_ignore_pixels_are_dropped():
    labels = np.array([[0, 0, 255, 255, 1, 1]])
    # token 0 holds class 0 and the ignore pixels; token 1 holds class 1
    r = image_token_semantics(one_hot_tokens([[0, 0, 0, 0, 1, 1]], 2), labels)
    assert r["S_C"] == pytest.approx(1.0) and r["D_C"] == pytest.approx(1.0)
    # a token living only on ignore pixels has no mass: left out of S_C
    p = torch.zeros(3, 1, 6)
    p[0, 0, :2] = 1
    p[1, 0, 4:] = 1
    p[2, 0, 2:4] = 1
    r = image_token_semantics(p, labels)
    assert r["S_C"] == pytest.approx(1.0) and r["tokens_with_mass_C"] == 2


def test_images_with_one_class_are_skipped():
    labels = np.zeros((4, 4), np.int64)
    labels[0, 0] = 255
    r = image_token_semantics(torch.rand(3, 2, 2), labels)
    assert math.isnan(r["S_C"]) and math.isnan(r["D_C"])
    assert math.isnan(r["S_I"]) and math.isnan(r["D_I"])  # one component as well
    # dataset averages leave the skipped image out
    good = image_token_semantics(one_hot_tokens([[0, 1]], 2), np.array([[0, 1]]))
    avg = summarize([r, good])
    assert avg["S_C"] == pytest.approx(1.0) and avg["D_C"] == pytest.approx(1.0)
    assert math.isnan(summarize([r])["S_C"])


def test_region_maps_are_resized_bilinearly_to_the_labels():
    labels = np.array([[0, 0, 1, 1]] * 4)
    p = torch.zeros(2, 2, 2)
    p[0, :, 0] = 1  # token 0 on the left feature column, token 1 on the right
    p[1, :, 1] = 1
    # bilinear, align_corners=False: a 2 -> 4 resize samples x = -0.25, 0.25, 0.75, 1.25, so
    # token 0 becomes 1, 0.75, 0.25, 0 across each row: h_0 = (1.75, 0.25) / 2
    r = image_token_semantics(p, labels)
    assert r["S_C"] == pytest.approx(1 - entropy(0.875, 0.125) / LN2)
    assert r["D_C"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- S_I, D_I
TWO_BLOBS = np.array([
    [0, 0, 0, 0, 0, 0],
    [0, 1, 1, 0, 1, 1],
    [0, 1, 1, 0, 1, 1],
    [0, 0, 0, 0, 0, 0],
])


def test_instances_from_connected_components():
    ids, classes = instance_segments(TWO_BLOBS)
    assert sorted(classes.tolist()) == [0, 1, 1]  # background + two separate blobs of class 1
    blob_a = ids[1, 1]
    assert ids[2, 2] == blob_a and ids[1, 4] != blob_a and ids[0, 0] not in (blob_a, ids[1, 4])
    # one token per segment: perfectly instance-semantic
    assign = np.where(TWO_BLOBS == 0, 0, np.where(np.arange(6)[None] < 3, 1, 2))
    r = image_token_semantics(one_hot_tokens(assign, 3), TWO_BLOBS)
    assert r["S_I"] == pytest.approx(1.0) and r["D_I"] == pytest.approx(1.0)
    assert r["num_instances"] == 3


def test_a_class_semantic_token_over_two_instances():
    # token 1 covers both blobs equally: one class (S_C term 1) but two of three instances
    assign = np.where(TWO_BLOBS == 0, 0, 1)
    r = image_token_semantics(one_hot_tokens(assign, 2), TWO_BLOBS)
    assert r["S_C"] == pytest.approx(1.0)
    assert r["S_I"] == pytest.approx((1 + (1 - LN2 / LN3)) / 2)  # token 1: h = (0, 1/2, 1/2)
    assert r["D_I"] == pytest.approx(2 / 3)  # background and the first blob only


def test_instance_map_splits_touching_instances():
    labels = np.array([[0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0]])
    inst = np.array([[0, 0, 0, 0, 0, 0], [0, 7, 7, 9, 9, 0]])  # two touching objects of class 1
    assert len(instance_segments(labels)[1]) == 2  # components: background, one merged blob
    ids, classes = instance_segments(labels, inst)
    assert sorted(classes.tolist()) == [0, 1, 1]
    assert ids[1, 1] == ids[1, 2] != ids[1, 3] and ids[0, 0] not in (ids[1, 1], ids[1, 3])
    assign = np.array([[0, 0, 0, 0, 0, 0], [0, 1, 1, 2, 2, 0]])
    r = image_token_semantics(one_hot_tokens(assign, 3), labels, inst)
    assert r["S_I"] == pytest.approx(1.0) and r["D_I"] == pytest.approx(1.0)
    # without the instance map the two tokens see one component each: S_I still 1, D_I = 2/2
    r2 = image_token_semantics(one_hot_tokens(assign, 3), labels)
    assert r2["num_instances"] == 2 and r2["D_I"] == pytest.approx(1.0)
    # one token over both instances: D_I with the map is 2/3
    r3 = image_token_semantics(one_hot_tokens(np.where(labels == 1, 1, 0), 2), labels, inst)
    assert r3["D_I"] == pytest.approx(2 / 3)
    assert r3["S_I"] == pytest.approx((1 + 1 - LN2 / LN3) / 2)


def test_one_class_with_two_instances_gives_instance_metrics_only():
    labels = np.array([[1, 1, 255, 1, 1]])  # two components of one class, split by ignore
    r = image_token_semantics(one_hot_tokens([[0, 0, 0, 1, 1]], 2), labels)
    assert math.isnan(r["S_C"]) and math.isnan(r["D_C"])
    assert r["S_I"] == pytest.approx(1.0) and r["D_I"] == pytest.approx(1.0)


def test_semantics_from_masses_directly():
    m = torch.tensor([[3.0, 1.0], [0.0, 0.0], [2.0, 2.0]])  # token 1 has no mass
    s, d, n = semantics_from_masses(m)
    assert s == pytest.approx(((1 - entropy(0.75, 0.25) / LN2) + 0.0) / 2)
    assert d == pytest.approx(1 / 2) and n == 2  # both carrying tokens' dominant segment is 0


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors(tmp_path):
    labels = np.zeros((4, 4), np.int64)
    with pytest.raises(ValueError, match=r"\(K, h, w\)"):
        image_token_semantics(torch.rand(4, 4), labels)
    with pytest.raises(ValueError, match="non-negative"):
        image_token_semantics(-torch.rand(2, 4, 4), labels)
    with pytest.raises(ValueError, match="NaN"):
        image_token_semantics(torch.full((2, 4, 4), float("nan")), labels)
    with pytest.raises(ValueError, match="does not match"):
        image_token_semantics(torch.rand(2, 4, 4), labels, np.zeros((3, 4), np.int64))
    with pytest.raises(ValueError, match="integers"):
        image_token_semantics(torch.rand(2, 4, 4), labels.astype(np.float32))
    bad = tmp_path / "bad.png"
    Image.fromarray(np.array([[0, 9]], np.uint8)).save(bad)
    with pytest.raises(ValueError, match=r"bad\.png.*\[9\]"):
        read_label_map(str(bad), num_classes=6)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_label_map(str(tmp_path / "missing.png"))


def test_cityscapes_instance_ids_below_1000_are_not_instances(tmp_path):
    ids = np.array([[7, 26001, 26002, 0]], np.uint16)  # road, two cars, unlabelled (16-bit PNG)
    path = tmp_path / "x_gtFine_instanceIds.png"
    Image.fromarray(ids).save(path)
    assert read_instance_map(str(path)).tolist() == [[0, 26001, 26002, 0]]
    other = tmp_path / "x_instances.png"
    Image.fromarray(np.array([[0, 3, 4, 0]], np.uint8)).save(other)
    assert read_instance_map(str(other)).tolist() == [[0, 3, 4, 0]]
    with pytest.raises(ValueError, match="x_instances.png"):
        read_instance_map(str(other), shape=(2, 4))


# ----------------------------------------------------------------------------- evaluator
@pytest.fixture
def tiny_dataset(tmp_path):
    """Two 4×6 images: TWO_BLOBS (with an instance file), and one of a single class."""
    name = "sgr_test_token_semantics_tiny"
    dicts = []
    for i, (lab, inst) in enumerate([(TWO_BLOBS, TWO_BLOBS * (1 + (np.arange(6)[None] >= 3))),
                                     (np.zeros((4, 6), np.int64), None)]):
        img = tmp_path / f"{i}.jpg"
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(img)
        sem = tmp_path / f"{i}.png"
        Image.fromarray(lab.astype(np.uint8)).save(sem)
        d = {"file_name": str(img), "sem_seg_file_name": str(sem), "height": 4, "width": 6}
        if inst is not None:
            Image.fromarray(inst.astype(np.uint8)).save(tmp_path / f"{i}_inst.png")
            d["instance_file_name"] = str(tmp_path / f"{i}_inst.png")
        dicts.append(d)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(stuff_classes=["bg", "thing"], ignore_label=255)
    yield name, dicts
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_evaluator_averages_over_images_and_writes_json(tiny_dataset, tmp_path):
    name, dicts = tiny_dataset
    ev = TokenSemanticsEvaluator(name, distributed=True, output_dir=str(tmp_path / "inference"))
    ev.reset()
    class_token = torch.as_tensor(np.where(TWO_BLOBS == 0, 0, 1))  # token 1 over both blobs
    # region maps at half resolution would blur; give them at label resolution here
    outputs = [{"sem_seg": torch.zeros(2, 4, 6), "sgr_regions": one_hot_tokens(class_token, 2)},
               {"sem_seg": torch.zeros(2, 4, 6), "sgr_regions": torch.rand(2, 4, 6)}]
    ev.process([{"file_name": d["file_name"]} for d in dicts], outputs)
    res = ev.evaluate()["token_semantics"]
    # image 0 is the only one with two classes / instances; image 1 is skipped
    assert res["S_C"] == pytest.approx(1.0) and res["D_C"] == pytest.approx(1.0)
    assert res["S_I"] == pytest.approx((1 + 1 - LN2 / LN3) / 2)
    assert res["D_I"] == pytest.approx(2 / 3)
    record = json.loads((tmp_path / "inference" / "token_semantics.json").read_text())
    assert record["num_images"] == 2 and record["images_S_C"] == 1 and record["num_tokens"] == 2
    assert record["S_I"] == pytest.approx(res["S_I"])


def test_evaluator_uses_the_instance_file(tiny_dataset):
    name, dicts = tiny_dataset
    # instance file splits the image as the components do; a token per instance: S_I = 1
    assign = np.where(TWO_BLOBS == 0, 0, np.where(np.arange(6)[None] < 3, 1, 2))
    ev = TokenSemanticsEvaluator(name, distributed=False)
    ev.reset()
    ev.process([{"file_name": dicts[0]["file_name"]}], [{"sgr_regions": one_hot_tokens(assign, 3)}])
    res = ev.evaluate()["token_semantics"]
    assert res["S_I"] == pytest.approx(1.0) and res["D_I"] == pytest.approx(1.0)


def test_evaluator_without_regions_returns_nothing(tiny_dataset):
    name, dicts = tiny_dataset
    ev = TokenSemanticsEvaluator(name)
    ev.reset()
    ev.process([{"file_name": dicts[0]["file_name"]}], [{"sem_seg": torch.zeros(2, 4, 6)}])
    assert ev.evaluate() == {}
    ev.reset()
    with pytest.raises(KeyError, match="not in dataset"):
        ev.process([{"file_name": "/nowhere.jpg"}], [{"sgr_regions": torch.rand(2, 4, 6)}])


def test_trainer_adds_the_evaluator_when_enabled(tmp_path):
    from conftest import TOY_BASE, tiny_toy_cfg

    from detectron2.evaluation import DatasetEvaluators

    from sgr_d2.engine import Trainer
    from sgr_d2.evaluation import SGRSemSegEvaluator

    cfg = tiny_toy_cfg()
    plain = Trainer.build_evaluator(cfg, "sgr_toy_sem_seg_val", output_folder=str(tmp_path))
    assert isinstance(plain, SGRSemSegEvaluator)
    cfg.TEST.TOKEN_SEMANTICS = True
    both = Trainer.build_evaluator(cfg, "sgr_toy_sem_seg_val", output_folder=str(tmp_path))
    assert isinstance(both, DatasetEvaluators)
    # both evaluate one prediction, and the token metrics are written into the output folder
    d = DatasetCatalog.get("sgr_toy_sem_seg_val")[0]
    h, w = np.asarray(Image.open(d["sem_seg_file_name"])).shape
    both.reset()
    both.process([{"file_name": d["file_name"]}],
                 [{"sem_seg": torch.rand(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, h, w),
                   "sgr_regions": torch.rand(4, h, w).softmax(0)}])
    res = both.evaluate()
    assert "mIoU" in res["sem_seg"] and "S_C" in res["token_semantics"], res.keys()
    assert (tmp_path / "token_semantics.json").is_file()
    base = tiny_toy_cfg(TOY_BASE)
    base.TEST.TOKEN_SEMANTICS = True
    with pytest.raises(ValueError, match="TEST.TOKEN_SEMANTICS.*build_dilated_resnet_backbone"):
        Trainer.build_evaluator(base, "sgr_toy_sem_seg_val")
