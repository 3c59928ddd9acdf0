"""bench/gpu_check.py: its CPU run (``--tiny``, what CI runs so that the GPU check cannot rot) and
the verdicts it gives: a diverging or non-finite training and failing device tests are FAIL; a
training whose first updates the GradScaler skipped is judged on the applied ones.

The tiny run is gpu_check's ``main(["--tiny", ...])`` in this process (its own process would pay
the imports again); its part (b) still starts pytest in a child process, as on a GPU. The checks
of the verdicts train the toy Dilated-FCN (``configs/toy/dil_fcn_r18_sgr.yaml``, about a
tenth of dil_fcn_r50_sgr's parameters): what they check is gpu_check's bookkeeping, not the model."""
import contextlib
import gc
import importlib.util
import io
import math
import os
import re
import sys
import textwrap

import pytest
import torch

from conftest import REPO, forked_subprocess

SCRIPT = os.path.join(REPO, "bench", "gpu_check.py")
TINY_CONFIGS = ("dil_fcn_r18_sgr", "mask2former_r18_sgr")  # gpu_check's TINY_CONFIGS (configs/toy)
TOY = "toy/dil_fcn_r18_sgr"  # the config the verdict checks train (gpu_check.config_file's name)
NUMBER = r"[-+0-9.eE]+|nan|inf|-inf|n/a"


def _load():
    spec = importlib.util.spec_from_file_location("_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(text, header_start):
    """The body rows (lists of stripped cells) of the Markdown table whose header starts with
    ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


class _Tee(io.TextIOBase):
    """What is written to it goes to ``stream`` and, while ``text`` is not None, into ``text`` too
    (detectron2's loggers keep the sys.stdout they were set up with: after the run this one
    still writes where pytest's capture wants it)."""

    def __init__(self, stream):
        self.stream, self.text = stream, io.StringIO()

    def write(self, s):
        if self.text is not None:
            self.text.write(s)
        return self.stream.write(s)

    def flush(self):
        self.stream.flush()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", None)


@pytest.fixture(scope="module")
def tiny_run(module_tmp):
    """``bench/gpu_check.py --tiny --out FILE`` run in this process on one thread: (exit status,
    what it printed, the file). The pytest process of part (b) gets one thread and no plugin
    autoload (nothing of xdist is needed to run the device tests of one file), and is forked from
    a server that imported sgr_d2 once (conftest.forked_subprocess)."""
    g = _load()
    out = module_tmp / "gpu_check.md"
    tee, threads = _Tee(sys.stdout), torch.get_num_threads()
    gc.freeze()  # the objects of this process's imports: gpu_check's gc.collect() calls skip them
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(tee):
            for key, value in (("OMP_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"),
                               ("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")):
                mp.setenv(key, value)
            mp.setattr(g, "subprocess", forked_subprocess())
            torch.set_num_threads(1)
            returncode = g.main(["--tiny", "--out", str(out)])
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
        printed, tee.text = tee.text.getvalue(), None
    return returncode, printed, out.read_text() if out.is_file() else ""


@pytest.mark.slow
def test_tiny_run_trains_checks_and_measures(tiny_run):
    returncode, out, written = tiny_run
    # bug caught: the tiny run crashes or exits non-zero although every check passed
    assert returncode == 0, out[-6000:]
    # bug caught: the verdict line claims success without the checks having run (or vice versa)
    assert out.strip().splitlines()[-1] == "gpu_check: all checks OK"

    # bug caught: the tiny run's float32 ignored by (a) or (c) (bfloat16 is ~30x slower on this CPU)
    assert "### (a) Training check: 64x64, batch 2, cpu, float32," in out
    assert "cpu, training in float32, evaluation in float32" in out
    rows = {r[0]: r for r in _table(out, "| config |")}
    # bug caught: a tiny config is dropped from (a) or an extra one runs (the CPU budget)
    assert sorted(rows) == sorted(TINY_CONFIGS)
    for name, row in rows.items():
        iters, applied, first, last, result = int(row[1]), int(row[2]), float(row[3]), float(row[4]), row[5]
        # bug caught: the loop stops before the 3 iterations asked for; float32 has no GradScaler
        # to skip an update
        assert iters == 3 and applied == 3, row
        # bug caught: a loss recorded as NaN/inf (or not recorded) still printed as a number
        assert math.isfinite(first) and math.isfinite(last), row
        # bug caught: first and last swapped, or the optimizer step not applied (loss flat)
        assert last < first, row
        # bug caught: a row printed FAIL although finite and decreasing (judge inverted)
        assert result == "OK", row

    (tests_row,) = _table(out, "| selection |")
    # bug caught: (b) reported as failed when its selected tests pass, or passing with none run
    assert tests_row[6] == "OK" and int(tests_row[2]) >= 1, tests_row

    bench = {r[0]: r for r in _table(out, "| model | step (ms) |")}
    # bug caught: the tiny (c) pair is not both measured
    assert sorted(bench) == ["mask2former_r50", "mask2former_r50_sgr"], bench
    base, sgr = bench["mask2former_r50"], bench["mask2former_r50_sgr"]
    for row in (base, sgr):
        # bug caught: step time, memory or inference speed measured as 0 or negative (e.g. the
        # peak-RSS baseline taken after the steps instead of before)
        assert float(row[1]) > 0 and float(row[3]) > 0 and float(row[5]) > 0, row
    # bug caught: the ratio taken the wrong way round (baseline/SGR) or against the wrong row
    assert float(sgr[2]) == pytest.approx(float(sgr[1]) / float(base[1]), abs=2e-3), sgr
    assert float(sgr[4]) == pytest.approx(float(sgr[3]) / float(base[3]), abs=5e-3), sgr
    # bug caught: the baseline row given a ratio to itself or to the SGR model
    assert base[2] == "—" and base[4] == "—", base
    # bug caught: evaluation timed under autocast (what --eval-only does not do), or unlabelled
    assert "evaluation img/s (float32, as --eval-only)" in out

    trainer = _table(out, "| run |")
    # bug caught: the Trainer check (training, --resume with the evaluation, the NaN guard) not
    # run, one of its runs dropped, or a failing one printed OK
    assert [r[1] for r in trainer] == ["OK"] * 3 and len(trainer) == 3, trainer
    assert "--resume" in trainer[1][0] and "NaN" in trainer[2][0], trainer

    # bug caught: --out not written, or written without one of the four tables
    for heading in ("### (a)", "### (b)", "### (c)", "### (d)"):
        assert heading in written
    for name in TINY_CONFIGS:
        assert re.search(rf"^\| {name} \| 3 \| 3 \| ({NUMBER}) \| ({NUMBER}) \| OK \|", written, flags=re.M)


def test_judge():
    g = _load()
    # bug caught: a decreasing, finite run judged FAIL
    assert g.judge([{"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 1.0}], 2) == (True, "")
    # bug caught: "not above" used instead of "below" (a flat loss passes)
    assert not g.judge([{"a": 1.0}, {"a": 1.0}], 2)[0]
    # bug caught: only the total checked for finiteness, or only the last iteration
    ok, note = g.judge([{"a": 3.0, "b": math.inf}, {"a": 1.0, "b": 0.5}], 2)
    assert not ok and note == "non-finite b at iteration 1"
    # bug caught: a run that stopped early (an exception) judged by the iterations it recorded
    assert not g.judge([{"a": 2.0}, {"a": 1.0}], 3)[0]
    # bug caught: an error message dropped when the recorded losses look fine
    assert g.judge([{"a": 2.0}, {"a": 1.0}], 2, "RuntimeError: boom") == (False, "RuntimeError: boom")


def test_judge_takes_the_applied_updates_and_means_at_each_end():
    g = _load()

    def run(*totals):
        return [{"loss": t} for t in totals]

    # float16: the GradScaler skipped the first 3 updates (their losses: the initial weights, the
    # first a low draw of a noisy loss), then the loss falls, noisily. PASS; "last below first"
    # (3.05 against 3.0) would fail it
    healthy = run(3.0, 5.2, 4.6, 4.9, 4.0, 3.6, 3.2, 3.4, 3.05)
    skipped3 = [False] * 3 + [True] * 6
    assert g.judge(healthy, 9, applied=skipped3, window=3) == (True, "")
    assert not g.judge(healthy, 9)[0]  # what "every iteration, last below first" made of it
    # bug caught: skipped updates' losses counted (9.0 at the start would make a flat run "fall")
    flat_after_skips = run(9.0, 9.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0)
    ok, note = g.judge(flat_after_skips, 8, applied=[False] * 2 + [True] * 6, window=3)
    assert not ok and note == ("the mean total loss of the last 3 applied updates (5) is not below that of "
                               "the first 3 (5)"), note
    # bug caught: the mean at each end replaced by one value (a flat run whose last single value
    # happens to be low passes)
    assert not g.judge(run(5.0, 4.8, 4.9, 5.2, 5.3, 4.7), 6, window=3)[0]
    # an increasing run fails
    assert not g.judge(run(1.0, 1.5, 2.0, 2.5, 3.0, 3.5), 6, window=3)[0]
    # bug caught: a run whose updates were nearly all skipped judged on too few losses
    ok, note = g.judge(run(5.0, 5.0, 5.0, 5.0, 4.0, 3.0), 6, applied=[False] * 4 + [True] * 2, window=3)
    assert not ok and note.startswith("2 of 6 updates applied"), note


def test_updates_the_grad_scaler_skipped_are_detected(data, monkeypatch, one_thread):
    """train_check reads a skipped update from a drop of the GradScaler's scale (here a stand-in
    that halves its scale at the first two steps, whose updates are undone)."""
    g, d = data
    real = g.build_trainer

    class Scaler:
        scale = 2.0 ** 16

        def get_scale(self):
            return self.scale

    def skipping_trainer(cfg, model, batch):
        trainer = real(cfg, model, batch)
        trainer.grad_scaler = scaler = Scaler()
        step, calls = trainer.run_step, []

        def run_step():
            before = {k: v.clone() for k, v in model.state_dict().items()}
            step()
            calls.append(1)
            if len(calls) <= 2:  # an overflow: the update is not applied, the scale halves
                model.load_state_dict(before)
                scaler.scale /= 2
        trainer.run_step = run_step
        return trainer

    monkeypatch.setattr(g, "build_trainer", skipping_trainer)
    row = g.train_check(g.config_file(TOY), "cpu", 64, 2, 4, d, opts=["SOLVER.AMP.ENABLED", "False"],
                        lr_scale=0.1)
    # bug caught: the scale compared the wrong way, or the skipped updates judged
    assert (row["iters"], row["applied"]) == (4, 2), row
    assert "2 update(s) skipped by the GradScaler" in row["note"], row


@pytest.fixture
def data(tmp_path):
    g = _load()
    d = g.SyntheticData(str(tmp_path))
    yield g, d
    d.close()


def test_non_finite_loss_is_a_fail(data, monkeypatch, one_thread):
    g, d = data
    real = g.build_training_model
    calls = []

    def broken(cfg):
        model = real(cfg)

        def add_nan(module, args, output):  # a NaN loss term from the second training pass on
            calls.append(1)
            if module.training and len(calls) >= 2:
                return {**output, "loss_broken": next(iter(output.values())) * math.nan}
        model.register_forward_hook(add_nan)
        return model

    monkeypatch.setattr(g, "build_training_model", broken)
    row = g.train_check(g.config_file(TOY), "cpu", 64, 2, 3, d, lr_scale=0.1, amp=False)
    # bug caught: detectron2's FloatingPointError escaping the check, or the NaN term not seen
    assert not row["ok"] and row["note"] == "non-finite loss_broken at iteration 2", row
    table = "\n".join(g.check_table([row], 64, 2, "cpu", 0.1))
    # bug caught: the table row of a failed config printed as OK
    assert re.search(r"^\| dil_fcn_r18_sgr \| 2 \| .* \| FAIL \|", table, flags=re.M), table


def test_diverging_training_is_a_fail(data, one_thread):
    g, d = data
    # a learning rate of about 2.5e6 (the config's 0.01 x 2.5e8; the head's x10 on top)
    row = g.train_check(g.config_file(TOY), "cpu", 64, 2, 3, d, lr_scale=2.5e8, amp=False)
    # bug caught: a training that blows up (huge or non-finite loss) reported as OK
    assert not row["ok"], row


def test_no_cuda_without_tiny_says_so(monkeypatch, capsys):
    g = _load()
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # bug caught: the GPU mode silently running (or claiming success) on a machine without CUDA
    assert g.main([]) == 2
    assert "--tiny" in capsys.readouterr().err


def test_device_tests_counts_passes_and_failures(tmp_path, monkeypatch):
    g = _load()
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # the fake suite needs no plugin (and xdist's import)
    (tmp_path / "conftest.py").write_text(textwrap.dedent('''
        import pytest

        def pytest_addoption(parser):
            parser.addoption("--device", default="cpu")

        def pytest_configure(config):
            config.addinivalue_line("markers", "uses_device: takes the device fixture")
            config.addinivalue_line("markers", "slow: slow")

        def pytest_collection_modifyitems(config, items):
            for item in items:
                if "device" in item.fixturenames:
                    item.add_marker(pytest.mark.uses_device)

        @pytest.fixture
        def device(request):
            return request.config.getoption("--device")
    '''))
    (tmp_path / "test_fake.py").write_text(textwrap.dedent('''
        def test_a_passes(device):
            assert device == "cpu"

        def test_b_fails(device):
            assert device == "cuda"

        def test_c_takes_no_device():
            pass
    '''))
    res = g.device_tests("cpu", None, 120, cwd=tmp_path)
    # bug caught: counts not read from pytest's report, or a failing device test reported OK
    assert (res["collected"], res["passed"], res["failed"], res["ok"]) == (2, 1, 1, False), res
    res = g.device_tests("cpu", ["test_fake.py::test_a_passes"], 120, cwd=tmp_path)
    # bug caught: the tiny selection runs every device test instead of the paths given
    assert (res["collected"], res["passed"], res["failed"], res["ok"]) == (1, 1, 0, True), res
    (tmp_path / "test_fake.py").write_text("def test_c_takes_no_device():\n    pass\n")
    res = g.device_tests("cpu", None, 120, cwd=tmp_path)
    # bug caught: nothing collected counted as a pass
    assert (res["collected"], res["ok"]) == (0, False) and "nothing ran on the device" in res["note"], res
