#!/usr/bin/env python
"""``make demo``: train SGR on a generated toy dataset on the CPU, evaluate it, draw its regions.

``--task semantic`` (the default, ``make demo``):

1. trains ``configs/toy/dil_fcn_r18_sgr.yaml`` as ``train_net.py`` does, in a child process
   (``tools/experiments.py::train_and_evaluate``), which then evaluates the final checkpoint
   single-scale with the token-semantics metrics and multi-scale + flip (docs/method.md#training-and-evaluation-recipe);
2. prints the mIoU beside that of a majority-class predictor (chance level for this data);
3. writes a concept-region figure of the first validation image.

``--task panoptic``: trains Mask2Former R-18 with SGR on the panoptic toy
(``configs/toy/mask2former_r18_panoptic_sgr.yaml``, docs/method.md#the-panoptic-toy-touching-objects-of-one-class),
prints PQ, mask AP and mIoU beside the trivial baseline (every pixel the most frequent stuff
class), and writes a panoptic figure (image, ground truth, prediction) of the first validation
image beside the concept regions.
"""
import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # experiments.py

import sgr_d2  # noqa: E402,F401
from PIL import Image  # noqa: E402

from detectron2.data import DatasetCatalog  # noqa: E402

from sgr_d2.config import load_config  # noqa: E402
from sgr_d2.evaluation import METRIC_KEYS  # noqa: E402
from sgr_d2.predict import build_predictor, dataset_item, predict  # noqa: E402
from sgr_d2.visualization import concept_region_figure  # noqa: E402

from experiments import read_run, train_and_evaluate  # noqa: E402


def majority_class_miou(train_name: str, val_name: str, num_classes: int, ignore: int = 255) -> float:
    """mIoU (%) of predicting the most frequent training class at every pixel, on the val split."""
    counts = Counter()
    for d in DatasetCatalog.get(train_name):
        sem = np.asarray(Image.open(d["sem_seg_file_name"]))
        counts.update(dict(zip(*np.unique(sem[sem != ignore], return_counts=True))))
    major = max(counts, key=counts.get)
    inter = union = 0
    present = set()
    for d in DatasetCatalog.get(val_name):
        sem = np.asarray(Image.open(d["sem_seg_file_name"]))
        valid = sem != ignore
        present |= set(np.unique(sem[valid]).tolist())
        inter += int((sem[valid] == major).sum())
        union += int(valid.sum())
    # IoU of the majority class = its pixels / all labelled pixels; every other class scores 0,
    # and detectron2 averages over the classes present in the ground truth.
    return 100.0 * (inter / union) / len(present)


CONFIGS = {"semantic": "configs/toy/dil_fcn_r18_sgr.yaml", "panoptic": "configs/toy/mask2former_r18_panoptic_sgr.yaml"}
PANOPTIC_ROWS = [("PQ", "panoptic_seg/PQ", "PQ"), ("PQ things", "panoptic_seg/PQ_th", "PQ_th"),
                 ("PQ stuff", "panoptic_seg/PQ_st", "PQ_st"), ("mask AP", "segm/AP", None),
                 ("mIoU", "sem_seg/mIoU", "mIoU")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(CONFIGS), default="semantic")
    parser.add_argument("--config-file", default=None, help="default: " + ", ".join(
        f"{v} (--task {k})" for k, v in CONFIGS.items()))
    parser.add_argument("--output", default="output/demo")
    parser.add_argument("--iters", type=int, default=None, help="override SOLVER.MAX_ITER")
    parser.add_argument("--skip-train", action="store_true", help="evaluate an existing run")
    args = parser.parse_args(argv)
    config_file = args.config_file or str(REPO / CONFIGS[args.task])
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = ["MODEL.DEVICE", "cpu"]
    if args.iters:
        overrides += ["SOLVER.MAX_ITER", str(args.iters)]

    train_dir = out / "train"
    overrides += ["TEST.TOKEN_SEMANTICS", "True"]
    tta = args.task == "semantic"  # Mask2Former has no multi-scale panoptic evaluation
    if args.skip_train:
        run = read_run(str(train_dir), tta=tta)
    else:  # trains and evaluates (single-scale with token semantics, then multi-scale + flip)
        run = train_and_evaluate(config_file, overrides, str(train_dir), tta=tta, log_file=None, cwd=str(REPO))
    single, multi = run["metrics"], run["metrics_TTA"]

    weights = train_dir / "model_final.pth"
    cfg = load_config(config_file, overrides + ["OUTPUT_DIR", str(train_dir), "MODEL.WEIGHTS", str(weights)])
    predictor = build_predictor(cfg)  # the weights loaded through the fit check
    train_name, val_name = cfg.DATASETS.TRAIN[0], cfg.DATASETS.TEST[0]
    if args.task == "panoptic":
        return _panoptic_report(predictor, single, train_name, val_name, out)
    chance = majority_class_miou(train_name, val_name, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)

    fig = out / "concept_regions.png"
    _, rgb, _, _ = dataset_item(val_name, 0)
    figure_ok = _concept_region_figure(rgb, predict(predictor, rgb), fig)

    print("\n==== sgr_d2 demo: sgr_toy_sem_seg_val ====")
    print(f"mIoU single-scale           : {single['sem_seg/mIoU']:.2f}")
    print(f"mIoU multi-scale + flip     : {multi['sem_seg_TTA/mIoU']:.2f}")
    print(f"mIoU majority-class baseline: {chance:.2f}")
    _print_token_semantics(single, "token semantics             : ")
    if figure_ok:
        print(f"concept-region figure       : {fig}")
    return single, multi, chance


def _panoptic_report(predictor, metrics, train_name, val_name, out):
    """Prints the panoptic demo's table (the model beside the trivial baseline) and writes its
    figures; returns (the model's metrics, the baseline's)."""
    from detectron2.data import MetadataCatalog

    from sgr_d2.data.toy_panoptic import read_panoptic, trivial_baseline
    from sgr_d2.visualization import panoptic_figure

    base = trivial_baseline(train_name, val_name)
    print(f"\n==== sgr_d2 demo: {val_name} (trivial baseline: every pixel {base['stuff_class']}) ====")
    print(f"{'':10} {'model':>8} {'trivial':>8}")
    for label, key, base_key in PANOPTIC_ROWS:
        print(f"{label:10} {metrics[key]:8.2f} {base[base_key] if base_key else 0.0:8.2f}")
    _print_token_semantics(metrics, "token semantics: ")
    d, rgb, _, _ = dataset_item(val_name, 0)
    prediction = predict(predictor, rgb, require=["panoptic_seg"])
    pred_seg, pred_info = prediction["panoptic_seg"]
    # detectron2's panoptic loader gives contiguous category ids and isthing, as the model does
    fig = panoptic_figure(rgb, [("ground truth", read_panoptic(d), d["segments_info"]),
                                ("prediction", pred_seg, pred_info)],
                          MetadataCatalog.get(val_name), str(out / "panoptic.png"))
    print(f"panoptic figure: {fig}")
    if _concept_region_figure(rgb, prediction, out / "concept_regions.png"):
        print(f"concept-region figure: {out / 'concept_regions.png'}")
    return metrics, base


def _print_token_semantics(metrics, label):
    ts = {k: metrics[f"token_semantics/{k}"] for k in METRIC_KEYS if f"token_semantics/{k}" in metrics}
    if ts:
        print(label + "  ".join(f"{k}={v:.3f}" for k, v in ts.items()))


def _concept_region_figure(rgb, prediction, path) -> bool:
    """The concept regions of ``prediction`` (the model's output on ``rgb``); False for a model
    without SGR."""
    if "sgr_regions" not in prediction:
        return False
    concept_region_figure(rgb, prediction["sgr_regions"], str(path))
    return True


if __name__ == "__main__":
    os.environ.setdefault("DETECTRON2_DATASETS", str(REPO / "datasets"))
    main()
