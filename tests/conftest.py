"""Shared test set-up: sgr_d2 first (compat shims), a private DETECTRON2_DATASETS, small configs."""
import contextlib
import logging
import os
import shutil
import tempfile

import pytest

# The toy dataset is generated here once per test session (a few seconds), not in ./datasets.
# (only where none is set: worker processes that import this module inherit the session's folder)
_DATASETS = None
if "DETECTRON2_DATASETS" not in os.environ:
    _DATASETS = os.environ["DETECTRON2_DATASETS"] = tempfile.mkdtemp(prefix="sgr_d2_tests_datasets_")

import sgr_d2  # noqa: E402,F401  (before any detectron2 import)
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

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
    """Images ``start:start + n`` of ``cfg``'s training split through the training mapper, its
    augmentation drawn from numpy's RNG seeded with ``seed`` (the global RNG is restored after),
    so the batch does not depend on what earlier tests drew."""
    import numpy as np

    from detectron2.data import DatasetCatalog

    from sgr_d2.data import SemSegDatasetMapper

    mapper = SemSegDatasetMapper(cfg, True)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[start:start + n]]
    finally:
        np.random.set_state(state)


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("SGR_D2_TEST_DEVICE", "cpu"),
                     help="device of the tests that take the `device` fixture (bench/gpu_check.py runs them "
                          "with --device cuda -m uses_device)")


def pytest_collection_modifyitems(config, items):
    for item in items:  # the tests that take a device can be selected with -m uses_device
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.uses_device)


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


def pytest_sessionfinish(session, exitstatus):
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
