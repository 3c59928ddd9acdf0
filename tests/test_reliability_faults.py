"""Trustworthy runs, second pass (docs/reliability.md): a resumed run equals the uninterrupted
one, divergence is caught wherever it appears and leaves a sane state to resume from, a kill at
any moment leaves a complete run possible, bad values are refused, and workers stop with their
launcher (also with a worker whose images have no labelled pixel)."""
import itertools
import math
import os
import re
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import (CLI, REPO, TOY_SGR, assert_unchanged, child_env, earlier_outputs, image_label_pair, log_records,
                      seeded_trainer, thread_count, tiny_run_cfg, tiny_toy_cfg)
from PIL import Image

from detectron2.engine import HookBase

from sgr_d2.engine.checkpoint import AtomicCheckpointer, atomic_torch_save
from sgr_d2.engine.hooks import MAX_NORM_GROWTH
from sgr_d2.engine.trainer import argument_parser, run
from sgr_d2.config import setup_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

LOSSES = ("loss_sem_seg", "loss_sgr_union", "loss_sgr_cls", "loss_sgr_div")


class _Killed(Exception):
    """Stands for a SIGKILL: the run stops between two iterations, keeping only its files."""


class _KillBefore(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            raise _Killed(self.iteration)


def _history(trainer, keys=LOSSES):
    return {k: [v for v, _ in trainer.storage.history(k).values()] for k in keys}


def _param_norm(state, names):
    return math.sqrt(sum(float(state[n].double().pow(2).sum()) for n in names))


# =========================================================================== 1. resume = uninterrupted
@pytest.mark.parametrize("optimizer", ["SGD", "ADAMW"])
def test_resumed_run_equals_the_uninterrupted_run(tmp_path, optimizer):
    """One process, NUM_WORKERS 0: a run stopped during iteration 4 and resumed from
    model_0000002.pth ends with the parameters, buffers, optimizer state and losses of the run
    that was never stopped, bit for bit. It needs the optimizer's state (SGD's momentum, AdamW's
    moments and step counts), the LR schedule, the sampler's shuffling seed and position and the
    random state (colour augmentation, flips, dropout) restored. The resumed command gives another
    SEED (the sampler's seed must come from the checkpoint) and a MODEL.WEIGHTS that does not
    exist (resuming ignores it)."""
    opts = ("SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.OPTIMIZER", optimizer)
    whole = seeded_trainer(tiny_run_cfg(tmp_path / "whole", *opts, "SEED", "5"))
    whole.resume_or_load(resume=False)
    whole.train()

    out = tmp_path / "stopped"
    first = seeded_trainer(tiny_run_cfg(out, *opts, "SEED", "5"))
    first.resume_or_load(resume=False)
    first.register_hooks([_KillBefore(4)])
    with pytest.raises(_Killed):
        first.train()
    assert (out / "last_checkpoint").read_text() == "model_0000002.pth"
    ckpt = torch.load(out / "model_0000002.pth", map_location="cpu", weights_only=True)
    assert ckpt["trainer"]["_trainer"]["optimizer"]["state"]  # momentum buffers / moments are saved
    assert ckpt["trainer"]["data"]["position"] == 3 * 2  # 3 iterations of IMS_PER_BATCH 2
    del first

    resumed = seeded_trainer(tiny_run_cfg(out, *opts, "SEED", "6", "MODEL.WEIGHTS", str(tmp_path / "no_such_weights.pth")))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    resumed.train()

    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert set(a) == set(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == []
    sa, sb = whole.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    expected_keys = {"momentum_buffer"} if optimizer == "SGD" else {"exp_avg", "exp_avg_sq", "step"}
    assert sa and sa.keys() == sb.keys() and all(set(sa[i]) == set(sb[i]) == expected_keys for i in sa)
    assert all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])) for i in sa for k in sa[i])
    assert [g["lr"] for g in whole.optimizer.param_groups] == [g["lr"] for g in resumed.optimizer.param_groups]
    hw, hr = _history(whole), _history(resumed)
    assert all(hw[k][3:] == hr[k] for k in LOSSES), (hw, hr)  # iterations 3, 4, 5


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_worker_resumes_its_share_of_the_stream(monkeypatch, world_size):
    """The data position is one for all workers together: resumed at position 6, worker r of W
    continues with stream positions 6 + r, 6 + r + W, ... of the same shuffled stream, which is
    what the uninterrupted run's worker r would have read next (6 is a multiple of W)."""
    from detectron2.data.samplers import TrainingSampler
    from detectron2.utils import comm

    from sgr_d2.engine.resume import ResumableSampler
    monkeypatch.setattr(comm, "get_world_size", lambda: 1)
    monkeypatch.setattr(comm, "get_rank", lambda: 0)
    stream = list(itertools.islice(iter(TrainingSampler(10, shuffle=True, seed=3)), 40))
    monkeypatch.setattr(comm, "get_world_size", lambda: world_size)
    for rank in range(world_size):
        monkeypatch.setattr(comm, "get_rank", lambda: rank)
        sampler = ResumableSampler(TrainingSampler(10, shuffle=True, seed=11))
        sampler.seed, sampler.start = 3, 6  # what resuming sets from the checkpoint
        got = list(itertools.islice(iter(sampler), 8))
        assert got == stream[6 + rank::world_size][:8], (rank, got)


# =========================================================================== 2, 3. divergence
def _nan_region_maps_at(model, trainer, iteration):
    """Make the SGR module's region maps NaN at ``iteration`` (its features stay finite)."""
    def hook(module, args, output):
        y, outputs = output
        if trainer.iter == iteration:
            outputs = dict(outputs, region_maps=outputs["region_maps"] * float("nan"))
        return y, outputs

    return model.backbone.sgr.register_forward_hook(hook)


def test_non_finite_region_maps_reach_the_loss_guard(tmp_path):
    """The SGR criterion returns NaN terms instead of failing in the matching, so the guard stops
    the run as for a NaN head loss: its message, and the last good state saved and tagged."""
    out = tmp_path / "run"
    trainer = seeded_trainer(tiny_run_cfg(out, "SOLVER.MAX_ITER", "5"))
    trainer.resume_or_load(resume=False)
    _nan_region_maps_at(trainer.model, trainer, 2)
    with pytest.raises(FloatingPointError) as e:
        trainer.train()
    msg = str(e.value)
    assert "at iteration 2 (non-finite: loss_sgr_cls, loss_sgr_div, loss_sgr_union)" in msg
    reported = dict(re.findall(r"(loss_\w+)=(\S+?)[,.;]? ", msg + " "))
    assert math.isfinite(float(reported["loss_sem_seg"]))  # the head's features were finite
    assert str(out / "model_last_good.pth") in msg
    assert (out / "last_checkpoint").read_text() == "model_last_good.pth"
    ckpt = torch.load(out / "model_last_good.pth", map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 1


def test_non_finite_mask_predictions_reach_the_loss_guard(tmp_path):
    """MaskFormer's Hungarian matching on diverged predictions: the criterion skips the matching
    (its cost would be NaN, which the matcher refuses inside the forward pass) and returns NaN
    terms, so the guard stops the run with its message and the last good state, as for SGR."""
    out = tmp_path / "run"
    config = os.path.join(REPO, "configs", "toy", "maskformer_r18_sgr.yaml")
    trainer = seeded_trainer(tiny_toy_cfg(config, "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "5", "DATASETS.TEST", "()",
                                    "INPUT.CROP.SIZE", "(64, 64)", "INPUT.MIN_SIZE_TRAIN", "(64,)",
                                    "SOLVER.CHECKPOINT_PERIOD", "1000"))
    trainer.resume_or_load(resume=False)

    def nan_masks(module, args, output):
        if trainer.iter == 2:
            output = dict(output, pred_masks=output["pred_masks"] * float("nan"))
        return output

    trainer.model.sem_seg_head.predictor.register_forward_hook(nan_masks)
    with pytest.raises(FloatingPointError) as e:
        trainer.train()
    msg = str(e.value)
    assert "HungarianMatcher" not in msg
    non_finite = re.search(r"at iteration 2 \(non-finite: ([^)]*)\)", msg)
    assert non_finite, msg
    assert {"loss_ce", "loss_mask", "loss_dice"} <= set(non_finite.group(1).split(", ")), msg
    assert str(out / "model_last_good.pth") in msg
    assert (out / "last_checkpoint").read_text() == "model_last_good.pth"
    ckpt = torch.load(out / "model_last_good.pth", map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 1


class _LearningRate(HookBase):
    """From ``iteration`` on, every group's LR is ``lr``: the run diverges."""

    def __init__(self, iteration, lr):
        self.iteration, self.lr = iteration, lr

    def before_step(self):
        if self.trainer.iter >= self.iteration:
            for g in self.trainer.optimizer.param_groups:
                g["lr"] = self.lr


def test_divergence_keeps_a_sane_state_and_a_lower_lr_takes_effect_on_resume(tmp_path):
    """A run whose LR jumps to 100 at iteration 3 (checkpoints after every iteration) diverges:
    the weights explode before a loss becomes NaN. The guard stops it, and last_checkpoint names
    the newest checkpoint whose weights are finite and within MAX_NORM_GROWTH of the start's
    norm: the one after iteration 2, not a later exploded one. ``--resume`` with a lower
    SOLVER.BASE_LR continues from it with the new LR (logged), the checkpoint's momentum kept."""
    out, max_iter = tmp_path / "run", 12
    opts = ("SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "1")
    trainer = seeded_trainer(tiny_run_cfg(out, *opts))
    trainer.resume_or_load(resume=False)
    names = [n for n, _ in trainer.model.named_parameters()]
    start_norm = _param_norm(trainer.model.state_dict(), names)
    trainer.register_hooks([_LearningRate(3, 100.0)])
    with pytest.raises(FloatingPointError) as e:  # not match_tokens' ValueError
        trainer.train()
    msg = str(e.value)
    bad = int(re.search(r"at iteration (\d+)", msg).group(1))
    assert 3 < bad < max_iter

    def sane(path):
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        finite = all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        return finite and _param_norm(state, names) <= MAX_NORM_GROWTH * start_norm

    saved = {int(p.name[6:13]): p for p in out.glob("model_0*.pth")}
    assert sorted(saved) == list(range(bad))  # a checkpoint after each good iteration
    assert [i for i in sorted(saved) if sane(saved[i])] == [0, 1, 2]  # the LR jump exploded the weights
    tagged = (out / "last_checkpoint").read_text()
    assert tagged == "model_0000002.pth", msg
    assert not (out / "model_last_good.pth").exists()  # the state after bad - 1 was not sane
    assert f"last_checkpoint now names {tagged} (iteration 2)" in msg

    # --resume with SOLVER.BASE_LR 0.001 (the recipe's is 0.01), and momentum and weight decay
    # changed too (0.9 and 1e-4 in the recipe)
    new_opts = ("SOLVER.BASE_LR", "0.001", "SOLVER.MOMENTUM", "0.8", "SOLVER.WEIGHT_DECAY", "0.0003")
    with log_records("sgr_d2.engine.resume") as logged:
        again = seeded_trainer(tiny_run_cfg(out, *opts, *new_opts))
        again.resume_or_load(resume=True)
    assert again.start_iter == 3
    fresh = seeded_trainer(tiny_run_cfg(tmp_path / "fresh", *opts, *new_opts))  # the config's LRs
    for key in ("momentum", "weight_decay"):  # every group's, from the config, not the checkpoint
        assert [g[key] for g in again.optimizer.param_groups] == [g[key] for g in fresh.optimizer.param_groups]
    assert {g["momentum"] for g in again.optimizer.param_groups} == {0.8}
    assert 0.0003 in {g["weight_decay"] for g in again.optimizer.param_groups}
    poly = (1 - 3 / max_iter) ** 0.9
    expected = [g["lr"] * poly for g in fresh.optimizer.param_groups]
    assert [g["lr"] for g in again.optimizer.param_groups] == pytest.approx(expected, rel=1e-9)
    assert again.scheduler.base_lrs == [g["lr"] for g in fresh.optimizer.param_groups]
    assert any("the config's learning rates replace the checkpoint's" in m and "0.01 -> 0.001" in m
               for m in logged), logged
    ckpt = torch.load(out / tagged, map_location="cpu", weights_only=True)["trainer"]["_trainer"]["optimizer"]
    state = again.optimizer.state_dict()["state"]
    assert all(torch.equal(state[i]["momentum_buffer"], ckpt["state"][i]["momentum_buffer"]) for i in state)
    again.max_iter = 5
    again.train()  # and it trains on with finite losses
    assert all(math.isfinite(v) for k in LOSSES for v in _history(again)[k])


def test_divergence_without_a_sane_checkpoint_removes_the_tag(tmp_path):
    """SOLVER.BASE_LR 1e2 from the start, no periodic checkpoint: no state of the run is sane,
    so the tag an earlier run left is removed and --resume starts again at iteration 0."""
    out = tmp_path / "run"
    earlier_outputs(out)  # last_checkpoint names an earlier run's model_final.pth
    trainer = seeded_trainer(tiny_run_cfg(out, "SOLVER.BASE_LR", "100.0", "SOLVER.MAX_ITER", "12"))
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError) as e:
        trainer.train()
    msg = str(e.value)
    assert "No checkpoint of this run passed the sanity check" in msg and "was removed" in msg
    assert not (out / "last_checkpoint").exists() and not (out / "model_last_good.pth").exists()
    again = seeded_trainer(tiny_run_cfg(out, "SOLVER.BASE_LR", "0.01", "SOLVER.MAX_ITER", "12"))
    again.resume_or_load(resume=True)
    assert again.start_iter == 0


def test_divergence_after_resuming_falls_back_to_the_checkpoint_resumed_from(tmp_path):
    """A run killed before iteration 3 leaves model_0000001.pth; resumed with the LR jumping to 100,
    it saves only exploded checkpoints before a loss becomes NaN. The newest sane state is the
    checkpoint it resumed from, which last_checkpoint then names; the message advises a lower
    SOLVER.BASE_LR."""
    out, opts = tmp_path / "run", ("SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "2")
    first = seeded_trainer(tiny_run_cfg(out, *opts))
    first.resume_or_load(resume=False)
    first.register_hooks([_KillBefore(3)])
    with pytest.raises(_Killed):
        first.train()
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    again = seeded_trainer(tiny_run_cfg(out, *opts))
    again.resume_or_load(resume=True)
    assert again.start_iter == 2
    again.register_hooks([_LearningRate(2, 100.0)])
    with pytest.raises(FloatingPointError) as e:
        again.train()
    msg = str(e.value)
    assert not (out / "model_last_good.pth").exists(), msg  # the state before the NaN was not sane
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth", msg
    assert "last_checkpoint now names model_0000001.pth (iteration 1)" in msg
    assert "SOLVER.BASE_LR" in msg


# =========================================================================== 4. kills and files
def test_a_kill_during_the_final_write_still_ends_with_model_final(tmp_path):
    """MAX_ITER a multiple of CHECKPOINT_PERIOD; SIGKILL while model_final.pth is written leaves
    last_checkpoint at model_0000001.pth and the temporary file of the write. --resume (at
    iteration MAX_ITER: nothing left to train) writes model_final.pth and removes the file."""
    out = tmp_path / "run"
    opts = ("SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "2")
    trainer = seeded_trainer(tiny_run_cfg(out, *opts))
    trainer.resume_or_load(resume=False)
    trainer.train()
    # what the kill leaves: the tag names the periodic checkpoint, the final write is a .tmp
    (out / "model_final.pth").unlink()
    (out / "last_checkpoint").write_text("model_0000001.pth")
    stale = [out / ".model_final.pth.0a1b2c3d4e5f.tmp", out / ".last_checkpoint.k2x_9q7w.tmp"]
    stale[0].write_bytes(b"half a checkpoint")
    stale[1].write_text("model_fi")
    keep = out / ".notes.tmp"  # not a name a checkpoint write makes
    keep.write_text("x")
    with log_records("sgr_d2") as logged:
        resumed = seeded_trainer(tiny_run_cfg(out, *opts))
        resumed.resume_or_load(resume=True)
    assert not any(p.exists() for p in stale) and keep.exists()
    assert any("Removed 2 temporary file(s) left by interrupted checkpoint writes" in m for m in logged), logged
    assert resumed.start_iter == 2
    resumed.train()
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    periodic = torch.load(out / "model_0000001.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 1 and final["trainer"]["iteration"] == 1
    assert all(torch.equal(final["model"][k], periodic["model"][k]) for k in periodic["model"])
    assert (out / "last_checkpoint").read_text() == "model_final.pth"


def test_a_write_is_flushed_to_disk_before_the_rename_and_a_failed_tag_write_keeps_the_tag(tmp_path, monkeypatch):
    """Checkpoint and tag writes: the temporary file is fsync'ed, then renamed over the target; a
    tag write that fails (here the rename) leaves the previous tag and no temporary file."""
    ck = AtomicCheckpointer(torch.nn.Linear(2, 1), save_dir=str(tmp_path))
    ck.tag_last_checkpoint("model_0000001.pth")
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.basename(
        os.readlink(f"/proc/self/fd/{fd}")))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.path.basename(a),
                                                                     os.path.basename(b))), real_replace(a, b))[1])
    ck.save("model_0000002")
    tmp_pth, tmp_tag = events[0][1], events[2][1]
    assert re.fullmatch(r"\.model_0000002\.pth\.\w+\.tmp", tmp_pth) and re.fullmatch(r"\.last_checkpoint\.\w+\.tmp", tmp_tag)
    assert events == [("fsync", tmp_pth), ("replace", tmp_pth, "model_0000002.pth"),
                      ("fsync", tmp_tag), ("replace", tmp_tag, "last_checkpoint")]

    def no_rename(a, b):
        raise OSError(5, "Input/output error (simulated)")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="simulated"):
        ck.tag_last_checkpoint("model_0000003.pth")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000002.pth"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoints_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        model = torch.nn.Linear(2, 2)
        AtomicCheckpointer(model, str(tmp_path)).save("model_0000000", iteration=0)
        atomic_torch_save({"x": torch.zeros(1)}, str(tmp_path / "other.pth"))
    finally:
        os.umask(old)
    for name in ("model_0000000.pth", "last_checkpoint", "other.pth"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name


def _checkpoints(folder, iterations):
    """A model and checkpoints model_<i>.pth, each with the model's weights + i."""
    model = torch.nn.Linear(3, 2)
    ckpt = AtomicCheckpointer(model, str(folder))
    for i in iterations:
        with torch.no_grad():
            model.weight.fill_(i)
        ckpt.save(f"model_{i:07d}", iteration=i)
    return model


@pytest.mark.parametrize("fault", ["truncated", "missing", "garbage"])
def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, fault):
    _checkpoints(tmp_path, [1, 3, 5])
    newest = tmp_path / "model_0000005.pth"
    if fault == "truncated":
        data = newest.read_bytes()
        newest.write_bytes(data[: len(data) // 2])
    elif fault == "missing":
        (tmp_path / "last_checkpoint").write_text("model_0000007.pth")
    else:
        newest.write_bytes(b"not a checkpoint")
    (tmp_path / "notes.pth").write_bytes(b"\x80 not a checkpoint either")
    model = torch.nn.Linear(3, 2)
    with log_records("sgr_d2.engine.checkpoint") as logged:
        extra = AtomicCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    # the newest readable one: 5 when the tag names a missing file, else 3
    named, it = ("model_0000007.pth", 5) if fault == "missing" else ("model_0000005.pth", 3)
    assert extra["iteration"] == it and bool((model.weight == it).all())
    assert any(f"last_checkpoint names {named}, but" in m and f"model_{it:07d}.pth instead (iteration {it})" in m
               for m in logged), logged


# =========================================================================== 6. bad values


def test_eval_only_without_weights_needs_an_explicit_flag(tmp_path):
    out = tmp_path / "run"
    earlier = earlier_outputs(out)
    (out / "last_checkpoint").unlink()
    del earlier["last_checkpoint"]
    base = ["--config-file", TOY_SGR, "--eval-only"]
    with pytest.raises(ValueError, match=r"--eval-only with an empty MODEL\.WEIGHTS .*--allow-random-weights"):
        run(argument_parser().parse_args(base + ["OUTPUT_DIR", str(out)]))
    assert_unchanged(out, earlier)
    # the explicit flag, or --resume with a checkpoint to evaluate, gets past the check
    cfg = setup_cfg(argument_parser().parse_args(base + ["--allow-random-weights", "OUTPUT_DIR", str(tmp_path / "a")]))
    assert cfg.MODEL.WEIGHTS == ""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "last_checkpoint").write_text("model_final.pth")
    setup_cfg(argument_parser().parse_args(base + ["--resume", "OUTPUT_DIR", str(tmp_path / "b")]))


def _unlabelled_pair(folder, stem):
    d = image_label_pair(folder, stem)
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(d["sem_seg_file_name"])
    return d


def test_a_training_set_without_labelled_pixels_is_reported(tmp_path, register):
    data = tmp_path / "data"
    data.mkdir()
    blank = register([_unlabelled_pair(data, "a"), _unlabelled_pair(data, "b")])
    with log_records("sgr_d2.engine.hooks") as logged:
        trainer = seeded_trainer(tiny_run_cfg(tmp_path / "run", "DATASETS.TRAIN", f"('{blank}',)", "SOLVER.MAX_ITER", "3"))
        trainer.train()
    assert all(v == 0 for k in LOSSES for v in _history(trainer)[k])  # what the warning is about
    warnings = [m for m in logged if "No training image has a labelled pixel" in m]
    assert len(warnings) == 1 and "all 6 images (2 files) of the first 3 iteration(s)" in warnings[0], logged
    # one labelled image among them: no warning
    mixed = register([_unlabelled_pair(data, "c"), image_label_pair(data, "d")])
    with log_records("sgr_d2.engine.hooks") as logged:
        seeded_trainer(tiny_run_cfg(tmp_path / "run2", "DATASETS.TRAIN", f"('{mixed}',)", "SOLVER.MAX_ITER", "2")).train()
    assert not [m for m in logged if "labelled pixel" in m]


# =========================================================================== 8, 10. several workers
def _children(pid):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_stop_when_their_launcher_is_killed(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", TOY_SGR, "--num-gpus", "2",
           "--dist-url", f"file://{tmp_path / 'init'}", *CLI, "SOLVER.MAX_ITER", "100000", "OUTPUT_DIR", str(out)]
    log = open(tmp_path / "launcher.log", "w")
    # The launcher ignores SIGINT, as a job started in the background of a non-interactive shell
    # does. The workers inherit that, so torch's own safety net (spawn sets PR_SET_PDEATHSIG to
    # SIGINT) cannot stop them: only sgr_d2's watch on the launcher does. Without this, the test
    # would pass with that watch removed.
    launcher = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    workers = []
    try:
        deadline = time.time() + 300
        while not ((out / "log.txt").is_file() and "Starting training from iteration 0" in (out / "log.txt").read_text()):
            assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            assert time.time() < deadline, "the workers did not start training within 5 minutes"
            time.sleep(0.2)
        workers = [c for c in _children(launcher.pid) if "resource_tracker" not in _cmdline(c)]
        assert len(workers) == 2, [(c, _cmdline(c)) for c in workers]
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 5
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert [w for w in workers if _alive(w)] == []
    finally:
        for w in [launcher.pid, *workers]:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        log.close()


_WATCHED_WORKER = """
import multiprocessing, os, sys, time
def worker(pid_file):
    from sgr_d2.engine import workers
    workers._PR_SET_PDEATHSIG = 0  # an invalid prctl option: only the watch thread is left
    assert workers.stop_with_launcher(period_s=0.2)
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    p = multiprocessing.Process(target=worker, args=(sys.argv[1],))
    p.start()
    while not os.path.exists(sys.argv[1] + ".done"):
        time.sleep(0.05)
    os._exit(0)  # the launcher dies without stopping its worker
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_watch_thread_alone_stops_a_worker_whose_launcher_died(tmp_path):
    """Without the kernel's parent-death signal, the thread that checks the parent's pid makes
    the worker exit once its launcher is gone; a process that multiprocessing did not start
    (this one) is left alone."""
    from sgr_d2.engine import workers
    before = {t.name for t in __import__("threading").enumerate()}
    assert workers.stop_with_launcher() is False
    assert "sgr_d2-launcher-watch" not in {t.name for t in __import__("threading").enumerate()} - before
    script, pid_file = tmp_path / "launcher.py", tmp_path / "worker.pid"
    script.write_text(_WATCHED_WORKER)
    env = dict(child_env(), PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    launcher = subprocess.Popen([sys.executable, str(script), str(pid_file)], cwd=REPO, env=env)
    worker = None
    try:
        deadline = time.time() + 60
        while not (pid_file.is_file() and pid_file.read_text()):
            assert launcher.poll() is None and time.time() < deadline
            time.sleep(0.05)
        worker = int(pid_file.read_text())
        assert _alive(worker)
        (tmp_path / "worker.pid.done").touch()
        launcher.wait(timeout=30)
        deadline = time.time() + 5
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), "the worker outlived its launcher by 5 s"
    finally:
        for pid in (launcher.pid, worker):
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_release_process_groups_joins_the_gloo_threads_of_every_group(tmp_path):
    """A worker's process groups, including those only detectron2 still holds (its local group
    and its cached gloo group) and one held in a garbage reference cycle (as a finished trainer
    holds its DDP model, which holds its group), are gone after release_process_groups: the
    threads each gloo group started (its worker threads and its transport loop) have ended, so
    none of them can drop a finished collective during the interpreter's shutdown (the SIGABRT
    of a worker whose work was done). That happens once the worker's main function has returned,
    not when it raised. A second call finds nothing to release."""
    import torch.distributed as dist
    from detectron2.utils import comm

    from sgr_d2.engine.workers import release_process_groups, run_then_release

    assert not dist.is_initialized()
    baseline = thread_count()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", world_size=1, rank=0)
    try:
        comm._LOCAL_PROCESS_GROUP = dist.new_group([0])  # as detectron2's launcher sets it
        assert comm.get_local_size() == 1
        # what comm.all_gather uses with several workers (with one, it returns before)
        assert comm._get_global_gloo_group() is not None
        cycle = {"group": dist.new_group([0])}
        cycle["self"] = cycle
        del cycle
        assert thread_count() >= baseline + 3 * 2  # three groups, each with its gloo worker threads
        with pytest.raises(ZeroDivisionError):  # a failing worker keeps its groups: it exits at once
            run_then_release(lambda: 1 / 0)
        assert dist.is_initialized() and comm._LOCAL_PROCESS_GROUP is not None
        assert run_then_release(lambda x: x + 1, 1) == 2
        assert not dist.is_initialized() and comm._LOCAL_PROCESS_GROUP is None
        assert thread_count() == baseline
        assert release_process_groups() is False
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        comm._LOCAL_PROCESS_GROUP = None
        comm._get_global_gloo_group.cache_clear()


def test_random_states_round_trip_on_the_device(device):
    """rng_state / set_rng_state bring back Python's, NumPy's, torch's and (on a GPU) the current
    CUDA device's generators: the draws after restoring equal the draws after saving. Catches a
    CUDA state left out (on a GPU) or restored for another device."""
    import random

    from sgr_d2.engine.resume import rng_state, set_rng_state

    torch.zeros(1, device=device)  # CUDA is initialised once a tensor lives there
    state = rng_state()
    assert ("cuda" in state) == (device.type == "cuda")

    def draws():
        return (random.random(), float(np.random.rand()), float(torch.rand(1)),
                float(torch.rand(1, device=device)))

    first = draws()
    set_rng_state(torch.load(_saved(state), weights_only=True))
    assert draws() == first


def _saved(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
