"""sgr_d2.compat: each shim acts only when needed and does what its docstring says."""
import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

from sgr_d2 import compat


def test_apply_is_idempotent_and_reports_what_acted():
    first = compat.apply()
    assert compat.apply() == first
    assert set(first) <= {"detectron2._C stub", "PIL.Image.LINEAR", "numpy type aliases", "numpy.in1d",
                          "cityscapesscripts JSON of NumPy scalars"}


def test_pil_linear_is_bilinear():
    assert Image.LINEAR == Image.BILINEAR
    from detectron2.data.transforms import ExtentTransform  # imported at all thanks to the shim

    assert ExtentTransform.__init__.__defaults__[0] == Image.BILINEAR


def test_missing_cpp_ops_raise_a_clear_error():
    if compat.cpp_ops_available():
        pytest.skip("this detectron2 has its C++ extension")
    import torch
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    with pytest.raises(compat.MissingCppOpError, match="box_iou_rotated.*without its C\\+\\+ extension"):
        pairwise_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5))
    c = sys.modules["detectron2._C"]
    assert "sgr_d2.compat stub" in c.get_compiler_version()
    assert c.has_cuda() is False
    with pytest.raises(AttributeError):
        c.__wrapped__  # dunder look-ups stay AttributeErrors (pickle, inspect)


def test_detectron2_environment_report_works_with_the_stub():
    from detectron2.utils.collect_env import collect_env_info

    info = collect_env_info()
    assert "detectron2" in info


def test_numpy_aliases_only_when_detectron2_uses_them(tmp_path, monkeypatch):
    # a detectron2 tree without the old aliases does not trigger the shim
    fake = tmp_path / "detectron2"
    (fake / "evaluation").mkdir(parents=True)
    (fake / "structures").mkdir()
    (fake / "evaluation" / "sem_seg_evaluation.py").write_text("pred = np.array(x, dtype=int)\n")
    (fake / "structures" / "masks.py").write_text("x.astype(bool)\n")
    spec = types.SimpleNamespace(submodule_search_locations=[str(fake)])
    monkeypatch.setattr(compat.importlib.util, "find_spec", lambda name: spec)
    assert compat._detectron2_uses_numpy_aliases(["int", "float"]) is False
    (fake / "evaluation" / "sem_seg_evaluation.py").write_text("pred = np.array(x, dtype=np.int)\n")
    assert compat._detectron2_uses_numpy_aliases(["int"]) is True


def test_in1d_is_numpys_former_definition():
    """cityscapesscripts' evaluations call np.in1d (gone in NumPy 2.4): the shim is isin, flattened."""
    a = np.array([[3, 1], [2, 7]])
    np.testing.assert_array_equal(compat._in1d(a, [1, 7]), [False, True, False, True])
    np.testing.assert_array_equal(compat._in1d(a, [1, 7], invert=True), [True, False, True, False])
    assert np.in1d is compat._in1d or "numpy.in1d" not in compat.applied()


def test_cityscapes_json_writes_numpy_scalars_as_numbers(tmp_path):
    from cityscapesscripts.helpers import csHelpers

    path = tmp_path / "matches.json"
    csHelpers.writeDict2JSON({"pixelCount": np.count_nonzero(np.ones(3, dtype=bool)), "x": np.float32(0.5)}, str(path))
    assert json.loads(path.read_text()) == {"pixelCount": 3, "x": 0.5}


def test_semseg_evaluator_runs_on_this_numpy():
    """detectron2's SemSegEvaluator (np.int/np.float in v0.6) computes a hand-checked mIoU."""
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import SemSegEvaluator

    d = DatasetCatalog.get("sgr_toy_sem_seg_val")[0]
    gt = np.asarray(Image.open(d["sem_seg_file_name"])).astype(np.int64)
    ev = SemSegEvaluator("sgr_toy_sem_seg_val", distributed=False)
    ev.reset()
    pred = np.where(gt == 255, 0, gt)
    pred[:, :10] = 1  # spoil a band
    probs = torch.nn.functional.one_hot(torch.as_tensor(pred), 6).permute(2, 0, 1).float()
    ev.process([{"file_name": d["file_name"]}], [{"sem_seg": probs}])
    res = ev.evaluate()["sem_seg"]
    valid = gt != 255
    ious = []
    for c in range(6):
        g, p = (gt == c) & valid, (pred == c) & valid
        if g.sum() > 0:
            ious.append((g & p).sum() / (g | p).sum())
    assert res["mIoU"] == pytest.approx(100 * np.mean(ious), rel=1e-6)
    assert res["pACC"] == pytest.approx(100 * (pred[valid] == gt[valid]).mean(), rel=1e-6)


# ------------------------------------------------------------------ launch: CUDA needed or not
def _fake_launch_module(worker_src):
    mod = types.ModuleType("fake_detectron2_launch")
    exec(worker_src, mod.__dict__)  # noqa: S102  (test fixture code below)
    return mod


V06_WORKER = '''
import torch
import torch.distributed as dist

def _distributed_worker(local_rank, main_func, world_size, num_gpus_per_machine, machine_rank,
                        dist_url, args, timeout=None):
    assert torch.cuda.is_available(), "cuda is not available. Please check your installation."
    dist.init_process_group(backend="NCCL", init_method=dist_url, world_size=world_size,
                            rank=local_rank, timeout=timeout)
    main_func(*args)
'''
# upstream main: its source still holds the text backend="NCCL", which fooled a text search
MAIN_WORKER = V06_WORKER.replace(
    '    assert torch.cuda.is_available(), "cuda is not available. Please check your installation."\n'
    '    dist.init_process_group(backend="NCCL",',
    '    has_gpu = torch.cuda.is_available()\n'
    '    dist.init_process_group(backend="NCCL" if has_gpu else "GLOO",')


@pytest.mark.parametrize("worker_src, needs_cuda", [(V06_WORKER, True), (MAIN_WORKER, False)], ids=["v0.6", "main"])
def test_launch_needs_cuda_is_decided_by_behaviour(monkeypatch, worker_src, needs_cuda):
    import importlib

    import torch

    assert 'backend="NCCL"' in worker_src and "def _distributed_worker" in worker_src
    fake = _fake_launch_module(worker_src)
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: fake if name == "detectron2.engine.launch" else real_import(name, *a))
    compat.launch_needs_cuda.cache_clear()
    try:
        before = torch.cuda.is_available, torch.distributed.init_process_group
        assert compat.launch_needs_cuda() is needs_cuda
        # the probe puts back what it replaced and created no process group
        assert (torch.cuda.is_available, torch.distributed.init_process_group) == before
        assert not torch.distributed.is_initialized()
    finally:
        compat.launch_needs_cuda.cache_clear()


def test_launch_needs_cuda_matches_what_detectron2s_own_worker_does(tmp_path):
    """The installed detectron2's worker entry point, run for real in this process as a world of
    one CPU worker: v0.6 asserts CUDA, upstream main joins a gloo group and runs the function;
    compat must replace the launcher exactly in the first case."""
    import importlib

    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    worker = importlib.import_module("detectron2.engine.launch")._distributed_worker
    seen = []
    assert not dist.is_initialized()
    try:
        worker(0, lambda: seen.append(dist.get_backend()), 1, 1, 0, f"file://{tmp_path / 'init'}", ())
        ran = True
    except AssertionError as e:
        assert "cuda is not available" in str(e)
        ran = False
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        comm._LOCAL_PROCESS_GROUP = None
    assert seen == (["gloo"] if ran else [])
    assert compat.launch_needs_cuda() is (not ran)
