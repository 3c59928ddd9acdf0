"""Panoptic and instance segmentation end to end (docs/tasks.md): ``train_net.py``'s body
(``run(args)``, in this process, as tests/test_folder_dataset.py runs it) with each task folder's
``mask2former_r50_sgr.yaml`` on the raw-layout fixtures of tests/fixtures_layouts.py (2 images of
32x48 per split), the model shrunk by :data:`TINY` (an R-18, narrow heads, 20 queries).

* ``--eval-only`` with random weights reports, on every layout, what the official code reports
  for it: PQ / SQ / RQ, mask AP, mIoU (each a finite number in range), from evaluators that
  received panoptic segments and instances in the dataset's own category ids;
* one training iteration of a panoptic and an instance config with SGR: finite SGR losses, and
  with ``MODEL.SGR.COMPONENTS instances`` the fixture's two touching persons are two components
  where ``connected`` has one;
* the readers of the semantic output: test-time augmentation evaluates the semantic output of a
  panoptic model and refuses configs without one; the demo draws panoptic and instance-only
  models; ``sgr_d2.predict.predict`` names the switch of a missing output.
"""
from __future__ import annotations

import json
import math
import os
import sys

import fixtures_layouts as fl
import numpy as np
import pytest
import torch
from conftest import REPO, folder_bytes
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

import sgr_d2.modeling.maskformer.meta_arch as meta_arch
from sgr_d2.engine.trainer import argument_parser, run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TINY = (
    "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", "SEED", "1", "MODEL.WEIGHTS", "",
    # the configs' backbone builder at depth 18, narrow heads: about a second per run on a CPU
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NHEADS", "4", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "20", "MODEL.MASK_FORMER.DEC_LAYERS", "2",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
    "MODEL.SGR.NUM_TOKENS", "16", "MODEL.SGR.NUM_MATCHED", "8", "MODEL.SGR.TOKEN_DIM", "32",
    "MODEL.SGR.NUM_HEADS", "4", "MODEL.SGR.FFN_DIM", "32",
    # the 32x48 images tested at 40x60, padded to 64x64 (SIZE_DIVISIBILITY 32): the outputs are
    # cropped and resized back to 32x48
    "INPUT.MIN_SIZE_TEST", "40", "INPUT.MAX_SIZE_TEST", "96",
    # random weights: keep every query, so that panoptic segments reach the evaluators
    "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.0", "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD", "0.0",
)
# training: one iteration of 2 images, no augmentation that changes the objects' contact (the
# LSJ resize at scale 1 to 64x64; the others' resize to 32 and 64x64 crop), float32 (bfloat16
# autocast is very slow on this CPU)
TRAIN = ("SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.AMP.ENABLED", "False",
         "INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SCALE", "1.0", "INPUT.MAX_SCALE", "1.0",
         "INPUT.MIN_SIZE_TRAIN", "(32,)", "INPUT.MAX_SIZE_TRAIN", "48", "INPUT.CROP.SIZE", "(64, 64)",
         "DATASETS.TEST", "()")
PQ = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")
# what --eval-only reports per folder, as the official Mask2Former train_net.py builds its
# evaluators for the folder's test set (bbox: COCOEvaluator's box AP of the all-zero boxes,
# as the official prints it); the panoptic ones with TEST.TOKEN_SEMANTICS
REPORTS = {
    "coco_panoptic": {"panoptic_seg": PQ, "segm": ("AP",), "bbox": ("AP",), "sem_seg": ("mIoU",)},
    "coco_instance": {"segm": ("AP",), "bbox": ("AP",)},
    "ade20k_panoptic": {"panoptic_seg": PQ, "segm": ("AP",), "bbox": ("AP",), "sem_seg": ("mIoU",)},
    "ade20k_instance": {"segm": ("AP",), "bbox": ("AP",)},
    "cityscapes_panoptic": {"panoptic_seg": PQ, "segm": ("AP",), "sem_seg": ("mIoU",),
                            "sem_seg_cityscapes": ("IoU",)},
    "cityscapes_instance": {"segm": ("AP",)},
}
TOKEN_METRICS = ("S_C", "D_C", "S_I", "D_I")


def _config(folder: str) -> str:
    return os.path.join(REPO, "configs", folder, "mask2former_r50_sgr.yaml")


def _run(folder: str, out, *opts, eval_only: bool = True):
    flags = ["--eval-only", "--allow-random-weights"] if eval_only else []
    return run(argument_parser().parse_args(["--config-file", _config(folder), *flags, *TINY, *opts,
                                             "OUTPUT_DIR", str(out)]))


@pytest.fixture
def layouts(layouts_root, monkeypatch, tmp_path):
    """The fixtures' datasets root, and the test's folder as the working directory (a run must
    leave nothing there but its OUTPUT_DIR)."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(layouts_root))
    monkeypatch.chdir(tmp_path)
    return layouts_root


def _categories(path: str, key: str = "categories") -> set:
    with open(path) as f:
        return {c["id"] for c in json.load(f)[key]}


@pytest.mark.parametrize("folder", sorted(REPORTS))
def test_eval_only_reports_pq_ap_and_miou_on_every_layout(layouts, folder, tmp_path):
    """--eval-only on the folder's test set: exactly the official result keys, each metric a
    finite number in [0, 100] (token metrics in [0, 1]); the panoptic evaluator got segments on
    every image and the COCO evaluators instances, all in the dataset's category ids; nothing
    written outside OUTPUT_DIR (cityscapesscripts' matches.json included)."""
    panoptic = folder.endswith("_panoptic")
    results = _run(folder, tmp_path / "out", "TEST.TOKEN_SEMANTICS", str(panoptic))
    expected = dict(REPORTS[folder], **({"token_semantics": TOKEN_METRICS} if panoptic else {}))
    assert set(results) == set(expected), sorted(results)
    for task, keys in expected.items():
        top = 1.0 if task == "token_semantics" else 100.0
        for key in keys:
            value = results[task][key]
            assert math.isfinite(value) and 0.0 <= value <= top, (task, key, value)
    assert os.listdir(tmp_path) == ["out"]

    test_set = {"coco_panoptic": "coco_2017_val_panoptic_with_sem_seg", "coco_instance": "coco_2017_val",
                "ade20k_panoptic": "ade20k_panoptic_val", "ade20k_instance": "ade20k_instance_val",
                "cityscapes_panoptic": "cityscapes_fine_panoptic_val",
                "cityscapes_instance": "cityscapes_fine_instance_seg_val"}[folder]
    meta = MetadataCatalog.get(test_set)
    inference = tmp_path / "out" / "inference"
    if panoptic:
        with open(inference / "predictions.json") as f:
            annotations = json.load(f)["annotations"]
        assert len(annotations) == len(DatasetCatalog.get(test_set)) == 2
        for a in annotations:
            assert a["segments_info"] and {s["category_id"] for s in a["segments_info"]} <= \
                _categories(meta.panoptic_json), a
    if not folder.startswith("cityscapes"):  # (cityscapesscripts' files are temporary)
        with open(inference / "coco_instances_results.json") as f:
            instances = json.load(f)
        assert instances and {r["category_id"] for r in instances} <= _categories(meta.json_file)


def test_token_metrics_of_an_instance_only_dataset_are_refused_naming_the_key(layouts, tmp_path):
    with pytest.raises(KeyError, match=r"TEST\.TOKEN_SEMANTICS.*instance-only dataset"):
        _run("coco_instance", tmp_path / "out", "TEST.TOKEN_SEMANTICS", "True")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ training
class _Recorder:
    """Wraps the MaskFormer's ``sgr_losses``: keeps the components each batch trained on."""

    def __init__(self):
        self.components = []
        self.real = meta_arch.sgr_losses

    def __call__(self, criterion, outputs, components):
        self.components.append([(c["labels"].cpu().numpy(), c["classes"].cpu().numpy()) for c in components])
        return self.real(criterion, outputs, components)


TRAINED = ("coco_panoptic", "cityscapes_instance")  # an LSJ panoptic mapper, MaskFormer's instance one
MODES = ("connected", "instances")


@pytest.fixture(scope="module")
def trained(layouts_root, tmp_path_factory):
    """One training iteration of each :data:`TRAINED` folder's SGR config with each component
    mode: ``{(folder, mode): (OUTPUT_DIR, the batch's components)}``."""
    root = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ret = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", str(layouts_root))
        recorder = _Recorder()
        mp.setattr(meta_arch, "sgr_losses", recorder)
        for folder in TRAINED:
            for mode in MODES:
                out = root / f"{folder}_{mode}"
                before = len(recorder.components)
                _run(folder, out, *TRAIN, "MODEL.SGR.COMPONENTS", mode, eval_only=False)
                assert len(recorder.components) == before + 1  # one iteration
                ret[folder, mode] = out, recorder.components[-1]
    torch.set_num_threads(threads)
    yield ret


def _segments(labels: np.ndarray, classes: np.ndarray) -> set:
    """The components of one image as (class, frozenset of its pixel indices)."""
    flat = labels.reshape(-1)
    return {(int(classes[k]), frozenset(np.flatnonzero(flat == k).tolist())) for k in range(len(classes))}


@pytest.mark.parametrize("folder", TRAINED)
def test_one_training_iteration_supervises_sgr_with_instances_or_connected_components(trained, folder):
    """The SGR terms in metrics.json are finite and positive with both modes. The batch holds
    both scenes (same seed, same crops in both runs): with ``instances`` the two touching persons
    are two components whose union is the one ``connected`` component; every other component,
    and the pixels covered, are the same."""
    person = 0  # contiguous class 0 in COCO panoptic and Cityscapes instance
    per_mode = {}
    for mode in MODES:
        out, batch = trained[folder, mode]
        with open(out / "metrics.json") as f:
            metrics = json.loads(f.readlines()[-1])
        for key in ("loss_sgr_union", "loss_sgr_cls", "loss_sgr_div"):
            assert math.isfinite(metrics[key]) and metrics[key] > 0, (mode, key, metrics.get(key))
        assert len(batch) == 2
        per_mode[mode] = batch
    found = 0
    for (conn_labels, conn_classes), (inst_labels, inst_classes) in zip(per_mode["connected"], per_mode["instances"]):
        assert np.array_equal(conn_labels >= 0, inst_labels >= 0)
        conn, inst = _segments(conn_labels, conn_classes), _segments(inst_labels, inst_classes)
        if not any(c == person for c, _ in conn):
            assert conn == inst  # scene 1: no person
            continue
        found += 1
        (merged,) = conn - inst
        a, b = sorted(inst - conn, key=lambda s: min(s[1]))
        assert merged[0] == a[0] == b[0] == person
        assert a[1] and b[1] and not a[1] & b[1] and a[1] | b[1] == merged[1]
    assert found == 1


def test_the_demo_draws_panoptic_and_instance_only_models_and_predict_names_the_switch(trained, layouts, tmp_path):
    """demo/demo.py on a panoptic model (its panoptic segmentation drawn) and on an instance-only
    one (no semantic output: its instances drawn): a drawing the image's size that is not the
    image. sgr_d2.predict.predict asked for the semantic output of the instance-only model names
    MODEL.MASK_FORMER.TEST.SEMANTIC_ON. The ADE20K panoptic classes are drawn by their own names."""
    sys.path.insert(0, os.path.join(REPO, "demo"))
    try:
        import demo as demo_script
        from predictor import drawing_metadata
    finally:
        sys.path.pop(0)
    image = DatasetCatalog.get("coco_2017_val")[0]["file_name"]
    pixels = np.asarray(Image.open(image).convert("RGB"))
    for folder in TRAINED:
        out, _ = trained[folder, "connected"]
        (path,) = [p for p in demo_script.main(["--config-file", _config(folder), "--input", image, "--output",
                                                str(tmp_path / folder), "--opts", *TINY,
                                                "MODEL.WEIGHTS", str(out / "model_final.pth"),
                                                "TEST.DETECTIONS_PER_IMAGE", "3"])  # (drawing 100 takes seconds)
                   if p.endswith("_seg.png")]
        drawn = np.asarray(Image.open(path).convert("RGB"))
        assert drawn.shape == pixels.shape and not np.array_equal(drawn, pixels), folder

    from sgr_d2.predict import build_predictor
    from sgr_d2.predict import predict, predictor_config

    out, _ = trained["cityscapes_instance", "connected"]
    predictor = build_predictor(predictor_config(_config("cityscapes_instance"), str(out / "model_final.pth"), TINY))
    with pytest.raises(KeyError, match=r"not \['sem_seg'\].*MODEL\.MASK_FORMER\.TEST\.SEMANTIC_ON True"):
        predict(predictor, pixels, require=("sem_seg",))
    assert set(predict(predictor, pixels, require=("instances",))) == {"instances", "sgr_regions"}

    ade = drawing_metadata(MetadataCatalog.get("ade20k_panoptic_val"))
    assert ade.thing_classes[fl.ADE_RAW["person"] - 1] == "person"
    assert ade.thing_classes[fl.ADE_RAW["car"] - 1] == "car"
    coco = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert drawing_metadata(coco) is coco  # things first: already indexed by class id


# --------------------------------------------------------------------- test-time augmentation
def test_tta_evaluates_the_semantic_output_of_a_panoptic_model_and_refuses_without_one(layouts, tmp_path):
    """TEST.AUG.ENABLED on the COCO panoptic config: the augmented run reports mIoU only, and at
    one scale without flip its predictions are the single-scale ones. Refused before anything is
    written: the instance-only Cityscapes config (SEMANTIC_ON False) and ADE20K instance
    (SEMANTIC_ON True, but a test set without semantic ground truth)."""
    aug = ("TEST.AUG.ENABLED", "True", "TEST.AUG.SCALES", "[1.0]", "TEST.AUG.FLIP", "False")
    results = _run("coco_panoptic", tmp_path / "out", *aug)
    assert {k for k in results if k.endswith("_TTA")} == {"sem_seg_TTA"}
    assert results["sem_seg_TTA"]["mIoU"] == results["sem_seg"]["mIoU"]
    single, augmented = (tmp_path / "out" / d / "sem_seg_predictions.json" for d in ("inference", "inference_TTA"))
    assert json.loads(single.read_text()) == json.loads(augmented.read_text())

    for folder, words in (("cityscapes_instance", "MODEL.MASK_FORMER.TEST.SEMANTIC_ON is False"),
                          ("ade20k_instance", "dataset 'ade20k_instance_val' (DATASETS.TEST, evaluator_type 'coco') "
                                              "has no semantic ground truth")):
        refused = tmp_path / folder
        refused.mkdir()
        (refused / "log.txt").write_text("an earlier run's log\n")
        for flags in ((), ("--eval-only", "--allow-random-weights")):
            with pytest.raises(ValueError) as e:
                run(argument_parser().parse_args(["--config-file", _config(folder), *flags, *TINY, *aug,
                                                  "OUTPUT_DIR", str(refused)]))
            assert "TEST.AUG.ENABLED" in str(e.value) and words in str(e.value), str(e.value)
        assert folder_bytes(refused) == {"log.txt": b"an earlier run's log\n"}
