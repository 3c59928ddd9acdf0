#!/usr/bin/env python
"""``make demo``: train SGR on the generated toy dataset on the CPU, evaluate it, draw its regions.

1. trains ``configs/toy/dil_fcn_r18_sgr.yaml`` as ``train_net.py`` does, in a child process
   (``tools/experiments.py::train_and_evaluate``), which then evaluates the final checkpoint
   single-scale with the token-semantics metrics and multi-scale + flip (docs/method.md#training-and-evaluation-recipe);
2. prints the mIoU beside that of a majority-class predictor (chance level for this data);
3. writes a concept-region figure of the first validation image.
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default=str(REPO / "configs/toy/dil_fcn_r18_sgr.yaml"))
    parser.add_argument("--output", default="output/demo")
    parser.add_argument("--iters", type=int, default=None, help="override SOLVER.MAX_ITER")
    parser.add_argument("--skip-train", action="store_true", help="evaluate an existing run")
    args = parser.parse_args(argv)
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = ["MODEL.DEVICE", "cpu"]
    if args.iters:
        overrides += ["SOLVER.MAX_ITER", str(args.iters)]

    train_dir = out / "train"
    overrides += ["TEST.TOKEN_SEMANTICS", "True"]
    if args.skip_train:
        run = read_run(str(train_dir), tta=True)
    else:  # trains and evaluates (single-scale with token semantics, then multi-scale + flip)
        run = train_and_evaluate(args.config_file, overrides, str(train_dir), tta=True, log_file=None,
                                 cwd=str(REPO))
    single, multi = run["metrics"], run["metrics_TTA"]

    weights = train_dir / "model_final.pth"
    cfg = load_config(args.config_file, overrides + ["OUTPUT_DIR", str(train_dir), "MODEL.WEIGHTS", str(weights)])
    predictor = build_predictor(cfg)  # the weights loaded through the fit check
    train_name, val_name = cfg.DATASETS.TRAIN[0], cfg.DATASETS.TEST[0]
    chance = majority_class_miou(train_name, val_name, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)

    fig = out / "concept_regions.png"
    figure_ok = _concept_region_figure(predictor, val_name, fig)

    print("\n==== sgr_d2 demo: sgr_toy_sem_seg_val ====")
    print(f"mIoU single-scale           : {single['sem_seg/mIoU']:.2f}")
    print(f"mIoU multi-scale + flip     : {multi['sem_seg_TTA/mIoU']:.2f}")
    print(f"mIoU majority-class baseline: {chance:.2f}")
    ts = {k: single[f"token_semantics/{k}"] for k in METRIC_KEYS if f"token_semantics/{k}" in single}
    if ts:
        print("token semantics             : " + "  ".join(f"{k}={v:.3f}" for k, v in ts.items()))
    if figure_ok:
        print(f"concept-region figure       : {fig}")
    return single, multi, chance


def _concept_region_figure(predictor, dataset_name, path) -> bool:
    """The concept regions of the dataset's first image; False for a model without SGR."""
    _, rgb, _, _ = dataset_item(dataset_name, 0)
    out = predict(predictor, rgb)
    if "sgr_regions" not in out:
        return False
    concept_region_figure(rgb, out["sgr_regions"], str(path))
    return True


if __name__ == "__main__":
    os.environ.setdefault("DETECTRON2_DATASETS", str(REPO / "datasets"))
    main()
