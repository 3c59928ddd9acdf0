#!/usr/bin/env python
"""A ground-truth label map beside its connected components (supplementary Figure 1).

    python tools/plot_components.py --dataset sgr_toy_sem_seg_val --index 0 --output comp.png
    python tools/plot_components.py --input image.jpg labels.png [--dataset NAME] --output comp.png

With ``--dataset``, the image and label map are the dataset's ``--index``-th, drawn in the
dataset's colours (metadata ``stuff_colors``). With ``--input IMAGE LABEL`` (a single-channel PNG
of class ids; ``--dataset`` then only names and colours the classes). The PNG is
``ncols · panel · dpi`` × ``panel · dpi`` pixels (3 columns: image, ground truth, components).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sgr_d2  # noqa: E402,F401  (before any detectron2 import)
from sgr_d2.predict import dataset_item, read_labelled_image  # noqa: E402
from sgr_d2.visualization import components_figure  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", help="registered dataset name (image source, or class names/colours)")
    p.add_argument("--index", type=int, default=0, help="image index in --dataset")
    p.add_argument("--input", nargs=2, metavar=("IMAGE", "LABEL"), help="an image and its label PNG")
    p.add_argument("--ignore-label", type=int, default=None, help="default: the dataset's, else 255")
    p.add_argument("--output", required=True, help="PNG file to write")
    p.add_argument("--panel-inches", type=float, default=4.0)
    p.add_argument("--dpi", type=int, default=100)
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    from detectron2.data import MetadataCatalog

    if args.input is None and args.dataset is None:
        raise SystemExit("plot_components: give --dataset NAME [--index I] or --input IMAGE LABEL")
    meta = MetadataCatalog.get(args.dataset) if args.dataset else None
    ignore = args.ignore_label if args.ignore_label is not None else (
        int(meta.get("ignore_label", 255)) if meta is not None else 255)
    if args.input:
        image, labels = read_labelled_image(*args.input, len(meta.stuff_classes) if meta is not None else None,
                                            ignore)
    else:
        _, image, labels, _ = dataset_item(args.dataset, args.index)
    out = components_figure(image, labels, args.output, meta, ignore_label=ignore,
                            panel_inches=args.panel_inches, dpi=args.dpi)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
