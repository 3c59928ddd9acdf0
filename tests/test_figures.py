"""The figure tools, the demo and tools/token_semantics.py on sgr_toy with a briefly trained model.

The tests that need a model are ``slow`` (``pytest -m "slow or not slow"``): they share one
module-scoped model trained for 2 iterations.

Every figure is saved at figsize × dpi pixels (sgr_d2/visualization.py), so each test computes the
PNG's size from the settings it passes and reads the file back.
"""
import sgr_d2  # noqa: F401  (before any detectron2 import)

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_toy_cfg
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from sgr_d2.evaluation import METRIC_KEYS, image_token_semantics, read_label_map
from sgr_d2.visualization import concept_region_figure, token_colors

TINY = "sgr_toy_sem_seg_val_first3"


def _load(relpath):
    name = "_fig_" + os.path.splitext(os.path.basename(relpath))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _png(path):
    """(width, height) of the PNG at ``path``, after checking it is a non-blank image."""
    assert os.path.isfile(path) and os.path.getsize(path) > 0, path
    with Image.open(path) as im:
        assert im.format == "PNG"
        arr = np.asarray(im.convert("RGB"))
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 20, f"{path} looks blank"
    return arr.shape[1], arr.shape[0]


@pytest.fixture(scope="module")
def tiny_split():
    """The first 3 images of the toy validation split, as the dataset ``TINY``."""
    if TINY not in DatasetCatalog.list():
        DatasetCatalog.register(TINY, lambda: DatasetCatalog.get("sgr_toy_sem_seg_val")[:3])
        src = MetadataCatalog.get("sgr_toy_sem_seg_val")
        MetadataCatalog.get(TINY).set(stuff_classes=src.stuff_classes, stuff_colors=src.stuff_colors,
                                      ignore_label=src.ignore_label, evaluator_type="sem_seg")
    return DatasetCatalog.get(TINY)


@pytest.fixture(scope="module")
def toy_model(module_tmp, tiny_split):
    """A toy SGR model trained 2 iterations (CPU, batch 2)."""
    from sgr_d2.engine import Trainer

    out = module_tmp
    cfg = tiny_toy_cfg(os.path.join(REPO, "configs/toy/dil_fcn_r18_sgr.yaml"),
                       "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out), "DATASETS.TEST", "()",
                       "SOLVER.CHECKPOINT_PERIOD", "1000")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    weights = os.path.join(str(out), "model_final.pth")
    assert os.path.isfile(weights)
    return {"weights": weights, "config": os.path.join(REPO, "configs/toy/dil_fcn_r18_sgr.yaml"),
            "dicts": tiny_split, "out": str(out)}


def test_concept_region_figure_size_and_token_choice(tmp_path):
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 30:] = 200
    p = torch.zeros(3, 4, 6)
    p[0, :, :3] = 1
    p[1, :, 3:] = 0.7
    p[2, :, 3:] = 0.3
    path = concept_region_figure(img, p, str(tmp_path / "sub" / "cr.png"), num_tokens_shown=4,
                                 panel_inches=2.0, dpi=50)
    assert path == str(tmp_path / "sub" / "cr.png")
    # 2 fixed panels + min(4, K=3) heatmaps, 2 in × 50 dpi each
    assert _png(path) == ((2 + 3) * 100, 100)
    path = concept_region_figure(img, p.numpy(), str(tmp_path / "cr1.png"), num_tokens_shown=1)
    assert _png(path) == (3 * 300, 300)  # defaults: 3 in panels at 100 dpi
    with pytest.raises(ValueError, match="K=3"):
        concept_region_figure(img, p, str(tmp_path / "x.png"), tokens=[5])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        concept_region_figure(img[..., 0], p, str(tmp_path / "x.png"))


def test_token_colors_are_distinct():
    c = token_colors(128)
    assert c.shape == (128, 3) and c.dtype == np.uint8
    assert len({tuple(x) for x in c}) == 128


def test_plot_components_dataset_and_input_modes(tiny_split, tmp_path):
    tool = _load("tools/plot_components.py")
    out = tool.main(["--dataset", TINY, "--index", "1", "--output", str(tmp_path / "c.png"),
                     "--panel-inches", "2", "--dpi", "60"])
    assert _png(out) == (3 * 120, 120)  # image, ground truth, components
    d = tiny_split[0]
    out = tool.main(["--input", d["file_name"], d["sem_seg_file_name"], "--output", str(tmp_path / "c2.png")])
    assert _png(out) == (3 * 400, 400)  # defaults: 4 in at 100 dpi
    with pytest.raises(IndexError, match="3 images"):
        tool.main(["--dataset", TINY, "--index", "7", "--output", str(tmp_path / "c3.png")])


@pytest.mark.slow
def test_plot_token_histograms(toy_model, tmp_path):
    tool = _load("tools/plot_token_histograms.py")
    out = tool.main(["--config-file", toy_model["config"], "--weights", toy_model["weights"], "--dataset", TINY,
                     "--index", "0", "--tokens", "0", "5", "31", "--output", str(tmp_path / "h.png"),
                     "--panel-inches", "2", "--dpi", "50"])
    assert _png(out) == (4 * 100, 3 * 100)  # 4 columns, one row per token
    out = tool.main(["--config-file", toy_model["config"], "--weights", toy_model["weights"], "--dataset", TINY,
                     "--output", str(tmp_path / "h2.png")])
    assert _png(out) == (4 * 300, 2 * 300)  # default: the two tokens with the most mass
    with pytest.raises(ValueError, match="K=32"):
        tool.main(["--config-file", toy_model["config"], "--weights", toy_model["weights"], "--dataset", TINY,
                   "--tokens", "32", "--output", str(tmp_path / "h3.png")])


@pytest.mark.slow
def test_plot_qualitative(toy_model, tmp_path):
    tool = _load("tools/plot_qualitative.py")
    cfg, w = toy_model["config"], toy_model["weights"]
    out = tool.main(["--config-files", cfg, cfg, "--weights", w, w, "--names", "a", "b", "--dataset", TINY,
                     "--indices", "0", "2", "--output", str(tmp_path / "q.png"),
                     "--panel-inches", "2", "--legend-inches", "0.6", "--dpi", "50"])
    # (2 + 2 models) columns × 2 in; 2 rows × 2 in + 0.6 in of legend, at 50 dpi
    assert _png(out) == (4 * 100, 2 * 100 + 30)
    with pytest.raises(ValueError, match="2 --config-files but 1 --weights"):
        tool.main(["--config-files", cfg, cfg, "--weights", w, "--dataset", TINY, "--output", str(tmp_path / "x.png")])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        tool.main(["--config-files", cfg, "--weights", "nope.pth", "--dataset", TINY,
                   "--output", str(tmp_path / "x.png")])


@pytest.mark.slow
def test_demo_writes_segmentation_and_concept_regions(toy_model, tmp_path):
    demo = _load("demo/demo.py")
    folder = os.path.dirname(toy_model["dicts"][0]["file_name"])
    written = demo.main(["--config-file", toy_model["config"], "--input", os.path.join(folder, "000[0-1].jpg"),
                         "--output", str(tmp_path / "demo"), "--opts", "MODEL.WEIGHTS", toy_model["weights"]])
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["0000_regions.png", "0000_seg.png", "0001_regions.png", "0001_seg.png"]
    for p in written:
        if p.endswith("_seg.png"):
            assert _png(p) == (128, 128)  # the image's own size
        else:
            assert _png(p) == ((2 + 4) * 300, 300)  # image, region map, 4 heatmaps
    with pytest.raises(FileNotFoundError, match="no image file"):
        demo.main(["--config-file", toy_model["config"], "--input", str(tmp_path / "none*.jpg"),
                   "--output", str(tmp_path / "d2"), "--opts", "MODEL.WEIGHTS", toy_model["weights"]])


@pytest.mark.slow
def test_token_semantics_tool_matches_the_per_image_function(toy_model, tmp_path):
    tool = _load("tools/token_semantics.py")
    from sgr_d2.predict import build_predictor
    from sgr_d2.predict import predict, predictor_config

    rows = tool.main(["--config-file", toy_model["config"], "--weights", toy_model["weights"], "--dataset", TINY,
                      "--output-dir", str(tmp_path / "ev"), "--json", str(tmp_path / "rows.json")])
    assert len(rows) == 1 and rows[0]["K"] == 32 and rows[0]["L"] == 16
    assert 0.0 <= rows[0]["mIoU"] <= 100.0
    # the evaluator's averages equal the mean of the per-image function over DefaultPredictor outputs
    predictor = build_predictor(predictor_config(toy_model["config"], toy_model["weights"]))
    per_image = []
    for d in toy_model["dicts"]:
        image = np.asarray(Image.open(d["file_name"]).convert("RGB"))
        regions = predict(predictor, image)["sgr_regions"]
        per_image.append(image_token_semantics(regions, read_label_map(d["sem_seg_file_name"]),
                                               np.asarray(Image.open(d["instance_file_name"])).astype(np.int64)))
    for key in METRIC_KEYS:
        expected = float(np.nanmean([r[key] for r in per_image]))
        assert 0.0 <= rows[0][key] <= 1.0
        assert rows[0][key] == pytest.approx(expected, abs=1e-5), key
    record = json.loads((tmp_path / "ev" / "token_semantics.json").read_text())
    assert record["num_images"] == 3 and record["num_tokens"] == 32
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert saved[0]["dataset"] == TINY and not math.isnan(saved[0]["S_C"])


def test_sweep_kl_reads_the_final_evaluation_and_tabulates(tmp_path, capsys):
    tool = _load("tools/sweep_kl.py")
    for k, l, miou in ((4, 2, 40.0), (8, 2, 50.0)):
        run = tmp_path / f"K{k}_L{l}"
        run.mkdir()
        lines = [{"iteration": 9, "total_loss": 1.0},
                 {"iteration": 10, "sem_seg/mIoU": 1.0, "token_semantics/S_C": 0.9},  # an earlier eval
                 {"iteration": 20, "sem_seg/mIoU": miou, "token_semantics/S_C": 0.25,
                  "token_semantics/D_C": 0.5, "token_semantics/S_I": 0.125, "token_semantics/D_I": 1.0}]
        (run / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    # --skip-existing reuses finished runs: nothing is trained; L > K is skipped
    rows = tool.main(["--ks", "4", "--ls", "2", "6", "--output", str(tmp_path), "--skip-existing"])
    assert [(r["K"], r["L"], r["mIoU"]) for r in rows] == [(4, 2, 40.0)]
    assert "skipping K=4 L=6: L cannot exceed K" in capsys.readouterr().out
    rows = tool.main(["--ks", "4", "8", "--ls", "2", "--output", str(tmp_path), "--skip-existing"])
    assert [(r["K"], r["L"], r["mIoU"]) for r in rows] == [(4, 2, 40.0), (8, 2, 50.0)]
    assert rows[0]["S_C"] == 0.25 and rows[1]["D_I"] == 1.0  # the last evaluation, not the first
    assert json.loads((tmp_path / "sweep_kl.json").read_text())[1]["mIoU"] == 50.0
    table = (tmp_path / "sweep_kl.md").read_text().splitlines()
    assert table[0].split("|")[1:-1] == [f" {c:<{w}} " for c, w in
                                         zip(("K", "L", "mIoU", *METRIC_KEYS), (3, 3, 6, 5, 5, 5, 5))]
    assert table[2].replace(" ", "") == "|4|2|40.0|0.250|0.500|0.125|1.000|"
    with pytest.raises(ValueError, match="no evaluation"):
        (tmp_path / "K9_L1").mkdir()
        (tmp_path / "K9_L1" / "metrics.json").write_text(json.dumps({"iteration": 1}) + "\n")
        tool.read_final_metrics(str(tmp_path / "K9_L1"))
