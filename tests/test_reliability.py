"""Trustworthy long runs (docs/reliability.md): resume after a kill, atomic checkpoints,
determinism, clear errors for bad inputs that leave earlier outputs alone, NaN/inf losses,
and several workers (gloo on the CPU)."""
import atexit
import json
import math
import os
import re
import signal
import sys
import time

import numpy as np
import pytest
import torch
from conftest import (CLI, REPO, TOY_BASE, TOY_SGR, assert_unchanged, child_env, earlier_outputs, image_label_pair,
                      run_all, seeded_trainer, start_script, thread_count, tiny_run_cfg, tiny_toy_cfg)

from detectron2.engine import HookBase, default_argument_parser
from detectron2.modeling import build_model

from sgr_d2.data.datasets import DatasetLayoutError
from sgr_d2.engine.checkpoint import AtomicCheckpointer, CheckpointMismatchError
from sgr_d2.engine.trainer import run
from sgr_d2.engine.workers import launch
from sgr_d2.sgr import SGRCriterion

pytestmark = pytest.mark.usefixtures("one_thread")


def _poly_lr(base, it, max_iter, power=0.9):
    return base * (1 - it / max_iter) ** power


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# =========================================================================== 1. resume, atomic saves
@pytest.mark.slow
def test_resume_after_sigkill_continues_iterations_and_lr_schedule(tmp_path):
    out, max_iter, base_lr = tmp_path / "run", 60, 0.01
    script = [os.path.join(REPO, "train_net.py"), "--config-file", TOY_SGR]
    opts = [*CLI, "SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "10",
            "SOLVER.BASE_LR", str(base_lr), "SOLVER.HEAD_LR_MULTIPLIER", "1.0", "OUTPUT_DIR", str(out)]
    proc = start_script(script + opts, child_env(), tmp_path / "run1.log")
    tag = out / "last_checkpoint"
    deadline = time.time() + 600
    try:
        while True:
            name = tag.read_text().strip() if tag.is_file() else ""
            m = re.fullmatch(r"model_(\d{7})\.pth", name)
            if m and int(m.group(1)) >= 19:
                break
            assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint at iteration 19 within 10 minutes"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "model_final.pth").exists(), "the first run finished before it was killed"
    saved = tag.read_text().strip()
    saved_iter = int(saved[6:13])
    assert saved_iter % 10 == 9
    ckpt = torch.load(out / saved, map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == saved_iter  # the tagged file is complete
    lines_before = len(_metrics(out / "metrics.json")) if (out / "metrics.json").exists() else 0

    (code, text), = run_all([script + ["--resume"] + opts])
    assert code == 0, text[-3000:]
    assert f"Starting training from iteration {saved_iter + 1}" in text
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == max_iter - 1
    assert tag.read_text() == "model_final.pth"
    resumed = _metrics(out / "metrics.json")[lines_before:]
    iters = [e["iteration"] for e in resumed]
    assert iters and min(iters) > saved_iter and max(iters) == max_iter - 1, iters
    for e in resumed:  # the poly schedule continued: not restarted at the resumed iteration
        assert e["lr"] == pytest.approx(_poly_lr(base_lr, e["iteration"], max_iter), rel=1e-6), e
        assert e["lr"] != pytest.approx(_poly_lr(base_lr, e["iteration"] - saved_iter - 1, max_iter),
                                        rel=1e-3)


def test_interrupted_checkpoint_write_keeps_the_previous_checkpoint_and_tag(tmp_path, monkeypatch):
    out = tmp_path / "run"
    earlier = earlier_outputs(out)
    trainer = seeded_trainer(tiny_run_cfg(out, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"))
    trainer.resume_or_load(resume=False)
    real_save = torch.save
    calls = []

    def half_then_fail(obj, f, *args, **kwargs):  # a full disk, or a kill, in mid-write
        name = os.path.basename(os.readlink(f"/proc/self/fd/{f.fileno()}"))
        calls.append(name)
        if "model_final" not in name:
            return real_save(obj, f, *args, **kwargs)
        import io

        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        trainer.train()
    monkeypatch.undo()
    # the writes went to temporary files beside the target: .model_0000001.pth.XXXX.tmp ...
    assert [c.split(".pth")[0] for c in calls] == [".model_0000001", ".model_0000003", ".model_final"]
    assert all(c.endswith(".tmp") for c in calls)
    assert (out / "model_final.pth").read_bytes() == earlier["model_final.pth"]  # not truncated
    assert (out / "last_checkpoint").read_text() == "model_0000003.pth"
    ckpt = torch.load(out / "model_0000003.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 3 and set(ckpt["model"]) == set(trainer.model.state_dict())
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    # an interrupted write of a file that does not exist yet leaves nothing behind
    from sgr_d2.engine.checkpoint import atomic_torch_save

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError):
        atomic_torch_save({"x": torch.zeros(3)}, str(out / "model_final_b.pth"))
    assert not (out / "model_final_b.pth").exists()


# =========================================================================== 2. determinism
def _losses(seed, out):
    trainer = seeded_trainer(tiny_run_cfg(out, "SOLVER.MAX_ITER", "3", "SEED", str(seed), "CUDNN_BENCHMARK", "False"))
    trainer.train()
    keys = ("loss_sem_seg", "loss_sgr_union", "loss_sgr_cls", "loss_sgr_div")
    return {k: [v for v, _ in trainer.storage.history(k).values()] for k in keys}


def test_same_seed_gives_identical_losses(tmp_path):
    a = _losses(7, tmp_path / "a")
    b = _losses(7, tmp_path / "b")
    assert all(len(v) == 3 for v in a.values())
    assert a == b  # bit for bit
    c = _losses(8, tmp_path / "c")  # and the seed matters, so the comparison above means something
    assert c["loss_sem_seg"] != a["loss_sem_seg"]


# =========================================================================== 3. bad inputs
def test_missing_dataset_root_or_split_names_the_folder(tmp_path, monkeypatch):
    out = tmp_path / "run"
    earlier = earlier_outputs(out)
    cfg = tiny_run_cfg(out, "DATASETS.TRAIN", "('ade20k_sem_seg_train',)", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "150")
    absent = tmp_path / "absent"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(absent))
    with pytest.raises(DatasetLayoutError) as e:
        seeded_trainer(cfg)
    msg = str(e.value)
    assert str(absent / "ADEChallengeData2016") in msg and "images/{training,validation}" in msg
    assert "DETECTRON2_DATASETS" in msg
    # the root exists but not the training split
    root = tmp_path / "datasets"
    for sub in ("images/validation", "annotations_detectron2/validation"):
        (root / "ADEChallengeData2016" / sub).mkdir(parents=True)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    with pytest.raises(DatasetLayoutError) as e:
        seeded_trainer(cfg)
    assert str(root / "ADEChallengeData2016" / "images" / "training") in str(e.value)
    assert_unchanged(out, earlier)


def test_empty_dataset_is_a_clear_error(tmp_path, register):
    out = tmp_path / "run"
    earlier = earlier_outputs(out)
    name = register([])
    with pytest.raises(ValueError) as e:
        seeded_trainer(tiny_run_cfg(out, "DATASETS.TRAIN", f"('{name}',)"))
    msg = str(e.value)
    assert f"dataset '{name}'" in msg and "DATASETS.TRAIN" in msg and "is empty" in msg
    assert "at least one" in msg
    assert_unchanged(out, earlier)


# (test_integration.py::test_mapper_reports_bad_labels_by_file checks the mapper's messages;
# these check that a training run stops with them, and leaves the earlier outputs alone)
@pytest.mark.parametrize("kind", ["corrupt_image", "label_size", "label_values"])
def test_bad_data_stops_training_naming_the_file(tmp_path, register, kind):
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    earlier = earlier_outputs(out)
    good = image_label_pair(data, "good")
    if kind == "label_size":
        bad = image_label_pair(data, "bad", lbl_hw=(40, 30))
        expected = rf"label file {re.escape(bad['sem_seg_file_name'])} is 30x40 \(WxH\) but its image is 40x40"
    elif kind == "label_values":
        bad = image_label_pair(data, "bad", values=(1, 9, 200))
        expected = rf"{re.escape(bad['sem_seg_file_name'])} holds values \[9, 200\] outside the class range 0\.\.5"
    else:
        bad = image_label_pair(data, "bad")
        (data / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        expected = rf"cannot read image file {re.escape(bad['file_name'])}"
    name = register([good, bad])
    trainer = seeded_trainer(tiny_run_cfg(out, "DATASETS.TRAIN", f"('{name}',)", "SOLVER.MAX_ITER", "2"))
    with pytest.raises(ValueError, match=expected):  # 2 images, 2 per batch: both in iteration 0
        trainer.train()
    assert_unchanged(out, earlier)


@pytest.mark.parametrize("opts, expected", [
    (["MODEL.SGR.NUM_TOKEN", "3"], r"Non-existent key: MODEL\.SGR\.NUM_TOKEN \(not a key of detectron2 or sgr_d2"),
    (["MODEL.SGR.NUM_MATCHED", "40"], r"NUM_MATCHED \(40\).*NUM_TOKENS \(32\)"),
    (["MODEL.SGR.NUM_MATCHED", "0"], r"MODEL\.SGR\.NUM_MATCHED is 0; expected a positive"),
], ids=["unknown_key", "num_matched_above_num_tokens", "no_matched_tokens"])
def test_bad_config_fails_before_writing_anything(tmp_path, opts, expected):
    # (tests/test_configs.py::test_bad_config_values_name_the_key checks every check of
    # load_config; this goes through train_net.py's body, which must refuse before writing)
    out = tmp_path / "run"
    earlier = earlier_outputs(out)
    args = default_argument_parser().parse_args(["--config-file", TOY_SGR, "OUTPUT_DIR", str(out), *opts])
    with pytest.raises(ValueError, match=expected):
        run(args)
    assert_unchanged(out, earlier)
    assert sorted(p.name for p in out.iterdir()) == sorted(earlier)


def test_missing_model_weights_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    earlier = earlier_outputs(out)
    missing = tmp_path / "R-18.pkl"
    trainer = seeded_trainer(tiny_run_cfg(out, "MODEL.WEIGHTS", str(missing)))
    with pytest.raises(FileNotFoundError, match=rf"MODEL.WEIGHTS file {re.escape(str(missing))} does not exist"):
        trainer.resume_or_load(resume=False)
    assert_unchanged(out, earlier)


@pytest.mark.parametrize("url", ["detectron2://ImageNetPretrained/MSRA/R-50.pkl",
                                 "https://dl.fbaipublicfiles.com/maskformer/model_final.pkl"])
def test_model_weights_url_is_refused_not_downloaded(tmp_path, monkeypatch, url):
    """sgr_d2 never downloads: a URL in MODEL.WEIGHTS is an error that says so, before detectron2's
    PathManager (which would fetch it) is asked for anything."""
    from detectron2.utils.file_io import PathManager

    def no_fetch(*args, **kwargs):
        raise AssertionError(f"PathManager was asked for {args}")

    out = tmp_path / "run"
    trainer = seeded_trainer(tiny_run_cfg(out, "MODEL.WEIGHTS", url))
    monkeypatch.setattr(PathManager, "get_local_path", no_fetch)
    monkeypatch.setattr(PathManager, "open", no_fetch)
    with pytest.raises(ValueError, match=rf"MODEL.WEIGHTS is a URL \({re.escape(url)}\).*never downloads weights"):
        trainer.resume_or_load(resume=False)


def _weights(state):
    """The tensors the check counts: not pixel_mean/std nor BatchNorm's num_batches_tracked."""
    return {k: v for k, v in state.items()
            if k not in ("pixel_mean", "pixel_std") and not k.endswith("num_batches_tracked")}


TOY_MASKFORMER = os.path.join(REPO, "configs", "toy", "maskformer_r18.yaml")


def test_weights_of_another_architecture_are_refused(tmp_path):
    out = tmp_path / "run"
    earlier = earlier_outputs(out)
    # a MaskFormer checkpoint for the Dilated-FCN + SGR model: the same ResNet-18 (all of it fits),
    # another head; a full-model checkpoint, so the Dilated-FCN head may not start from scratch
    other = build_model(tiny_toy_cfg(TOY_MASKFORMER, "MODEL.RESNETS.OUTPUT_STRIDE", "16")).state_dict()
    path = tmp_path / "maskformer_r18.pth"
    torch.save({"model": other, "iteration": 99}, path)
    trainer = seeded_trainer(tiny_run_cfg(out, "MODEL.WEIGHTS", str(path)))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    head = [k for k in _weights(before) if k.startswith("sem_seg_head.")]
    convs = [k for k in head if k.startswith("sem_seg_head.convs.")]
    assert len(convs) == 5 and len(head) == 7  # one conv + BN (4 tensors), and the 1x1 classifier
    with pytest.raises(CheckpointMismatchError) as e:
        trainer.resume_or_load(resume=False)
    msg = str(e.value)
    assert str(path) in msg and "full model checkpoint" in msg
    assert f"leaves {len(head)} of the model's" in msg
    assert "sem_seg_head.convs.* (5 tensors)" in msg and "sem_seg_head.predictor (2 tensors)" in msg
    assert "tensors of the file the model does not have (90): sem_seg_head.pixel_decoder.layer_4 (1 tensor)" in msg
    assert_unchanged(out, earlier)
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # refused before loading anything

    # the same architecture at another width: names fit, shapes do not
    other_width = build_model(tiny_run_cfg(out, "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
                                   "MODEL.RESNETS.STEM_OUT_CHANNELS", "16")).state_dict()
    model = build_model(tiny_run_cfg(out))
    torch.save({"model": other_width}, tmp_path / "width16.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        AtomicCheckpointer(model).load(str(tmp_path / "width16.pth"))
    msg = str(e.value)
    stem = "backbone.backbone.stem.conv1.weight"
    assert str(tmp_path / "width16.pth") in msg and "missing groups: backbone.backbone.stem.conv1" in msg
    assert f"{stem} {list(other_width[stem].shape)} (model: {list(model.state_dict()[stem].shape)})" in msg


def test_backbone_checkpoints_and_new_classes(tmp_path):
    """A backbone-only file must cover the whole backbone and may leave the head and SGR at their
    initialisation; a full checkpoint for other classes loads only with MODEL.WEIGHTS_NEW_CLASSES."""
    import torchvision

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_pretrained

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    weights = convert_pretrained.convert_file(str(tmp_path / "r18.pth"), str(tmp_path / "R-18.pkl"))
    wide = ("MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.STEM_OUT_CHANNELS", "64")
    model = build_model(tiny_run_cfg(tmp_path / "run", *wide))
    head_before = model.sem_seg_head.predictor.weight.detach().clone()
    checkpointer = AtomicCheckpointer(model)
    checkpointer.load(str(tmp_path / "R-18.pkl"))
    got = model.state_dict()
    for name in ("stem.conv1.weight", "res4.1.conv2.weight", "res5.0.shortcut.norm.running_var"):
        assert np.array_equal(got[f"backbone.backbone.{name}"].numpy(), weights[name]), name
    assert torch.equal(model.sem_seg_head.predictor.weight, head_before)
    fit = checkpointer.last_load.fit
    assert fit.kind == "backbone" and fit.missing == [] and fit.unused == []
    assert len(fit.loaded) == len(weights)
    assert sum(len(v) for v in fit.at_init.values()) == len(_weights(got)) - len(weights)
    # one block fewer: the backbone is not covered
    import pickle

    with open(tmp_path / "R-18.pkl", "rb") as f:
        data = pickle.load(f)
    data["model"] = {k: v for k, v in data["model"].items() if not k.startswith("res4.1.")}
    with open(tmp_path / "R-18-short.pkl", "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)backbone checkpoint .* missing groups: "
                                                      r"backbone\.backbone\.res4\.\* \(10 tensors\)") as e:
        AtomicCheckpointer(build_model(tiny_run_cfg(tmp_path / "run", *wide))).load(str(tmp_path / "R-18-short.pkl"))
    assert "must cover the whole backbone network" in str(e.value)

    # the same model trained for 7 classes: the classifiers differ in shape
    seven = build_model(tiny_run_cfg(tmp_path / "run", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "7")).state_dict()
    torch.save({"model": seven}, tmp_path / "seven.pth")
    six = build_model(tiny_run_cfg(tmp_path / "run"))
    with pytest.raises(CheckpointMismatchError, match="MODEL.WEIGHTS_NEW_CLASSES True") as e:
        AtomicCheckpointer(six).load(str(tmp_path / "seven.pth"))
    assert "sem_seg_head.predictor (2 tensors)" in str(e.value)
    assert "backbone.sgr.classifier (2 tensors)" in str(e.value)
    init = {k: v.clone() for k, v in six.state_dict().items()}
    checkpointer = AtomicCheckpointer(six, new_classes=True)
    checkpointer.load(str(tmp_path / "seven.pth"))
    new = sorted(checkpointer.last_load.fit.new_class_layers)
    assert new == ["backbone.sgr.classifier.bias", "backbone.sgr.classifier.weight",
                   "sem_seg_head.predictor.bias", "sem_seg_head.predictor.weight"]
    state = six.state_dict()
    for k in _weights(state):
        assert torch.equal(state[k], init[k] if k in new else seven[k]), k
    # the same number of classes, but new ones: the class layers are still not loaded
    same = AtomicCheckpointer(build_model(tiny_run_cfg(tmp_path / "run")), new_classes=True)
    torch.save({"model": init}, tmp_path / "six.pth")
    same.load(str(tmp_path / "six.pth"))
    assert sorted(same.last_load.fit.new_class_layers) == new


def test_sgr_goes_on_top_of_a_checkpoint_without_it(tmp_path):
    """A Dilated-FCN checkpoint without SGR loads into the model with SGR (backbone.* under the SGR
    wrapper); SGR starts at its initialisation, which adds exactly zero."""
    base = build_model(tiny_run_cfg(tmp_path, config=TOY_BASE)).eval()
    torch.save({"model": base.state_dict()}, tmp_path / "base.pth")
    torch.manual_seed(3)
    model = build_model(tiny_run_cfg(tmp_path)).eval()
    checkpointer = AtomicCheckpointer(model)
    checkpointer.load(str(tmp_path / "base.pth"))
    summary = checkpointer.last_load
    n_backbone = len([k for k in base.state_dict() if k.startswith("backbone.")])
    assert summary.wrapped == n_backbone and summary.fit.missing == [] and summary.fit.unused == []
    (why, keys), = summary.fit.at_init.items()
    assert why.startswith("SGR component") and keys and all(k.startswith("backbone.sgr.") for k in keys)
    image = torch.randint(0, 255, (3, 64, 80), dtype=torch.uint8)
    with torch.no_grad():
        a = base([{"image": image, "height": 64, "width": 80}])[0]["sem_seg"]
        b = model([{"image": image, "height": 64, "width": 80}])[0]["sem_seg"]
    assert (a - b).abs().max().item() <= 1e-6


def test_resume_with_a_dangling_last_checkpoint_names_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last_checkpoint").write_text("model_0000199.pth")
    trainer = seeded_trainer(tiny_run_cfg(out))
    with pytest.raises(FileNotFoundError, match=r"last_checkpoint names model_0000199\.pth, but .* does not exist") as e:
        trainer.resume_or_load(resume=True)
    assert "Write the name of an existing checkpoint of this folder into last_checkpoint, or delete " \
        "last_checkpoint to start from MODEL.WEIGHTS" in str(e.value)  # how to fix it


class _StateAfter(HookBase):
    def __init__(self, iteration):
        self.iteration, self.state = iteration, None

    def after_step(self):
        if self.trainer.iter == self.iteration:
            self.state = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}


def test_nan_loss_stops_with_the_terms_after_saving_the_last_good_state(tmp_path):
    out = tmp_path / "run"
    trainer = seeded_trainer(tiny_run_cfg(out, "SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "2"))
    trainer.resume_or_load(resume=False)
    after2 = _StateAfter(2)
    trainer.register_hooks([after2])
    model, seen = trainer.model, {}
    head_forward, sgr_forward = model.sem_seg_head.forward, model.sgr_criterion.forward

    def nan_head(features, targets=None):  # the head's loss becomes NaN at iteration 3
        logits, losses = head_forward(features, targets)
        if trainer.iter == 3:
            losses = {k: v * float("nan") for k, v in losses.items()}
            seen.update({k: v.item() for k, v in losses.items()})
        return logits, losses

    def record_sgr(*args, **kwargs):
        losses = sgr_forward(*args, **kwargs)
        if trainer.iter == 3:
            seen.update({k: v.item() for k, v in losses.items()})
        return losses

    model.sem_seg_head.forward, model.sgr_criterion.forward = nan_head, record_sgr
    with pytest.raises(FloatingPointError) as e:
        trainer.train()
    msg = str(e.value)
    assert "at iteration 3 (non-finite: loss_sem_seg)" in msg
    reported = {k: float(v) for k, v in re.findall(r"(loss_\w+)=(nan|-?inf|-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)", msg)}
    assert set(reported) == set(seen) == {"loss_sem_seg", "loss_sgr_union", "loss_sgr_cls", "loss_sgr_div"}
    assert math.isnan(reported["loss_sem_seg"])
    for k in ("loss_sgr_union", "loss_sgr_cls", "loss_sgr_div"):
        assert reported[k] == pytest.approx(seen[k], rel=1e-5)
    assert str(out / "model_last_good.pth") in msg

    # saved: the state after iteration 2, BatchNorm statistics included (the bad batch's forward
    # pass had updated them), before the bad step's update; and the live model was not updated
    assert (out / "last_checkpoint").read_text() == "model_last_good.pth"
    ckpt = torch.load(out / "model_last_good.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 2 and ckpt["trainer"]["iteration"] == 2
    assert set(ckpt["model"]) == set(after2.state)
    for k, v in after2.state.items():
        assert torch.equal(ckpt["model"][k], v), k
        assert torch.equal(model.state_dict()[k], v), k
    assert any("running_mean" in k for k in after2.state)
    assert not (out / "model_0000003.pth").exists() and not (out / "model_final.pth").exists()
    # --resume continues from it: iteration 3, with the LR schedule of iteration 3
    again = seeded_trainer(tiny_run_cfg(out, "SOLVER.MAX_ITER", "8"))
    again.resume_or_load(resume=True)
    assert again.start_iter == 3
    assert again.scheduler.last_epoch == 3


# =========================================================================== 4. several workers
def _criterion_batch():
    """Region maps, token logits and component targets of 4 images with 2, 0, 5 and 3 components
    (worker r gets images 2r and 2r+1: 2 vs 7 components, 4 vs 8 matched tokens, 3 vs 11 pairs of
    matched tokens of different components)."""
    g = torch.Generator().manual_seed(0)
    k, h, size, num_classes = 8, 8, 32, 6
    logits = torch.randn(4, k, h, h, generator=g)
    token_logits = torch.randn(4, k, num_classes, generator=g)
    targets = []
    for n in (2, 0, 5, 3):
        cols = torch.arange(size) * n // size  # n vertical stripes (none: an all-ignore image)
        masks = (cols[None, None, :] == torch.arange(n)[:, None, None]).expand(n, size, size).clone()
        targets.append({"masks": masks, "classes": torch.arange(n) % num_classes})
    return logits, token_logits, targets


def _criterion_losses(logits, token_logits, targets):
    regions = logits.softmax(1).detach().requires_grad_(True)
    losses = SGRCriterion(num_matched=4)({"region_maps": regions, "token_logits": token_logits}, targets)
    sum(losses.values()).backward()
    return {k: v.item() for k, v in losses.items()}, regions.grad


def _two_workers_main(out_dir):
    """Runs in each of the two workers that sgr_d2.engine.workers.launch starts: reports what the
    worker sees of the process group, and computes the SGR loss of its share of the batch."""
    import torch.distributed as dist
    from detectron2.utils import comm

    torch.set_num_threads(1)
    rank = comm.get_rank()
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    logits, token_logits, targets = _criterion_batch()
    mine = slice(2 * rank, 2 * rank + 2)
    losses, grad = _criterion_losses(logits[mine], token_logits[mine], targets[mine])
    report = {"world_size": comm.get_world_size(), "rank": rank, "local_rank": comm.get_local_rank(),
              "local_size": comm.get_local_size(), "sum": t.item(), "backend": dist.get_backend(),
              "losses": losses, "grad": grad}
    torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))
    atexit.register(_record_at_exit, os.path.join(out_dir, f"exit{rank}.json"), thread_count())


def _record_at_exit(path, threads_in_main):
    """At the start of a worker's interpreter shutdown: is a process group left, and how many
    threads run, against how many ran in the worker's main function."""
    import torch.distributed as dist
    from detectron2.utils import comm

    with open(path, "w") as f:
        json.dump({"initialized": dist.is_initialized(), "local_group": comm._LOCAL_PROCESS_GROUP is not None,
                   "threads_in_main": threads_in_main, "threads_at_exit": thread_count()}, f)


@pytest.fixture(scope="module")
def two_gloo_workers(module_tmp):
    """One run of ``sgr_d2.engine.workers.launch(main, num_gpus_per_machine=2)`` on this CPU
    machine (detectron2 v0.6: workers._cpu_worker spawns the processes and joins a gloo group
    through a file:// URL), shared by the two tests below: starting workers costs seconds of imports."""
    if torch.cuda.is_available():
        pytest.skip("with CUDA, workers.launch is detectron2's own launcher (NCCL)")
    d = module_tmp
    assert not torch.distributed.is_initialized()
    launch(_two_workers_main, 2, dist_url=f"file://{d / 'init'}", args=(str(d),))
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_compat_launch_runs_two_gloo_workers_on_the_cpu(two_gloo_workers):
    # (whether workers.launch starts the workers itself, i.e. detectron2's launcher needs CUDA,
    # is checked against the installed launcher's behaviour in test_compat.py)
    reports = two_gloo_workers
    assert [(d["rank"], d["local_rank"]) for d in reports] == [(0, 0), (1, 1)]
    assert all(d["world_size"] == 2 and d["local_size"] == 2 for d in reports)
    assert all(d["sum"] == 3.0 and d["backend"] == "gloo" for d in reports)  # they communicate


def test_compat_launch_workers_release_their_process_groups_before_exit(two_gloo_workers, module_tmp):
    """Each worker destroys its process groups after its main function returns, before the
    interpreter shuts down (workers.run_then_release): otherwise a gloo thread may drop a finished
    collective during the shutdown and the worker dies of SIGABRT after its work is done."""
    for r in (0, 1):
        at_exit = json.loads((module_tmp / f"exit{r}.json").read_text())
        assert at_exit["initialized"] is False and at_exit["local_group"] is False, (r, at_exit)
        if at_exit["threads_in_main"] is not None:
            # both groups (world, local), each with two gloo worker threads and a transport loop
            assert at_exit["threads_at_exit"] <= at_exit["threads_in_main"] - 2 * 3, (r, at_exit)


def test_sgr_criterion_split_over_two_gloo_workers_equals_one_process(two_gloo_workers):
    workers = two_gloo_workers
    logits, token_logits, targets = _criterion_batch()
    whole, whole_grad = _criterion_losses(logits, token_logits, targets)
    # each worker's share in this (non-distributed) process: normalised by its own counts
    local = [_criterion_losses(logits[s], token_logits[s], targets[s])[0] for s in (slice(0, 2), slice(2, 4))]
    for k in ("loss_sgr_union", "loss_sgr_cls", "loss_sgr_div"):
        # DDP averages the workers' losses: with the counts averaged across workers, that mean is
        # the loss of the whole batch in one process ...
        mean = (workers[0]["losses"][k] + workers[1]["losses"][k]) / 2
        assert mean == pytest.approx(whole[k], rel=1e-5), k
        # ... which normalising by each worker's own count would miss (the diversity term: 3 and
        # 11 pairs, (0.1174 + 0.1116) / 2 against 0.1129)
        assert (local[0][k] + local[1][k]) / 2 != pytest.approx(whole[k], rel=1e-3), k
    # and the gradient DDP applies (the mean of the workers'), all three terms, is the one-process gradient
    for r in (0, 1):
        assert torch.allclose(workers[r]["grad"] / 2, whole_grad[2 * r:2 * r + 2], rtol=1e-5, atol=1e-9)

