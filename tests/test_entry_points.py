"""What a user meets at the real entry points (``train_net.py``, ``tools/export_onnx.py``,
``demo/demo.py``), each run as a user runs it, in a process of its own, and at
``tools/convert_checkpoint.py``'s ``main``: a bad weights file is one error naming it everywhere, a refused run leaves the earlier
run's files byte-identical, the precision of a mixed-precision run is logged once, and a weights
file cannot run code."""
from __future__ import annotations

import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLI, REPO, TOY_SGR, WritesAFile, child_env, folder_bytes, run_all, start_script
from PIL import Image

pytestmark = pytest.mark.slow
sys.path.insert(0, os.path.join(REPO, "tools"))  # convert_checkpoint


def _train(out, *opts, flags=()):
    return ["train_net.py", "--config-file", TOY_SGR, *flags, *CLI, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out), *opts]


def _truncated(tmp_path):
    torch.save({"model": {"w": torch.zeros(1000)}}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    return tmp_path / "truncated.pth"


def _crafted(tmp_path, marker):
    with open(tmp_path / "crafted.pkl", "wb") as f:
        pickle.dump({"model": {"w": np.zeros(3, np.float32)}, "__author__": "x", "payload": WritesAFile(marker)}, f)
    torch.save({"model": {"w": torch.zeros(3)}, "payload": WritesAFile(marker)}, tmp_path / "crafted.pth")
    return tmp_path / "crafted.pkl", tmp_path / "crafted.pth"


def test_a_forked_child_runs_a_script_as_a_fresh_interpreter_would(tmp_path):
    """conftest.start_script's forked children (what run_all starts): the script as ``__main__``
    with its arguments, its folder first on sys.path, the given environment and working folder,
    no multiprocessing parent, its exit handlers run, its exit status kept (bugs caught: a
    dropped env or cwd, an inherited parent that sgr_d2's launcher watch would follow, skipped
    atexit handlers, where the output lock is given back, a lost exit code)."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import atexit, multiprocessing, os, sys\n"
        "atexit.register(print, 'exit handlers ran')\n"
        "print(__name__, sys.argv[1:], sys.path[0], os.getcwd(), os.environ['PROBE'], "
        "multiprocessing.parent_process())\n"
        "sys.exit(int(sys.argv[1]))\n")
    (tmp_path / "cwd").mkdir()
    log = tmp_path / "probe.log"
    proc = start_script([str(script), "75", "x"], child_env(PROBE="given"), log, cwd=tmp_path / "cwd")
    assert hasattr(proc, "process")  # forked, not a fresh interpreter (the session's environment)
    assert proc.wait(timeout=60) == 75
    assert log.read_text().splitlines() == [
        f"__main__ ['75', 'x'] {tmp_path} {tmp_path / 'cwd'} given None", "exit handlers ran"]


def test_a_refused_run_leaves_the_earlier_run_byte_identical(tmp_path):
    """An earlier mixed-precision run leaves its files; then runs refused for a truncated weights
    file (training and --eval-only), for a crafted one (--eval-only) and for bad labels (the first batch) must
    leave every file of OUTPUT_DIR byte-identical and add none (detectron2's default_setup would
    rewrite config.yaml and append to log.txt; its writers would add events files). The truncated
    file is one error naming it at every entry point: training, --eval-only, the ONNX export and
    the demo (torch's own error, PytorchStreamReader's, follows it in parentheses only)."""
    out = tmp_path / "run"
    (code, output), = run_all([_train(out, "SOLVER.AMP.ENABLED", "True")])
    assert code == 0, output[-3000:]
    log = (out / "log.txt").read_text()
    # the precision in use and the trainer built, once
    assert log.count("Training on cpu in mixed precision, SOLVER.AMP.ENABLED: bfloat16 autocast without "
                     "gradient scaling (sgr_d2's CPUAutocastTrainer)") == 1
    before = folder_bytes(out)
    assert {"config.yaml", "log.txt", "metrics.json", "last_checkpoint", "model_final.pth"} <= set(before)
    assert any(name.startswith("events.out.tfevents") for name in before)

    bad = _truncated(tmp_path)
    marker = tmp_path / "written_by_the_pickle"
    crafted, _ = _crafted(tmp_path, marker)
    data = tmp_path / "datasets"  # the toy data with every training label out of the class range
    shutil.copytree(Path(os.environ["DETECTRON2_DATASETS"]) / "sgr_toy", data / "sgr_toy")
    for label in (data / "sgr_toy" / "annotations" / "train").glob("*.png"):
        Image.fromarray(np.full((128, 128), 9, np.uint8)).save(label)
    image = tmp_path / "image.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    refused = run_all([
        _train(out, "MODEL.WEIGHTS", str(bad)),
        _train(out, "MODEL.WEIGHTS", str(bad), flags=["--eval-only"]),
        ["tools/export_onnx.py", "--config-file", TOY_SGR, "--weights", str(bad), "--output", str(tmp_path / "m.onnx")],
        ["demo/demo.py", "--config-file", TOY_SGR, "--input", str(image), "--output", str(tmp_path / "demo"),
         "--opts", "MODEL.WEIGHTS", str(bad), "MODEL.DEVICE", "cpu"],
        _train(out, "MODEL.WEIGHTS", str(crafted), flags=["--eval-only"]),
        _train(out),
    ], envs=[child_env()] * 5 + [child_env(DETECTRON2_DATASETS=str(data))])
    truncated = f"weights file {bad} cannot be read: it is truncated or not a checkpoint (RuntimeError: PytorchStreamReader"
    reasons = (truncated, truncated, truncated, truncated,
               f"weights file {crafted}: reading it would need `io.open`", "holds values [9] outside the class range")
    entries = ("train", "eval-only", "export", "demo", "crafted (eval-only)", "bad labels")
    for (code, output), reason, entry in zip(refused, reasons, entries):
        assert code != 0 and reason in output, (entry, reason, output[-2000:])
    # the refusal of a crafted file says how to trust it
    assert f"SGR_D2_TRUSTED_WEIGHTS={crafted} python tools/convert_checkpoint.py --input {crafted}" in refused[4][1]
    assert folder_bytes(out) == before
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()


def test_a_weights_file_cannot_run_code_unless_the_user_trusts_it(tmp_path, capsys, monkeypatch):
    """A crafted .pkl or .pth is refused by convert_checkpoint.py (as by ``--eval-only``: the test
    above), whose error says how to trust a file; listed in SGR_D2_TRUSTED_WEIGHTS it is read with
    the full unpickler (and runs: the marker appears), and its plain conversion then loads
    untrusted."""
    import convert_checkpoint

    marker = tmp_path / "written_by_the_pickle"
    pkl, pth = _crafted(tmp_path, marker)
    for path, name in ((pkl, "a.pth"), (pth, "b.pth")):
        code = convert_checkpoint.main(["--input", str(path), "--output", str(tmp_path / name)])
        output = "".join(capsys.readouterr())
        assert code != 0 and f"weights file {path}: reading it would need `io.open`" in output, output[-2000:]
        assert f"SGR_D2_TRUSTED_WEIGHTS={path} python tools/convert_checkpoint.py --input {path}" in output
    assert not marker.exists() and not (tmp_path / "a.pth").exists() and not (tmp_path / "b.pth").exists()
    monkeypatch.setenv("SGR_D2_TRUSTED_WEIGHTS", str(pkl))
    assert convert_checkpoint.main(["--input", str(pkl), "--output", str(tmp_path / "a.pth")]) == 0
    assert marker.exists(), capsys.readouterr()
    monkeypatch.delenv("SGR_D2_TRUSTED_WEIGHTS")
    from sgr_d2.files import read_weights

    assert torch.equal(read_weights(str(tmp_path / "a.pth"))["model"]["w"], torch.zeros(3))
