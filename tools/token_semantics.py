#!/usr/bin/env python
"""mIoU and the token-semantics metrics S_C, D_C, S_I, D_I of a checkpoint (docs/method.md#token-semantics-metrics-s_c-d_c-s_i-d_i).

    python tools/token_semantics.py --config-file configs/toy/dil_fcn_r18_sgr.yaml \
        --weights output/toy/dil_fcn_r18_sgr/model_final.pth [--dataset NAME] [KEY VALUE ...]

Evaluates single-scale on ``--dataset`` (default: every name in ``DATASETS.TEST``) with the
config's evaluator (mIoU) and ``TokenSemanticsEvaluator``, then prints one table row per
dataset with K (``MODEL.SGR.NUM_TOKENS``) and L (``MODEL.SGR.NUM_MATCHED``). Files go to
``--output-dir`` (default ``<OUTPUT_DIR>/inference``): ``token_semantics.json`` and the mIoU
evaluator's outputs. ``--json FILE`` also writes the table's rows.
"""
import argparse
import json
import logging
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sgr_d2  # noqa: E402,F401  (before any detectron2 import)
from sgr_d2.evaluation.token_semantics import METRIC_KEYS  # noqa: E402

COLUMNS = ("dataset", "K", "L", "mIoU", *METRIC_KEYS)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True, help="checkpoint (.pth)")
    p.add_argument("--dataset", action="append", help="dataset name (repeatable); default DATASETS.TEST")
    p.add_argument("--output-dir", default=None, help="default <OUTPUT_DIR>/inference")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return p


def format_table(rows, columns=COLUMNS) -> str:
    """A GitHub-style table of ``rows`` (dicts); floats with 3 decimals, mIoU with 1."""
    from tabulate import tabulate

    def fmt(key, v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else (f"{v:.1f}" if key == "mIoU" else f"{v:.3f}")
        return v

    return tabulate([[fmt(c, r.get(c, "")) for c in columns] for r in rows], headers=list(columns),
                    tablefmt="github", disable_numparse=True)


def evaluate(config_file, weights, datasets=None, opts=(), output_dir=None):
    """Rows ``{"dataset", "K", "L", "mIoU", S_C, D_C, S_I, D_I}`` (:data:`COLUMNS`), one per dataset."""
    from detectron2.evaluation import inference_on_dataset
    from detectron2.utils.logger import setup_logger

    from sgr_d2.engine import Trainer, load_weights
    from sgr_d2.config import load_config

    if not os.path.isfile(weights):
        raise FileNotFoundError(f"checkpoint {weights} does not exist")
    cfg = load_config(config_file, list(opts) + ["MODEL.WEIGHTS", weights, "TEST.TOKEN_SEMANTICS", "True"])
    import torch

    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    names = list(datasets) if datasets else list(cfg.DATASETS.TEST)
    if not names:
        raise ValueError(f"no dataset: give --dataset or set DATASETS.TEST in {config_file}")
    cfg.freeze()
    if not logging.getLogger("detectron2").handlers:
        setup_logger(name="detectron2")
        setup_logger(name="sgr_d2")
    model = Trainer.build_model(cfg)
    load_weights(cfg, model, weights)
    model.eval()
    rows = []
    for name in names:
        folder = output_dir or os.path.join(cfg.OUTPUT_DIR, "inference")
        if len(names) > 1:
            folder = os.path.join(folder, name)
        evaluator = Trainer.build_evaluator(cfg, name, output_folder=folder)
        res = inference_on_dataset(model, Trainer.build_test_loader(cfg, name), evaluator)
        ts = res.get("token_semantics", {})
        rows.append({"dataset": name, "K": cfg.MODEL.SGR.NUM_TOKENS, "L": cfg.MODEL.SGR.NUM_MATCHED,
                     "mIoU": float(res.get("sem_seg", {}).get("mIoU", math.nan)),
                     **{k: float(ts.get(k, math.nan)) for k in METRIC_KEYS}})
    return rows


def main(argv=None):
    args = get_parser().parse_args(argv)
    rows = evaluate(args.config_file, args.weights, args.dataset, args.opts, args.output_dir)
    print(format_table(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump([{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                       for r in rows], f, indent=2)
    return rows


if __name__ == "__main__":
    main()
