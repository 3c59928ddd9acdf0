"""Published models in: official MaskFormer / Mask2Former checkpoints (semantic, panoptic and
instance; and detectron2's ImageNet R-50.pkl files) load exactly into the matching configs, in
both layouts of MaskFormerHead, SGR goes on top, and conversion is bit-exact.

The official checkpoints are built from the facts in tests/data/interop/*.tsv (every tensor name,
shape and dtype of official models; see the README there) with random values. The full-size
models are built once per config: the tests that take a config (``rel``) run grouped by it
(``scope="module"``), so the small cache of :func:`model_of` serves them all; the models only one
test uses (the SGR configs, the other datasets) are built by :func:`build` and not kept.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import pickle
import sys
import zlib

import numpy as np
import pytest
import torch
from conftest import POOL, REPO, TOY_BASE, TOY_SGR, cheap_init, random_pool, tiny_toy_cfg

from detectron2.data.catalog import Metadata
from detectron2.modeling import build_backbone, build_model

from sgr_d2.config import load_config
from sgr_d2.engine.checkpoint import AtomicCheckpointer, CheckpointMismatchError

sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = os.path.join(REPO, "tests", "data", "interop")
CPU = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
OFFICIAL = {  # our config -> the .tsv of the official model it must load (with its own class count)
    "ade20k/mask2former_r50.yaml": "mask2former_ade20k_semantic_R50.tsv",
    "ade20k/maskformer_r50.yaml": "maskformer_ade20k_R50.tsv",
    "ade20k/mask2former_swin_t.yaml": "mask2former_ade20k_semantic_swin_tiny.tsv",
    "ade20k/maskformer_swin_t.yaml": "maskformer_ade20k_swin_tiny.tsv",
    "coco_panoptic/mask2former_r50.yaml": "mask2former_coco_panoptic_R50.tsv",
    "coco_panoptic/mask2former_swin_t.yaml": "mask2former_coco_panoptic_swin_tiny.tsv",
    "coco_instance/mask2former_r50.yaml": "mask2former_coco_instance_R50.tsv",
    "ade20k_panoptic/mask2former_r50.yaml": "mask2former_ade20k_panoptic_R50.tsv",
    "ade20k_instance/mask2former_r50.yaml": "mask2former_ade20k_instance_R50.tsv",
}
SEMANTIC = [rel for rel in OFFICIAL if rel.startswith("ade20k/")]
PD, PRED = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
OFFICIAL_ONLY_KEYS = ("criterion.empty_weight", ".relative_position_index")


# ----------------------------------------------------------------------------- official files
def read_tsv(name, res4_blocks=6, num_classes=None):
    """``{name: (shape, dtype)}`` of an official state dict; R-101: more res4 blocks (copies of the
    R-50's res4.1 shapes); another dataset: class_embed and empty_weight with num_classes + 1 rows."""
    spec = {}
    with open(os.path.join(DATA, name)) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape, dtype = line.rstrip("\n").split("\t")
            spec[key] = (tuple(int(s) for s in shape.split("x")) if shape else (), dtype)
    if res4_blocks != 6:
        block = {k[len("backbone.res4.1."):]: v for k, v in spec.items() if k.startswith("backbone.res4.1.")}
        assert block, "res4 blocks are a ResNet's"
        out = {}
        for key, value in spec.items():
            out[key] = value
            if key == "backbone.res4.5." + list(block)[-1]:
                for i in range(6, res4_blocks):
                    out.update({f"backbone.res4.{i}.{k}": v for k, v in block.items()})
        spec = out
    if num_classes is not None:
        for key in (PRED + "class_embed.weight", PRED + "class_embed.bias", "criterion.empty_weight"):
            shape, dtype = spec[key]
            spec[key] = ((num_classes + 1,) + shape[1:], dtype)
    return spec


def official_state(spec, seed=0):
    """Random values of the right shapes, scaled so a forward pass stays finite; all distinct. The
    normal values of a tensor are a window of ``random_pool("normal")`` starting where no other
    tensor's does, at a place drawn from ``seed`` (fresh draws, 40-60M numbers a file, cost more
    than the rest of a test); each tensor has memory of its own."""
    g = torch.Generator().manual_seed(seed)
    normals, starts, state = random_pool("normal"), set(), {}

    def normal(shape):
        n = math.prod(shape)
        start = int(torch.randint(0, POOL - n + 1, (), generator=g))
        while start in starts:
            start = int(torch.randint(0, POOL - n + 1, (), generator=g))
        starts.add(start)
        return normals[start:start + n].view(shape)

    for key, (shape, dtype) in spec.items():
        if dtype == "int64":
            state[key] = torch.randint(0, 100, shape, generator=g)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            state[key] = normal(shape) / math.sqrt(fan_in)
        elif "norm" in key and key.endswith("weight"):
            state[key] = 1 + 0.1 * normal(shape)
        else:
            state[key] = 0.1 * normal(shape)
        assert str(state[key].dtype) == f"torch.{dtype}"
    return state


def old_layout(state):
    """The names of a file written before MaskFormerHead's version 2: the pixel decoder's tensors
    directly under sem_seg_head. (as the official ``_load_from_state_dict`` expects them when a
    file has no version metadata)."""
    out = {k.replace(PD, "sem_seg_head.", 1): v for k, v in state.items()}
    assert not any(k.startswith(PD) for k in out) and len(out) == len(state)
    return out


def write_official(state, path):
    """A model-zoo file: ``.pkl`` {"model": numpy, "__author__"} or ``.pth`` {"model": tensors}."""
    if str(path).endswith(".pkl"):
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "official"}, f)
    else:
        torch.save({"model": state}, path)
    return str(path)


def build(rel, *opts):
    """A new model of a config (eval mode; :func:`cheap_init` at a place of the config's own, so
    that a base model and its _sgr model, say, start from different values)."""
    torch.manual_seed(0)
    with cheap_init(start=zlib.crc32(repr((rel,) + opts).encode())):
        return build_model(load_config(os.path.join(REPO, "configs", rel), CPU + list(opts))).eval()


_MODELS = collections.OrderedDict()


def model_of(rel, *opts):
    """One model per config (built once; eval mode), kept while it is one of the three used last:
    the full-size models are large."""
    key = (rel,) + opts
    if key in _MODELS:
        _MODELS.move_to_end(key)
    else:
        if len(_MODELS) >= 3:
            _MODELS.popitem(last=False)
        _MODELS[key] = build(rel, *opts)
    return _MODELS[key]


@pytest.fixture(scope="module", autouse=True)
def _free_the_models():
    """The kept models and the pools go with this module (the suite runs on in the same process)."""
    yield
    _MODELS.clear()
    random_pool.cache_clear()


def _weights(state):
    return {k: v for k, v in state.items() if k not in ("pixel_mean", "pixel_std")
            and not k.endswith("num_batches_tracked")}


# ----------------------------------------------------------------------------- loading
@contextlib.contextmanager
def _load_log(checkpointer):
    """The messages ``checkpointer`` logs (INFO and up) while the block runs."""
    messages, handler, level = [], logging.Handler(), checkpointer.logger.level
    handler.emit = lambda record: messages.append(record.getMessage())
    checkpointer.logger.addHandler(handler)
    checkpointer.logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        checkpointer.logger.removeHandler(handler)
        checkpointer.logger.setLevel(level)


def _official_only(key):
    return key == OFFICIAL_ONLY_KEYS[0] or key.endswith(OFFICIAL_ONLY_KEYS[1])


@pytest.mark.parametrize("rel", list(OFFICIAL), scope="module")
def test_our_modules_carry_the_official_names(rel):
    """Every tensor of the official model is a tensor of ours under the same name and shape, but
    the ones sgr_d2 computes itself (the loss's class weights, Swin's position index); ours has
    only BatchNorm's counters more (the official ResNets use FrozenBN)."""
    spec = read_tsv(OFFICIAL[rel])
    ours = {k: tuple(v.shape) for k, v in model_of(rel).state_dict().items()}
    assert {k: shape for k, (shape, _) in spec.items() if not _official_only(k)} == \
        {k: shape for k, shape in ours.items() if not k.endswith(".num_batches_tracked")}
    assert sum(_official_only(k) for k in spec) == (13 if "swin" in rel else 1)


@pytest.mark.parametrize("fmt", [".pkl", ".pth"])
@pytest.mark.parametrize("rel", list(OFFICIAL), scope="module")
def test_official_checkpoint_loads_exactly(rel, fmt, tmp_path):
    """Strict: every tensor of the model from the file, under its own name, every tensor of the
    file used. The files carry no version metadata (plain name -> array dicts): the current
    layout of MaskFormerHead is read as it is (the official code would mis-read it)."""
    if fmt == ".pth" and rel not in SEMANTIC:
        pytest.skip("the .pth format: checked on the semantic files (the others differ in class counts only)")
    spec = read_tsv(OFFICIAL[rel])
    official = official_state(spec, seed=1)
    path = write_official(official, tmp_path / f"model_final{fmt}")
    model = model_of(rel)
    checkpointer = AtomicCheckpointer(model)
    with _load_log(checkpointer) as messages:
        checkpointer.load(path)
    summary = checkpointer.last_load
    fit = summary.fit
    ours = _weights(model.state_dict())
    # strict: every tensor of the model has a value, every tensor of the file is used or official-only
    assert fit.kind == "full model" and fit.missing == [] and fit.unused == [] and fit.at_init == {}
    assert sorted(fit.loaded) == sorted(ours)
    official_only = {k for k in official if _official_only(k)}
    assert set(summary.set_aside) == official_only
    kinds = ["criterion (1 tensor)"] + (["backbone.layers.* (12 tensors)"] if "swin" in rel else [])
    assert any(f"set aside {len(official_only)} tensors that sgr_d2 computes itself: " in m
               and all(k in m for k in kinds) for m in messages), messages
    n = len(ours)
    assert any(f"full model checkpoint; {n} of the model's {n} tensors loaded" in m for m in messages)
    assert n == len(official) - len(official_only) and (n == 557 or rel != "ade20k/mask2former_r50.yaml")
    assert checkpointer.last_load.head_layout == 0  # nothing moved
    # tensor by tensor: each value lands under its own (official) name
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in official.items() if k in ours)


def with_sync_bn_counters(spec):
    """The spec of a file trained with SyncBN (Mask2Former Cityscapes, ADE20K R-101): a
    ``num_batches_tracked`` counter (int64, no dimensions) beside every BatchNorm's statistics."""
    out = dict(spec)
    for key in spec:
        if key.endswith(".running_mean"):
            out[key[: -len("running_mean")] + "num_batches_tracked"] = ((), "int64")
    return out


# MaskFormer's COCO panoptic model: its transformer-encoder pixel decoder, 133 classes
MASKFORMER_COCO_PANOPTIC = ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", "133",
                            "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "TransformerEncoderPixelDecoder",
                            "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "6",
                            "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE", "transformer_encoder",
                            "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "True")


@pytest.mark.parametrize("rel, tsv, res4, classes, opts", [
    ("cityscapes/mask2former_r50.yaml", "mask2former_ade20k_semantic_R50.tsv", 6, 19, ()),
    ("cityscapes_panoptic/mask2former_r50.yaml", "mask2former_ade20k_panoptic_R50.tsv", 6, 19, ()),
    ("ade20k/maskformer_r50.yaml", "maskformer_coco_panoptic_R50.tsv", 6, None, MASKFORMER_COCO_PANOPTIC),
    pytest.param("cityscapes_instance/mask2former_r50.yaml", "mask2former_coco_instance_R50.tsv", 6, 8, (),
                 marks=pytest.mark.slow),
    pytest.param("ade20k/mask2former_r101.yaml", "mask2former_ade20k_semantic_R50.tsv", 23, 150, (),
                 marks=pytest.mark.slow),
    pytest.param("coco_stuff_10k/maskformer_r101.yaml", "maskformer_ade20k_R50.tsv", 23, 171, (),
                 marks=pytest.mark.slow),
], ids=["m2f_r50_cityscapes", "m2f_r50_cityscapes_panoptic", "maskformer_r50_coco_panoptic",
        "m2f_r50_cityscapes_instance", "m2f_r101_ade20k", "maskformer_r101_coco_stuff"], scope="module")
def test_r101_and_other_datasets_load_exactly(rel, tsv, res4, classes, opts, tmp_path):
    spec = read_tsv(tsv, res4_blocks=res4, num_classes=classes)
    if rel.startswith("cityscapes"):  # the official Cityscapes Mask2Former trains with SyncBN
        spec = with_sync_bn_counters(spec)
    official = official_state(spec, seed=2)
    path = write_official(official, tmp_path / "model_final.pkl")
    model = build(rel, *opts)  # the only test of these configs
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    checkpointer = AtomicCheckpointer(model)
    checkpointer.load(path)
    fit = checkpointer.last_load.fit
    assert fit.missing == [] and fit.unused == [] and fit.at_init == {}
    counters = {k for k in official if k.endswith(".num_batches_tracked")}
    assert bool(counters) == rel.startswith("cityscapes")
    # the counters load into the model's own BatchNorm counters (they are not weights: no fit check)
    assert counters.isdisjoint(checkpointer.last_load.set_aside) and counters <= set(before)
    state = model.state_dict()
    assert all(torch.equal(state[k], official[k]) for k in counters)
    assert len(fit.loaded) == len(_weights(state))
    assert torch.equal(state[PRED + "class_embed.weight"], official[PRED + "class_embed.weight"])
    assert torch.equal(state["backbone.res4.22.conv3.weight" if res4 == 23 else "backbone.res4.5.conv3.weight"],
                       official[f"backbone.res4.{res4 - 1}.conv3.weight"])


@pytest.mark.parametrize("rel, removed, group, old", [
    ("ade20k/mask2former_r50.yaml", PRED + "transformer_ffn_layers.", PRED + "transformer_ffn_layers.* (54 tensors)",
     False),
    ("ade20k/maskformer_r50.yaml", PD + "layer_2.", PD + "layer_2 (1 tensor), " + PD + "layer_2.norm (2 tensors)",
     False),
    ("coco_instance/mask2former_r50.yaml", PRED + "class_embed.", PRED + "class_embed (2 tensors)", False),
    # an older-layout file: moved to the current names, then refused naming the current names
    ("coco_panoptic/mask2former_r50.yaml", PD + "mask_features.", PD + "mask_features (2 tensors)", True),
], ids=["m2f_ffn_layers", "maskformer_layer_2", "m2f_coco_instance_class_embed", "m2f_old_layout_mask_features"],
    scope="module")
def test_a_checkpoint_without_one_head_group_is_refused_naming_it(rel, removed, group, old, tmp_path):
    official = official_state(read_tsv(OFFICIAL[rel]), seed=3)
    kept = {k: v for k, v in official.items() if not k.startswith(removed)}
    path = write_official(old_layout(kept) if old else kept, tmp_path / "m.pkl")
    model = model_of(rel)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as e:
        AtomicCheckpointer(model).load(path)
    msg = str(e.value)
    assert path in msg and "full model checkpoint" in msg
    assert f"missing groups: {group}\n" in msg, msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded


# ----------------------------------------------------------------------------- SGR on top
@contextlib.contextmanager
def _every_segment_kept(*models):
    """Panoptic inference keeping every segment (OBJECT_MASK_THRESHOLD and OVERLAP_THRESHOLD 0:
    random weights predict no class with the configs' probability 0.8), and, where the dataset is
    not registered, classes 0-79 as the things."""
    saved = [(m.object_mask_threshold, m.overlap_threshold, m.metadata) for m in models]
    for m in models:
        m.object_mask_threshold = m.overlap_threshold = 0.0
        if not hasattr(m.metadata, "thing_dataset_id_to_contiguous_id"):
            m.metadata = Metadata(name="synthetic", thing_dataset_id_to_contiguous_id={i: i for i in range(80)})
    try:
        yield
    finally:
        for m, (threshold, overlap, metadata) in zip(models, saved):
            m.object_mask_threshold, m.overlap_threshold, m.metadata = threshold, overlap, metadata


@pytest.mark.parametrize("rel", [
    "ade20k/mask2former_r50.yaml",
    "ade20k/maskformer_r50.yaml",
    "coco_panoptic/mask2former_r50.yaml",
    pytest.param("coco_instance/mask2former_r50.yaml", marks=pytest.mark.slow),
    pytest.param("ade20k/mask2former_swin_t.yaml", marks=pytest.mark.slow),
    pytest.param("ade20k/maskformer_swin_t.yaml", marks=pytest.mark.slow),
    pytest.param("coco_panoptic/mask2former_swin_t.yaml", marks=pytest.mark.slow),
], scope="module")
def test_sgr_on_a_published_model_starts_as_the_published_model(rel, tmp_path):
    """The _sgr config from a published file gives the published model's outputs (every output
    its config asks for: sem_seg, panoptic_seg, instances). The two read the same values in the
    two layouts of MaskFormerHead: the baseline the current one, the SGR model the older one
    (the pixel decoder directly under sem_seg_head., no version metadata), which both load
    exactly."""
    official = official_state(read_tsv(OFFICIAL[rel]), seed=4)
    path = write_official(official, tmp_path / "model_final.pkl")
    old_path = write_official(old_layout(official), tmp_path / "model_final_old_layout.pkl")
    base = model_of(rel)
    checkpointer = AtomicCheckpointer(base)
    checkpointer.load(path)
    assert checkpointer.last_load.head_layout == 0
    sgr = build(rel.replace(".yaml", "_sgr.yaml"))  # the only test of the _sgr configs
    checkpointer = AtomicCheckpointer(sgr)
    with _load_log(checkpointer) as messages:
        checkpointer.load(old_path)
    # the pixel decoder's tensors (the official code's conversion, checked with its R-50 files)
    moved = 23 if "/maskformer_r50" in rel else 117 if "mask2former" in rel else None
    assert checkpointer.last_load.head_layout == (moved or sum(k.startswith(PD) for k in official))
    assert any(f"the older MaskFormerHead layout: its {checkpointer.last_load.head_layout} pixel-decoder tensors"
               in m for m in messages), messages
    fit = checkpointer.last_load.fit
    assert fit.missing == [] and fit.unused == []
    (why, left), = fit.at_init.items()
    state = sgr.state_dict()
    assert why.startswith("SGR component") and sorted(left) == sorted(
        k for k in _weights(state) if k.startswith("backbone.sgr."))
    assert all(torch.equal(state[k], v) for k, v in official.items() if k.startswith(PD))
    # an image of its own (the global generator's state depends on the tests run before)
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), _every_segment_kept(base, sgr):
        a = base([{"image": image, "height": 48, "width": 80}])[0]
        b = sgr([{"image": image, "height": 48, "width": 80}])[0]
    tests = load_config(os.path.join(REPO, "configs", rel), CPU).MODEL.MASK_FORMER.TEST
    assert set(a) == {k for k, on in (("sem_seg", tests.SEMANTIC_ON), ("panoptic_seg", tests.PANOPTIC_ON),
                                      ("instances", tests.INSTANCE_ON)) if on}
    assert set(b) == set(a) | {"sgr_regions"}
    classes = base.sem_seg_head.num_classes
    if "sem_seg" in a:
        assert a["sem_seg"].shape == (classes, 48, 80) and torch.isfinite(a["sem_seg"]).all()
        assert a["sem_seg"].std() > 1e-4  # not a degenerate output
        assert (a["sem_seg"] - b["sem_seg"]).abs().max().item() <= 1e-6
    if "panoptic_seg" in a:
        (seg_a, info_a), (seg_b, info_b) = a["panoptic_seg"], b["panoptic_seg"]
        assert len(info_a) > 1 and seg_a.shape == (48, 80)  # some segments
        assert torch.equal(seg_a, seg_b) and info_a == info_b
    if "instances" in a:
        ia, ib = a["instances"], b["instances"]
        assert len(ia) == len(ib) > 0 and ia.image_size == (48, 80)
        oa, ob = ia.scores.argsort(descending=True), ib.scores.argsort(descending=True)
        assert torch.allclose(ia.scores[oa], ib.scores[ob], atol=1e-6)
        assert torch.equal(ia.pred_classes[oa], ib.pred_classes[ob])
        assert torch.equal(ia.pred_masks[oa], ib.pred_masks[ob])


# ----------------------------------------------------------------------------- conversion
def _same_bytes(a, b):
    """``a.tobytes() == b.tobytes()`` for two arrays of one dtype and shape, without copying them."""
    def as_ints(x):
        return torch.from_numpy(np.ascontiguousarray(x).reshape(-1).view(f"i{x.itemsize}"))
    return torch.equal(as_ints(a), as_ints(b))


@pytest.mark.parametrize("tsv, fmt, mid, sync_bn, old", [(OFFICIAL[r], ".pkl", ".pth", False, False) for r in SEMANTIC]
                         + [("mask2former_ade20k_semantic_swin_tiny.tsv", ".pth", ".pkl", False, False),
                            ("mask2former_ade20k_semantic_R50.tsv", ".pkl", ".pth", True, False),
                            ("mask2former_coco_panoptic_R50.tsv", ".pkl", ".pth", False, True)])
def test_official_file_converts_to_the_other_format_and_back_bit_for_bit(tsv, fmt, mid, sync_bn, old, tmp_path):
    """Names, dtypes and bytes kept, in either layout of MaskFormerHead (``old``: the older one)."""
    spec = read_tsv(tsv)
    official = official_state(with_sync_bn_counters(spec) if sync_bn else spec, seed=5)
    official = old_layout(official) if old else official
    src = write_official(official, tmp_path / f"official{fmt}")
    assert convert_checkpoint.main(["--input", src, "--output", str(tmp_path / f"other{mid}")]) == 0
    assert convert_checkpoint.main(["--input", str(tmp_path / f"other{mid}"), "--output", str(tmp_path / f"back{fmt}")]) == 0
    for name in (f"other{mid}", f"back{fmt}"):
        out = convert_checkpoint.read_state(str(tmp_path / name))
        assert list(out) == list(official), name
        for k, v in official.items():
            b = out[k].numpy() if isinstance(out[k], torch.Tensor) else out[k]
            assert b.dtype == v.numpy().dtype and b.shape == v.numpy().shape and _same_bytes(b, v.numpy()), k


def _official_reading(key):
    """The name under which the official MaskFormerHead._load_from_state_dict puts a tensor of a
    file without version metadata: every sem_seg_head tensor but the predictor's moves under
    pixel_decoder. (its rule for files before version 2)."""
    if "sem_seg_head" in key and not key.startswith(PRED):
        return key.replace("sem_seg_head.", PD)
    return key


def _official_relative_position_index(w):
    """Swin's relative position index, as the paper defines it: for tokens i=(y1,x1), j=(y2,x2) of a
    w x w window, (y1-y2+w-1)*(2w-1) + (x1-x2+w-1)."""
    coords = [(y, x) for y in range(w) for x in range(w)]
    return torch.tensor([[(a[0] - b[0] + w - 1) * (2 * w - 1) + (a[1] - b[1] + w - 1) for b in coords]
                         for a in coords])


@pytest.mark.parametrize("rel", SEMANTIC + ["coco_instance/mask2former_r50.yaml"], scope="module")
def test_a_model_trained_here_converts_for_the_official_code(rel, tmp_path):
    """--official without an official source file: exactly the official names, shapes and dtypes,
    with the official-only tensors computed, as the official code reads a file without version
    metadata: the pixel decoder in the older layout, which its MaskFormerHead moves under
    pixel_decoder. (the current layout would come out as pixel_decoder.pixel_decoder.*)."""
    spec = read_tsv(OFFICIAL[rel])
    state = model_of(rel).state_dict()
    AtomicCheckpointer(model_of(rel), str(tmp_path)).save("model_final", iteration=7)
    # the checkpoint itself records MaskFormerHead's version 2: the official code reads it as it is
    assert torch.load(tmp_path / "model_final.pth", weights_only=True, mmap=True)["model"]._metadata[
        "sem_seg_head"] == {"version": 2}
    assert convert_checkpoint.main(["--input", str(tmp_path / "model_final.pth"),
                                    "--output", str(tmp_path / "official.pkl"), "--official"]) == 0
    written = convert_checkpoint.read_state(str(tmp_path / "official.pkl"))
    assert not any(k.startswith(PD) for k in written)
    out = {_official_reading(k): v for k, v in written.items()}
    assert sorted(out) == sorted(spec)
    for k, (shape, dtype) in spec.items():
        assert tuple(out[k].shape) == shape and str(out[k].dtype) == dtype, k
    classes = model_of(rel).sem_seg_head.num_classes
    assert np.array_equal(out["criterion.empty_weight"], np.array([1.0] * classes + [0.1], dtype=np.float32))
    for k in spec:
        if k.endswith("relative_position_index"):
            assert np.array_equal(out[k], _official_relative_position_index(7).numpy()), k
    assert np.array_equal(out[PRED + "class_embed.weight"], state[PRED + "class_embed.weight"].numpy())


def test_convert_checkpoint_refuses_what_it_cannot_write(tmp_path, capsys):
    state = build_model(tiny_toy_cfg(os.path.join(REPO, "configs", "toy", "maskformer_r18_sgr.yaml"))).state_dict()
    torch.save({"model": state}, tmp_path / "sgr.pth")
    args = ["--output", str(tmp_path / "o.pkl"), "--official"]
    assert convert_checkpoint.main(["--input", str(tmp_path / "sgr.pth"), *args]) == 1
    assert "SGR / GloRe component (backbone.backbone." in capsys.readouterr().err
    assert convert_checkpoint.main(["--input", str(tmp_path / "sgr.pth"), "--output", str(tmp_path / "o.pkl")]) == 0
    torch.save({"model": build_model(tiny_toy_cfg(TOY_BASE)).state_dict()}, tmp_path / "fcn.pth")
    assert convert_checkpoint.main(["--input", str(tmp_path / "fcn.pth"), *args]) == 1
    assert "no sem_seg_head.predictor.class_embed.weight: not a MaskFormer" in capsys.readouterr().err
    assert convert_checkpoint.main(["--input", str(tmp_path / "nope.pkl"), *args]) == 1
    assert "nope.pkl does not exist" in capsys.readouterr().err
    assert convert_checkpoint.main(["--input", str(tmp_path / "fcn.pth"), "--output", str(tmp_path / "o.bin")]) == 1
    assert "must end with .pkl or .pth" in capsys.readouterr().err


def test_timm_relative_position_index_is_the_official_one():
    """Why the official relative_position_index buffers need not be loaded: timm computes the same."""
    model = model_of("ade20k/maskformer_swin_t.yaml")
    index = model.backbone.layers[1].blocks[1].attn.relative_position_index
    assert torch.equal(index, _official_relative_position_index(7))
    assert "backbone.layers.1.blocks.1.attn.relative_position_index" not in model.state_dict()


def test_finetune_recipe_is_the_sgr_config_started_from_the_published_model():
    path = os.path.join(REPO, "configs", "ade20k", "finetune_mask2former_r50_sgr.yaml")
    assert "NOT FROM THE PAPER" in open(path).read()
    ft = load_config(path)
    sgr = load_config(os.path.join(REPO, "configs", "ade20k", "mask2former_r50_sgr.yaml"))
    assert ft.MODEL.WEIGHTS.endswith("model_final_500878.pkl")  # the official Mask2Former R-50 ADE20K file
    a, b = ft.MODEL.clone(), sgr.MODEL.clone()
    a.WEIGHTS = b.WEIGHTS = ""
    assert a == b  # the same model: only the start and the schedule differ
    assert ft.SOLVER.MAX_ITER == 20000 < sgr.SOLVER.MAX_ITER and ft.SOLVER.BASE_LR == pytest.approx(sgr.SOLVER.BASE_LR / 5)


# ----------------------------------------------------------------------------- one loading path
def test_new_classes_apply_to_model_weights_not_to_resuming(tmp_path):
    from sgr_d2.engine import build_checkpointer

    cfg = tiny_toy_cfg(TOY_SGR, "MODEL.WEIGHTS_NEW_CLASSES", "True")
    torch.manual_seed(0)
    trained = build_model(cfg)
    build_checkpointer(cfg, trained, str(tmp_path)).save("model_0000009")
    saved = trained.state_dict()
    classes = ["sem_seg_head.predictor.weight", "backbone.sgr.classifier.weight"]
    torch.manual_seed(1)
    resumed = build_model(cfg)
    checkpointer = build_checkpointer(cfg, resumed, str(tmp_path))
    checkpointer.resume_or_load("", resume=True)  # the run's own last checkpoint: everything
    assert checkpointer.last_load.fit.new_class_layers == []
    assert all(torch.equal(resumed.state_dict()[k], saved[k]) for k in classes)
    torch.manual_seed(2)
    fresh = build_model(cfg)
    init = {k: fresh.state_dict()[k].clone() for k in classes}
    checkpointer = build_checkpointer(cfg, fresh)
    checkpointer.load(str(tmp_path / "model_0000009.pth"))  # as MODEL.WEIGHTS: new classes
    assert set(classes) <= set(checkpointer.last_load.fit.new_class_layers)
    assert all(torch.equal(fresh.state_dict()[k], init[k]) for k in classes)
    assert torch.equal(fresh.state_dict()["backbone.backbone.stem.conv1.weight"], saved["backbone.backbone.stem.conv1.weight"])



def test_every_entry_point_goes_through_the_fit_check(tmp_path):
    """--eval-only, the demo, the token-semantics tool and the figure tools refuse the same file."""
    from detectron2.engine import default_argument_parser

    from sgr_d2.engine.trainer import run
    from sgr_d2.predict import build_predictor, predictor_config

    sys.path.insert(0, os.path.join(REPO, "demo"))
    import demo as demo_script
    import token_semantics

    state = build_model(tiny_toy_cfg(TOY_SGR)).state_dict()
    bad = tmp_path / "no_classifier.pth"
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("sem_seg_head.predictor.")}}, bad)
    opts = ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"]
    expected = r"(?s)no_classifier\.pth does not fit .* missing groups: sem_seg_head\.predictor \(2 tensors\)"
    args = default_argument_parser().parse_args(
        ["--config-file", TOY_SGR, "--eval-only", *opts, "MODEL.WEIGHTS", str(bad), "OUTPUT_DIR", str(tmp_path / "ev")])
    with pytest.raises(CheckpointMismatchError, match=expected):
        run(args)
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    with pytest.raises(CheckpointMismatchError, match=expected):
        demo_script.main(["--config-file", TOY_SGR, "--input", str(image), "--output", str(tmp_path / "demo"),
                          "--opts", *opts, "MODEL.WEIGHTS", str(bad)])
    with pytest.raises(CheckpointMismatchError, match=expected):
        token_semantics.evaluate(TOY_SGR, str(bad), ["sgr_toy_sem_seg_val"], opts)
    with pytest.raises(CheckpointMismatchError, match=expected):
        build_predictor(predictor_config(TOY_SGR, str(bad), opts))  # plot_token_histograms.py, plot_qualitative.py


# ----------------------------------------------------------------------------- detectron2's R-50.pkl
def _torchvision_features(tv, x):
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    return tv.layer4(tv.layer3(tv.layer2(tv.layer1(x))))


def _randomize_bn(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net


def _d2_torchvision_names(sd):
    """The names of detectron2's ImageNetPretrained/torchvision/R-50.pkl, as its
    tools/convert-torchvision-to-d2.py writes them (the classifier kept as stem.fc.*)."""
    out = {}
    for k, v in sd.items():
        if "num_batches_tracked" in k:
            continue
        name = k if "layer" in k else "stem." + k
        for t in (1, 2, 3, 4):
            name = name.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            name = name.replace(f"bn{t}", f"conv{t}.norm")
        name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[name] = v.numpy()
    return out


@pytest.mark.parametrize("depth", [50, pytest.param(101, marks=pytest.mark.slow)])
def test_detectron2_torchvision_pkl_loads_into_the_plain_and_the_dilated_resnet(depth, tmp_path):
    """detectron2's ImageNetPretrained/torchvision/R-{50,101}.pkl (STRIDE_IN_1X1 False): into the
    plain ResNet (MaskFormer) and the dilated one, the same features as torchvision; into a full
    model with SGR, the backbone loads and the head and SGR start from scratch. The classifier of
    the file is listed as unused, in the log."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(6)
    tv = _randomize_bn(getattr(torchvision.models, f"resnet{depth}")(), 6).eval()
    pkl = tmp_path / f"R-{depth}.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": _d2_torchvision_names(tv.state_dict()), "__author__": "torchvision",
                     "matching_heuristics": True}, f)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = _torchvision_features(tv, x)
    for rel, opts in ((f"ade20k/maskformer_r{depth}.yaml", ()),  # build_resnet_backbone, STRIDE_IN_1X1 False
                      (f"ade20k/dil_fcn_r{depth}.yaml", ("MODEL.RESNETS.OUTPUT_STRIDE", "32")),
                      (f"ade20k/dil_fcn_r{depth}.yaml", ())):  # dilated, output stride 8
        cfg = load_config(os.path.join(REPO, "configs", rel), CPU + ["MODEL.RESNETS.OUT_FEATURES", "['res5']", *opts])
        assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
        with cheap_init():
            backbone = build_backbone(cfg).eval()
        checkpointer = AtomicCheckpointer(backbone)
        with _load_log(checkpointer) as messages:
            checkpointer.load(str(pkl))
        fit = checkpointer.last_load.fit
        assert fit.missing == [] and sorted(fit.unused) == ["stem.fc.bias", "stem.fc.weight"]
        assert any(f"{pkl}: 2 tensors of the file are not used by the model: stem.fc" in m for m in messages), messages
        if cfg.MODEL.RESNETS.OUTPUT_STRIDE == 32:
            with torch.no_grad():
                out = backbone(x)["res5"]
            assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item()), rel
    if depth != 50:
        return
    # a full model with SGR: the backbone from the file, the head and SGR at their initialisation
    torch.manual_seed(0)
    model = build_model(load_config(os.path.join(REPO, "configs", "ade20k", "dil_fcn_r50_sgr.yaml"), CPU))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = AtomicCheckpointer(model)
    with _load_log(checkpointer) as messages:
        checkpointer.load(str(pkl))
    fit = checkpointer.last_load.fit
    assert fit.kind == "backbone" and fit.missing == [], fit.kind
    state = model.state_dict()
    conv1 = [k for k in state if k.endswith("stem.conv1.weight")]
    assert len(conv1) == 1 and torch.equal(state[conv1[0]], tv.state_dict()["conv1.weight"])
    assert not any(torch.equal(state[k], init[k]) for k in conv1)
    rest = [k for k in state if not k.startswith("backbone.backbone.") and "num_batches_tracked" not in k]
    assert any(k.startswith("sem_seg_head.") for k in rest) and any(k.startswith("backbone.sgr.") for k in rest)
    assert all(torch.equal(state[k], init[k]) for k in rest), [k for k in rest if not torch.equal(state[k], init[k])]
    assert any("2 tensors of the file are not used by the model: stem.fc" in m for m in messages), messages


def _caffe2_names(backbone):
    """A detectron2 ResNet's weights as an MSRA Caffe2 ImageNet file (detectron2's
    ImageNetPretrained/MSRA/R-50.pkl): res2_0_branch2a_w, res2_0_branch2a_bn_s / _bn_b (the norm
    folded into scale and bias), res_conv1_bn_*, conv1_w, fc1000_*, and *_momentum blobs."""
    blobs = {}
    for name, module in backbone.named_modules():
        if not hasattr(module, "norm") or not isinstance(module.norm, torch.nn.BatchNorm2d):
            continue
        if name == "stem.conv1":
            conv, bn = "conv1", "res_conv1_bn"
        else:
            stage, block, conv = name.split(".")
            branch = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}[conv]
            conv = f"{stage}_{block}_{branch}"
            bn = conv + "_bn"
        norm = module.norm
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        blobs[conv + "_w"] = module.weight.detach().numpy()
        blobs[bn + "_s"] = scale.detach().numpy()
        blobs[bn + "_b"] = (norm.bias - norm.running_mean * scale).detach().numpy()
        blobs[conv + "_w_momentum"] = np.zeros(1, dtype=np.float32)
    blobs["fc1000_w"] = np.zeros((1000, 2048), dtype=np.float32)
    blobs["fc1000_b"] = np.zeros(1000, dtype=np.float32)
    return blobs


def test_detectron2_msra_r50_pkl_loads_with_stride_in_1x1(tmp_path):
    cfg = load_config(os.path.join(REPO, "configs", "ade20k", "maskformer_r50.yaml"),
                      CPU + ["MODEL.RESNETS.STRIDE_IN_1X1", "True", "MODEL.RESNETS.OUT_FEATURES", "['res5']"])
    torch.manual_seed(7)
    reference = _randomize_bn(build_backbone(cfg), 7).eval()  # an MSRA ResNet-50: stride in the 1x1 conv
    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump(_caffe2_names(reference), f)  # a bare dict of blobs, as the MSRA files
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = reference(x)["res5"]
    for rel, opts in (("ade20k/maskformer_r50.yaml", ()), ("ade20k/dil_fcn_r50.yaml", ("MODEL.RESNETS.OUTPUT_STRIDE", "32")),
                      ("ade20k/dil_fcn_r50.yaml", ())):
        c = load_config(os.path.join(REPO, "configs", rel), CPU + ["MODEL.RESNETS.STRIDE_IN_1X1", "True",
                                                                   "MODEL.RESNETS.OUT_FEATURES", "['res5']", *opts])
        with cheap_init():
            backbone = build_backbone(c).eval()
        checkpointer = AtomicCheckpointer(backbone)
        checkpointer.load(str(tmp_path / "R-50.pkl"))
        summary = checkpointer.last_load
        assert summary.folded_norms == 53  # the stem, 16 blocks x 3 convs, 4 shortcuts
        assert summary.fit.missing == [] and sorted(summary.fit.unused) == ["fc1000.bias", "fc1000.weight"]
        state = backbone.state_dict()
        assert torch.equal(state["res2.0.conv1.norm.running_mean"], torch.zeros(64))
        assert torch.equal(state["res5.2.conv3.norm.running_var"], torch.ones(2048))
        if c.MODEL.RESNETS.OUTPUT_STRIDE == 32:
            with torch.no_grad():
                out = backbone(x)["res5"]
            # BatchNorm divides by sqrt(1 + eps) where Caffe2's affine norm does not, as detectron2's
            # FrozenBatchNorm2d does with these files: 5e-6 per norm
            assert (out - ref).abs().max().item() <= 1e-3 * max(1.0, ref.abs().max().item()), rel
    # the same file with the torchvision setting computes something else: the flag must be set
    c = load_config(os.path.join(REPO, "configs", "ade20k", "maskformer_r50.yaml"),
                    CPU + ["MODEL.RESNETS.OUT_FEATURES", "['res5']"])
    backbone = build_backbone(c).eval()
    AtomicCheckpointer(backbone).load(str(tmp_path / "R-50.pkl"))
    with torch.no_grad():
        assert (backbone(x)["res5"] - ref).abs().max().item() > 1e-2


@pytest.mark.slow
def test_detectron2_msra_r101_pkl_loads_into_the_r101_configs(tmp_path):
    opts = CPU + ["MODEL.RESNETS.STRIDE_IN_1X1", "True", "MODEL.RESNETS.OUT_FEATURES", "['res5']"]
    torch.manual_seed(9)
    reference = build_backbone(load_config(os.path.join(REPO, "configs", "ade20k", "maskformer_r101.yaml"), opts))
    blobs = _caffe2_names(reference)
    assert "res4_22_branch2c_bn_s" in blobs
    with open(tmp_path / "R-101.pkl", "wb") as f:
        pickle.dump(blobs, f)
    for rel in ("ade20k/maskformer_r101.yaml", "ade20k/dil_fcn_r101.yaml"):
        with cheap_init():
            backbone = build_backbone(load_config(os.path.join(REPO, "configs", rel), opts))
        checkpointer = AtomicCheckpointer(backbone)
        checkpointer.load(str(tmp_path / "R-101.pkl"))
        summary = checkpointer.last_load
        assert summary.folded_norms == 1 + (3 + 4 + 23 + 3) * 3 + 4 and summary.fit.missing == []
        assert np.array_equal(backbone.state_dict()["res4.22.conv3.weight"].numpy(), blobs["res4_22_branch2c_w"])


@pytest.mark.parametrize("depth", [18, 50])
def test_c4_roi_res5_belongs_to_the_backbone_only_of_a_bottleneck_resnet(depth, tmp_path):
    """A backbone file for Mask R-CNN C4 (``backbone.*`` only, as tools/export_backbone.py writes
    for a toy ResNet-18, whose basic-block res5 cannot fill the bottleneck ``Res5ROIHeads``):
    ResNet-18 loads it, ``roi_heads.res5`` left at initialisation; ResNet-50 refuses it naming
    ``roi_heads.res5``, and loads it once the file has ``roi_heads.res5`` too. Catches res5 always
    (the toy transfer refused) or never (an R-50 file without res5 accepted) in the backbone."""
    opts = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", str(depth)]
    if depth == 50:
        opts += ["MODEL.RESNETS.RES5_DILATION", "1"]
    cfg = load_config(os.path.join(REPO, "configs", "toy", "mask_rcnn_r18_c4.yaml"), opts)
    torch.manual_seed(0)
    source = build_model(cfg).state_dict()
    backbone = {k: v for k, v in source.items() if k.startswith("backbone.")}
    torch.save({"model": backbone}, tmp_path / "backbone.pth")
    torch.manual_seed(1)
    model = build_model(cfg)
    res5_init = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("roi_heads.res5.")}
    assert res5_init
    checkpointer = AtomicCheckpointer(model)
    if depth == 18:
        checkpointer.load(str(tmp_path / "backbone.pth"))
        fit = checkpointer.last_load.fit
        assert fit.kind == "backbone" and fit.missing == []
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in backbone.items())
        assert all(torch.equal(state[k], v) for k, v in res5_init.items())
        return
    with pytest.raises(CheckpointMismatchError, match=r"roi_heads\.res5\.\*"):
        checkpointer.load(str(tmp_path / "backbone.pth"))
    with_res5 = dict(backbone, **{k: v for k, v in source.items() if k.startswith("roi_heads.res5.")})
    torch.save({"model": with_res5}, tmp_path / "with_res5.pth")
    checkpointer.load(str(tmp_path / "with_res5.pth"))
    assert checkpointer.last_load.fit.kind == "backbone"
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in with_res5.items())
