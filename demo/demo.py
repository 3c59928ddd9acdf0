#!/usr/bin/env python
"""sgr_d2 demo: segment images and draw the SGR concept regions.

    python demo/demo.py --config-file configs/toy/dil_fcn_r18_sgr.yaml \
        --input 'datasets/sgr_toy/images/val/*.jpg' --output out/ \
        --opts MODEL.WEIGHTS output/toy/dil_fcn_r18_sgr/model_final.pth

``--onnx model.onnx`` runs a file written by ``tools/export_onnx.py`` with onnxruntime instead of
the PyTorch model (the config still gives the class names, colours and input format; no
``MODEL.WEIGHTS`` needed):

    python demo/demo.py --config-file configs/toy/dil_fcn_r18_sgr.yaml --onnx model.onnx \
        --input 'datasets/sgr_toy/images/val/*.jpg' --output out/

``--input`` takes image files, folders (every image inside) and glob patterns. For each image
``<stem>.jpg`` the demo writes ``<output>/<stem>_seg.png`` (the prediction over the image, at the
image's size: detectron2's ``Visualizer`` draws the panoptic segmentation of a panoptic model, else
the predicted classes and the instances, as the official demo does) and, for a model with SGR,
``<output>/<stem>_regions.png`` (``sgr_d2.visualization.concept_region_figure``).
"""
import argparse
import glob
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # predictor.py
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # sgr_d2

import sgr_d2  # noqa: E402,F401  (before any detectron2 import)
import torch  # noqa: E402
import tqdm  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from predictor import VisualizationDemo  # noqa: E402
from sgr_d2.config import load_config  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("sgr_d2").warning("CUDA is not available: running on the CPU")
        cfg.MODEL.DEVICE = "cpu"
    if getattr(args, "onnx", None):
        if not os.path.isfile(args.onnx):
            raise FileNotFoundError(f"--onnx {args.onnx} does not exist")
    elif not cfg.MODEL.WEIGHTS:
        raise ValueError("MODEL.WEIGHTS is empty: pass --opts MODEL.WEIGHTS <checkpoint.pth> (or --onnx model.onnx)")
    elif not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise FileNotFoundError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} does not exist")
    cfg.freeze()
    return cfg


def get_parser():
    parser = argparse.ArgumentParser(description="sgr_d2 demo: segmentation and concept regions")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files, folders or glob patterns, e.g. 'directory/*.jpg'")
    parser.add_argument("--output", required=True, help="folder for the PNGs (created)")
    parser.add_argument("--onnx", default=None, metavar="FILE",
                        help="run this exported model (tools/export_onnx.py) with onnxruntime")
    parser.add_argument("--num-tokens-shown", type=int, default=4,
                        help="token heatmaps in the concept-region figure")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth")
    return parser


def expand_inputs(items):
    """Files, folders (their images, sorted) and glob patterns → a sorted list of image paths."""
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(p for p in glob.glob(os.path.expanduser(item)) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"--input {item!r}: no image file, folder with images, or glob match")
        paths.extend(found)
    return list(dict.fromkeys(paths))


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="fvcore")
    logger = setup_logger(name="sgr_d2.demo")
    logger.info("Arguments: " + str(args))
    cfg = setup_cfg(args)
    paths = expand_inputs(args.input)
    os.makedirs(args.output, exist_ok=True)
    demo = VisualizationDemo(cfg, onnx=args.onnx)
    written = []
    stems = set()
    for path in tqdm.tqdm(paths, desc="demo", unit="img"):
        try:
            img = read_image(path, format="BGR")
        except Exception as e:
            raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
        start = time.time()
        predictions, vis_output, regions = demo.run_on_image(img)
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:  # same name in two folders: keep both
            stem = f"{stem}_{len(stems)}"
        stems.add(stem)
        seg_path = os.path.join(args.output, f"{stem}_seg.png")
        vis_output.save(seg_path)
        written.append(seg_path)
        if regions is not None:
            written.append(demo.save_regions(img, regions, os.path.join(args.output, f"{stem}_regions.png"),
                                             args.num_tokens_shown))
        logger.info(f"{path}: {time.time() - start:.2f}s" + ("" if regions is not None else " (no SGR regions)"))
    return written


if __name__ == "__main__":
    main()
