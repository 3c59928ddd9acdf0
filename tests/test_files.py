"""sgr_d2/files.py: weights files are read without running their code, whatever their pickle
protocol; what cannot be read is named."""
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import WritesAFile

from sgr_d2.files import TRUST_VARIABLE, UnsafeWeightsError, WeightsReadError, read_weights


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_model_zoo_pickles_of_every_protocol_load(protocol, tmp_path):
    """Published files are pickles of numpy arrays (Python 2 era: protocol 2, strings decoded as
    latin-1; today's: 4 and 5). Catches a numpy global the restricted unpickler does not admit."""
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.float64)[::2],
              "c": np.float32(1.5), "d": np.zeros((0, 3), np.int64)}
    path = tmp_path / "m.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "x", "meta": [1, 2.0, None, True, (3, "s")]}, f, protocol=protocol)
    data = read_weights(str(path))
    assert data["meta"] == [1, 2.0, None, True, (3, "s")] and data["__author__"] == "x"
    for k, v in arrays.items():
        assert np.array_equal(data["model"][k], v) and data["model"][k].dtype == v.dtype, k


def test_a_file_that_would_run_code_is_refused_unless_trusted(tmp_path, monkeypatch):
    marker = tmp_path / "written"
    for name, save, w in (("x.pkl", lambda obj, p: pickle.dump(obj, open(p, "wb")), np.zeros(2)),
                          ("x.pth", torch.save, torch.zeros(2))):
        path = tmp_path / name
        save({"model": {"w": w}, "payload": WritesAFile(marker)}, path)
        with pytest.raises(UnsafeWeightsError, match=rf"weights file {path}: reading it would need `io.open`"):
            read_weights(str(path))
        assert not marker.exists()
        monkeypatch.setenv(TRUST_VARIABLE, os.pathsep.join(["/elsewhere/y.pkl", str(path)]))
        read_weights(str(path))  # listed: the full unpickler, which runs the payload
        assert marker.exists()
        marker.unlink()
        monkeypatch.delenv(TRUST_VARIABLE)


@pytest.mark.parametrize("content", ["truncated", "random", "not a dict"])
def test_a_file_that_is_not_a_checkpoint_is_named(content, tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"model": {"w": torch.zeros(100)}}, path)
    if content == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif content == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    else:
        torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsReadError, match=rf"weights file {path} "):
        read_weights(str(path))
    with pytest.raises(FileNotFoundError, match="weights file .*nope.pth does not exist"):
        read_weights(str(tmp_path / "nope.pth"))
