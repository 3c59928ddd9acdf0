#!/usr/bin/env python
"""Concept regions of chosen tokens with their instance- and class-level histograms (Figure 2).

    python tools/plot_token_histograms.py --config-file configs/toy/dil_fcn_r18_sgr.yaml \
        --weights model_final.pth --dataset sgr_toy_sem_seg_val --index 0 [--tokens 3 17] \
        --output hist.png [--opts KEY VALUE ...]

Runs the model on the dataset's ``--index``-th image; its ``"sgr_regions"`` give P. One row per
token (default: the two with the most mass over the labelled pixels): the region map, the
instance histogram ``g_k`` and the class histogram ``h_k`` (docs/method.md); the image with its
ground-truth instances is on the left. The PNG is ``4 · panel · dpi`` wide and
``tokens · panel · dpi`` high.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sgr_d2  # noqa: E402,F401  (before any detectron2 import)
from sgr_d2.predict import build_predictor, dataset_item, predict, predictor_config  # noqa: E402
from sgr_d2.visualization import token_histogram_figure  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--dataset", default=None, help="default: the config's DATASETS.TEST[0]")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="token indices (default: 2 with most mass)")
    p.add_argument("--num-tokens", type=int, default=2, help="how many tokens without --tokens")
    p.add_argument("--output", required=True)
    p.add_argument("--panel-inches", type=float, default=3.0)
    p.add_argument("--dpi", type=int, default=100)
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    from detectron2.data import MetadataCatalog

    predictor = build_predictor(predictor_config(args.config_file, args.weights, args.opts))
    dataset = args.dataset or (predictor.cfg.DATASETS.TEST[0] if predictor.cfg.DATASETS.TEST else None)
    if dataset is None:
        raise ValueError("no dataset: give --dataset or set DATASETS.TEST in the config")
    _, image, labels, instances = dataset_item(dataset, args.index)
    out = predict(predictor, image)
    if "sgr_regions" not in out:
        raise ValueError(f"the model of {args.config_file} returned no 'sgr_regions': it has no SGR component "
                         "(MODEL.BACKBONE.NAME must be 'build_sgr_backbone')")
    meta = MetadataCatalog.get(dataset)
    path = token_histogram_figure(image, out["sgr_regions"], labels, args.output, meta, instances,
                                  tokens=args.tokens, num_tokens=args.num_tokens,
                                  ignore_label=int(meta.get("ignore_label", 255)),
                                  panel_inches=args.panel_inches, dpi=args.dpi)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
