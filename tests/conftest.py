"""Shared test set-up: sgr_d2 first (compat shims), a private DETECTRON2_DATASETS, small configs."""
import contextlib
import functools
import logging
import os
import shutil
import sys
import tempfile

import pytest

# The toy dataset is generated here once per test session (a few seconds), not in ./datasets.
# (only where none is set: worker processes that import this module inherit the session's folder)
_DATASETS = None
if "DETECTRON2_DATASETS" not in os.environ:
    _DATASETS = os.environ["DETECTRON2_DATASETS"] = tempfile.mkdtemp(prefix="sgr_d2_tests_datasets_")

# Threads waiting for work sleep instead of spinning (OpenMP reads this when torch loads it): on
# shared cores a spinning thread takes CPU from the other test processes. Children inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sgr_d2  # noqa: E402,F401  (before any detectron2 import)
import torch  # noqa: E402

# Intra-op threads: the cores shared among the test processes (pytest-xdist's workers: make test
# runs one per core, and more threads than cores only spin and wait).
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_SGR = os.path.join(REPO, "configs", "toy", "dil_fcn_r18_sgr.yaml")
TOY_BASE = os.path.join(REPO, "configs", "toy", "dil_fcn_r18.yaml")


def folder_opts(config_file):
    """What a configs/folder/*.yaml needs to load: a DATASETS.FOLDER.ROOT (tests/data/folder has
    only the classes.txt that loading reads, 3 classes; tests/data/folder_coco only the
    categories of its annotations/{instances,panoptic}_{train,val}.json, 2 and 4 classes)."""
    if os.path.basename(os.path.dirname(os.path.abspath(config_file))) != "folder":
        return []
    coco = any(task in os.path.basename(config_file) for task in ("_instance", "_panoptic"))
    return ["DATASETS.FOLDER.ROOT", os.path.join(REPO, "tests", "data", "folder_coco" if coco else "folder")]


def tiny_toy_cfg(config_file=TOY_SGR, *opts):
    """The toy config shrunk further for unit tests (CPU, 2 images, no workers)."""
    from sgr_d2.config import load_config

    cfg = load_config(config_file, ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0",
                                    "SOLVER.IMS_PER_BATCH", "2", *opts])
    return cfg


def toy_batch(cfg, start=0, n=4, seed=0):
    """4 images of ``cfg``'s training split, their augmentation seeded (``sgr_d2.predict.training_batch``)."""
    from sgr_d2.predict import training_batch

    return training_batch(cfg, start, n, seed)


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("SGR_D2_TEST_DEVICE", "cpu"),
                     help="device of the tests that take the `device` fixture (bench/gpu_check.py runs them "
                          "with --device cuda -m uses_device)")


# The test files that take longest, longest first (as `pytest --durations=0` measured them):
# `make test` (pytest-xdist, --dist loadfile --no-loadscope-reorder) hands the files to its
# workers in collection order, so the long ones start at once and the short ones fill the gaps,
# and the workers finish together. The other files follow in their usual order.
LONGEST_FIRST = ("test_cluster.py", "test_toy_training.py", "test_published_models.py", "test_reliability.py",
                 "test_reliability_faults.py", "test_gpu_check.py", "test_configs.py", "test_compare_sgr.py",
                 "test_transfer.py", "test_amp.py", "test_nccl_rules.py", "test_entry_points.py", "test_deploy.py",
                 "test_folder_dataset.py")


def pytest_collection_modifyitems(config, items):
    for item in items:  # the tests that take a device can be selected with -m uses_device
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.uses_device)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.fixture
def device(request):
    """The device a test runs its tensors and model on: ``--device`` (default cpu)."""
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda without CUDA")
    return torch.device(name)


@pytest.fixture
def toy_cfg():
    return tiny_toy_cfg()


@pytest.fixture
def one_thread():
    """One intra-op thread: on two shared cores, two threads per process are many times slower.
    Test files that train use it for every test (``pytestmark = pytest.mark.usefixtures``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def register():
    """``register(dicts, **metadata)``: a dataset of ``dicts`` under a new name (ignore label 255),
    removed from detectron2's catalogs after the test; returns the name."""
    import uuid

    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = []

    def _register(dicts, **meta):
        name = f"sgr_test_{uuid.uuid4().hex[:8]}_train"
        DatasetCatalog.register(name, lambda: list(dicts))
        MetadataCatalog.get(name).set(ignore_label=255, **meta)
        names.append(name)
        return name

    yield _register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@contextlib.contextmanager
def log_records(name):
    """The messages logged to logger ``name`` (detectron2's setup_logger may stop propagation to
    the root logger, where pytest's caplog listens)."""
    got = []

    class _Handler(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    handler = _Handler(level=logging.DEBUG)
    log = logging.getLogger(name)
    old = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield got
    finally:
        log.removeHandler(handler)
        log.setLevel(old)


class WritesAFile:
    """Unpickled, it creates ``path``: what a crafted weights file could do, harmlessly (its
    pickle names ``io.open``, not this class)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def load_reporting_incompatible(model, path):
    """Load the weights file ``path`` into ``model`` through detectron2's public
    ``DetectionCheckpointer.load`` (as MODEL.WEIGHTS does) and return the incompatible keys that
    its ``_load_model`` step found (detectron2 only logs them)."""
    from detectron2.checkpoint import DetectionCheckpointer

    class Recording(DetectionCheckpointer):
        def _load_model(self, checkpoint):
            self.incompatible = super()._load_model(checkpoint)
            return self.incompatible

    checkpointer = Recording(model)
    checkpointer.load(str(path), checkpointables=[])
    return checkpointer.incompatible


# ----------------------------------------------------------------------------- configs
@contextlib.contextmanager
def libyaml():
    """Config files read in the block are parsed by libyaml (``yaml.CSafeLoader``) where PyYAML
    has it, not by PyYAML's pure-Python parser (fvcore's ``load_yaml_with_base`` calls
    ``yaml.safe_load``): about 2.5 times faster for the tests that load every config (426 YAML
    reads), and the same documents (test_configs.py::test_libyaml_reads_every_config_as_pyyaml_does)."""
    import yaml
    from unittest import mock

    if not getattr(yaml, "__with_libyaml__", False):
        yield
        return
    with mock.patch.object(yaml, "safe_load", lambda stream: yaml.load(stream, Loader=yaml.CSafeLoader)):
        yield


# ----------------------------------------------------------------------------- model initialisation
POOL = 1 << 23  # random numbers drawn once per kind (32 MiB), more than an official file's largest tensor (4.7M)


@functools.lru_cache(maxsize=None)
def random_pool(kind):
    """POOL random numbers drawn once: standard normal ("normal", for the official files of
    tests/test_published_models.py; "init normal") or uniform in [-1, 1) ("init uniform";
    :func:`cheap_init`)."""
    g = torch.Generator().manual_seed(("normal", "init normal", "init uniform").index(kind))
    return torch.randn(POOL, generator=g) if kind != "init uniform" else torch.rand(POOL, generator=g) * 2 - 1


@contextlib.contextmanager
def cheap_init(start=0, values=True):
    """Models built in the block draw their random initial values (``Tensor.uniform_`` and
    ``normal_``: torch.nn.init's, detectron2's and timm's initialisers all go through them) from
    consecutive windows of the "init" pools, the first at ``start``, instead of fresh draws, which
    were most of the cost of building a full-size model: the same distributions, each tensor its
    own values; zeros, ones and constants untouched; a tensor larger than a pool drawn afresh. Two
    blocks with one ``start`` draw the same values (as two builds after one ``torch.manual_seed``):
    a reference model that others are compared with is built without it. ``values=False``: the
    fills are skipped (the tensors keep the memory they were given), for checks of tensor names and
    shapes only."""
    cursor = start
    fresh_uniform, fresh_normal = torch.Tensor.uniform_, torch.Tensor.normal_

    def window(kind, tensor):
        nonlocal cursor
        n = tensor.numel()
        first = cursor % (POOL - n + 1)
        cursor += n + 1
        return random_pool(kind)[first:first + n].view(tensor.shape)

    def uniform_(tensor, a=0.0, b=1.0, *, generator=None):
        if not values:
            return tensor
        if tensor.numel() > POOL:
            return fresh_uniform(tensor, a, b, generator=generator)
        torch.mul(window("init uniform", tensor), (b - a) / 2, out=tensor)
        return tensor.add_((a + b) / 2) if a + b else tensor

    def normal_(tensor, mean=0.0, std=1.0, *, generator=None):
        if not values:
            return tensor
        if tensor.numel() > POOL:
            return fresh_normal(tensor, mean, std, generator=generator)
        torch.mul(window("init normal", tensor), std, out=tensor)
        return tensor.add_(mean) if mean else tensor

    from unittest import mock

    with mock.patch.object(torch.Tensor, "uniform_", uniform_), mock.patch.object(torch.Tensor, "normal_", normal_):
        yield


# ----------------------------------------------------------------------------- reliability tests
# (tests/test_reliability.py, test_reliability_faults.py, test_entry_points.py, test_evaluation.py)
# A smaller model than the toy config (64 px crops, output stride 16, 8 tokens): every reliability
# test trains a few iterations at most on shared CPUs.
TINY = ("INPUT.CROP.SIZE", "(64, 64)", "INPUT.MIN_SIZE_TRAIN", "(64,)", "DATASETS.TEST", "()",
        "MODEL.RESNETS.OUTPUT_STRIDE", "16", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16",
        "MODEL.SGR.NUM_TOKENS", "8", "MODEL.SGR.NUM_MATCHED", "4", "MODEL.SGR.TOKEN_DIM", "32",
        "MODEL.SGR.FFN_DIM", "64", "SOLVER.CHECKPOINT_PERIOD", "1000")
CLI = ("MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2") + TINY


def tiny_run_cfg(out, *opts, config=TOY_SGR):
    """:func:`tiny_toy_cfg` with :data:`TINY`, writing into ``out``."""
    return tiny_toy_cfg(config, *TINY, "OUTPUT_DIR", str(out), *opts)


def seeded_trainer(cfg):
    """What train_net.py does before training (default_setup seeds every RNG from cfg.SEED)."""
    from detectron2.utils.env import seed_all_rng

    from sgr_d2.engine import Trainer

    seed_all_rng(cfg.SEED)
    return Trainer(cfg)


def earlier_outputs(out):
    """Files an earlier run left in OUTPUT_DIR; returns their bytes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_final.pth").write_bytes(b"weights of an earlier run")
    (out / "last_checkpoint").write_text("model_final.pth")
    (out / "metrics.json").write_text('{"iteration": 99, "total_loss": 1.5}\n')
    (out / "config.yaml").write_text("# config of an earlier run\n")
    return {p.name: p.read_bytes() for p in out.iterdir()}


def assert_unchanged(out, before):
    assert {name: (out / name).read_bytes() for name in before} == before
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def child_env(**extra):
    """The environment of a child process: one intra-op thread, unbuffered output."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def image_label_pair(folder, stem, img_hw=(40, 40), lbl_hw=(40, 40), values=(0, 1, 2)):
    """A random JPEG and a label PNG whose first pixels hold ``values`` (the rest 0), written to
    ``folder``; their dataset dict."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (*img_hw, 3), dtype=np.uint8)).save(folder / f"{stem}.jpg")
    lbl = np.zeros(lbl_hw, np.uint8)
    lbl.flat[: len(values)] = values
    Image.fromarray(lbl).save(folder / f"{stem}.png")
    return {"file_name": str(folder / f"{stem}.jpg"), "sem_seg_file_name": str(folder / f"{stem}.png"),
            "height": img_hw[0], "width": img_hw[1]}


# ----------------------------------------------------------------------------- child processes
# What train_net.py, tools/*.py and demo/demo.py import before they read their arguments.
CHILD_PRELOAD = ["sgr_d2", "sgr_d2.engine.trainer", "sgr_d2.engine.workers"]
_SESSION_ENV = dict(os.environ)  # (DETECTRON2_DATASETS and OMP_WAIT_POLICY set above)
# read when those modules are imported (detectron2's builtin datasets, OpenMP): a command whose
# environment differs in one of them starts a fresh interpreter
_IMPORT_TIME_ENV = ("DETECTRON2_DATASETS", "OMP_WAIT_POLICY")


def preloaded_context():
    """multiprocessing's forkserver context, whose server imported :data:`CHILD_PRELOAD` once
    (with the session's environment). A child forked from it starts in a fraction of a second;
    a fresh interpreter spends 8-10 CPU-s importing torch, torchvision (which imports
    torch._dynamo) and detectron2. The launchers' tests (torchrun, the --num-gpus launcher and
    submitit in test_cluster.py, the workers of test_reliability*.py) still start fresh
    interpreters: train_net.py's own start-up stays tested.
    (tests/test_entry_points.py checks that a forked child runs a script as ``python`` would.)"""
    import multiprocessing
    from multiprocessing import forkserver
    from unittest import mock

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(CHILD_PRELOAD + ["conftest"])  # conftest: the children's entry
    with mock.patch.dict(os.environ, _SESSION_ENV, clear=True):  # not a test's monkeypatched one
        forkserver.ensure_running()
    return ctx


def _run_as_main(argv, env, cwd, log, err_log=None):
    """In a forked child: ``python argv...`` (a script, or ``-m module``) from ``cwd`` with ``env``
    (its PYTHONPATH on sys.path), stdout appended to ``log`` and stderr to ``err_log`` (default:
    ``log`` too), the interpreter's exit handlers run at the end (multiprocessing's children skip
    them)."""
    import atexit
    import runpy
    from multiprocessing import process

    # no multiprocessing parent, as in a fresh interpreter (sgr_d2's workers would otherwise watch
    # for their "launcher", the test, and exit once it is gone)
    process._parent_process = None
    sys.stdout.flush()
    sys.stderr.flush()
    for target, path in ((1, log), (2, err_log or log)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if env.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    paths = [*filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    try:
        if argv[0] == "-m":  # python -m: the working folder first on sys.path
            sys.argv, sys.path[:0] = list(argv[1:]), [os.getcwd(), *paths]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(argv[0])
            sys.argv, sys.path[:0] = [script, *argv[1:]], [os.path.dirname(script), *paths]
            runpy.run_path(script, run_name="__main__")
    finally:
        atexit._run_exitfuncs()


class _Forked:
    """A :func:`preloaded_context` child behind ``subprocess.Popen``'s interface."""

    def __init__(self, process):
        self.process, self.pid = process, process.pid

    @property
    def returncode(self):
        return self.process.exitcode

    def poll(self):
        return self.process.exitcode

    def wait(self, timeout=None):
        self.process.join(timeout)
        if self.process.exitcode is None:
            import subprocess

            raise subprocess.TimeoutExpired(f"forked child {self.pid}", timeout)
        return self.process.exitcode

    def send_signal(self, sig):
        os.kill(self.pid, sig)

    def kill(self):
        self.process.kill()


def start_script(argv, env, log, cwd=REPO, err_log=None):
    """``python argv...`` from ``cwd`` with ``env``, its output appended to the file ``log`` (stderr
    to ``err_log`` if given): a forked child of :func:`preloaded_context` where ``env`` agrees
    with the session's on :data:`_IMPORT_TIME_ENV`, else (or without a forkserver: Windows) a
    fresh interpreter. Either way a ``subprocess.Popen`` to the caller (pid, poll, wait,
    send_signal, kill, returncode)."""
    import multiprocessing
    import subprocess

    if "forkserver" in multiprocessing.get_all_start_methods() and all(
            env.get(k) == _SESSION_ENV.get(k) for k in _IMPORT_TIME_ENV):
        proc = preloaded_context().Process(target=_run_as_main, args=(
            list(argv), dict(env), str(cwd), str(log), err_log and str(err_log)))
        proc.start()
        return _Forked(proc)
    with open(log, "a") as out, open(err_log or log, "a") as err:
        return subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=out,
                                stderr=err if err_log else subprocess.STDOUT)


def forked_run(cmd, stdout=None, stderr=None, cwd=None, env=None, capture_output=False, text=False, timeout=900):
    """``subprocess.run`` for ``[sys.executable, script or -m module, ...]`` through
    :func:`start_script`: output to the open file ``stdout`` (stderr with it), or captured
    (``capture_output``, as text): what a test gives a tool that runs such commands."""
    import subprocess

    assert cmd[0] == sys.executable and (capture_output or stdout is not None and stderr in (None, -2)), cmd
    env = dict(os.environ if env is None else env)
    if not capture_output:
        stdout.flush()
        proc = start_script(cmd[1:], env, stdout.name, cwd or os.getcwd())
        return subprocess.CompletedProcess(cmd, proc.wait(timeout=timeout))
    with tempfile.TemporaryDirectory(prefix="sgr_d2_child_") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = start_script(cmd[1:], env, out, cwd or os.getcwd(), err_log=err)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired(cmd, timeout) from None
        texts = [open(f, "rb").read() if os.path.exists(f) else b"" for f in (out, err)]
        if text:
            texts = [t.decode() for t in texts]
        return subprocess.CompletedProcess(cmd, code, texts[0], texts[1])


def forked_subprocess():
    """The ``subprocess`` module with :func:`forked_run` as its ``run``: what a test puts in place
    of a tool's ``subprocess`` (``monkeypatch.setattr(tool, "subprocess", forked_subprocess())``)."""
    import subprocess
    import types

    return types.SimpleNamespace(**{**{k: getattr(subprocess, k) for k in subprocess.__all__}, "run": forked_run})


def run_all(commands, env=None, envs=None):
    """Run the Python commands (argument lists after the interpreter) concurrently from the
    repository root (``envs``: one environment each, default :func:`child_env`), through
    :func:`start_script`; returns (returncode, output) of each."""
    envs = envs or [env or child_env()] * len(commands)
    with tempfile.TemporaryDirectory(prefix="sgr_d2_child_") as tmp:
        logs = [os.path.join(tmp, f"{i}.log") for i in range(len(commands))]
        procs = [start_script(cmd, e, log) for cmd, e, log in zip(commands, envs, logs)]
        return [(p.wait(timeout=600), open(log).read()) for p, log in zip(procs, logs)]


def folder_bytes(folder):
    """``{relative path: bytes}`` of every file under ``folder``: compared before and after a
    refused run."""
    from pathlib import Path

    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def thread_count():
    """This process's thread count (None where /proc does not list them)."""
    return len(os.listdir("/proc/self/task")) if sys.platform.startswith("linux") else None


def pytest_sessionfinish(session, exitstatus):
    from multiprocessing import forkserver

    # stop and reap this process's forkserver (preloaded_context), if it started one: its CPU time
    # and its children's then count as this process's children's (bench/suite_footprint.py)
    getattr(forkserver._forkserver, "_stop", lambda: None)()
    if _DATASETS:
        shutil.rmtree(_DATASETS, ignore_errors=True)  # the session's generated toy data


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """A folder for a module-scoped fixture, removed when the module's tests are done (pytest's
    retention policy only removes the function-scoped ``tmp_path`` folders of passing tests)."""
    d = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def layouts_root(tmp_path_factory):
    """A datasets root holding the raw-layout fixtures of ``tests/fixtures_layouts.py`` (COCO,
    ADE20K, Cityscapes: 2 scenes per split), written and prepared once per session; tests set
    ``DETECTRON2_DATASETS`` to it (``monkeypatch.setenv``) to load the registered names."""
    from fixtures_layouts import write_prepared

    root = tmp_path_factory.mktemp("layouts")
    write_prepared(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)
