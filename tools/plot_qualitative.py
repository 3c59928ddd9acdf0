#!/usr/bin/env python
"""Image, ground truth and the predictions of several checkpoints side by side (Figures 3–5).

    python tools/plot_qualitative.py \
        --config-files configs/toy/dil_fcn_r18.yaml configs/toy/dil_fcn_r18_sgr.yaml \
        --weights base/model_final.pth sgr/model_final.pth \
        --dataset sgr_toy_sem_seg_val --indices 0 1 2 --output qual.png [--names FCN FCN+SGR]

One row per image; columns: image, ground truth, one prediction (argmax class) per model, in the
dataset's colours, with a legend of the classes that occur below. The PNG is
``(2 + models) · panel · dpi`` wide and ``(images · panel + legend) · dpi`` high.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sgr_d2  # noqa: E402,F401  (before any detectron2 import)
from sgr_d2.predict import build_predictor, dataset_item, predict, predictor_config  # noqa: E402
from sgr_d2.visualization import qualitative_figure  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-files", nargs="+", required=True)
    p.add_argument("--weights", nargs="+", required=True, help="one checkpoint per config")
    p.add_argument("--names", nargs="+", default=None, help="column titles (default: config file names)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--indices", type=int, nargs="+", default=[0])
    p.add_argument("--output", required=True)
    p.add_argument("--panel-inches", type=float, default=2.5)
    p.add_argument("--legend-inches", type=float, default=0.8)
    p.add_argument("--dpi", type=int, default=100)
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides for every model")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    from detectron2.data import MetadataCatalog

    if len(args.weights) != len(args.config_files):
        raise ValueError(f"{len(args.config_files)} --config-files but {len(args.weights)} --weights")
    names = args.names or [os.path.splitext(os.path.basename(c))[0] for c in args.config_files]
    if len(names) != len(args.config_files):
        raise ValueError(f"{len(args.config_files)} --config-files but {len(names)} --names")
    items = [dataset_item(args.dataset, i) for i in args.indices]
    rows = [{"image": image, "labels": labels, "predictions": []} for _, image, labels, _ in items]
    for config_file, weights in zip(args.config_files, args.weights):
        predictor = build_predictor(predictor_config(config_file, weights, args.opts))
        for row in rows:
            try:
                out = predict(predictor, row["image"], require=("sem_seg",))
            except KeyError as e:
                raise KeyError(f"the model of {config_file}: {e.args[0]}") from e
            row["predictions"].append(out["sem_seg"].argmax(dim=0).numpy())
        del predictor
    path = qualitative_figure(rows, names, args.output, MetadataCatalog.get(args.dataset),
                              panel_inches=args.panel_inches, legend_inches=args.legend_inches, dpi=args.dpi)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
