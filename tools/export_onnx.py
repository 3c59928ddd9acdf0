#!/usr/bin/env python
"""Export a semantic-segmentation model to ONNX and check it against onnxruntime.

    python tools/export_onnx.py --config-file configs/ade20k/mask2former_r50_sgr.yaml \
        --weights output/model_final.pth --output model.onnx [--height 512 --width 512] [--dynamic] [KEY VALUE ...]

Input ``image``: (1, 3, H, W) float32, raw pixels in the config's INPUT.FORMAT (BGR by default).
Outputs: ``sem_seg`` (1, num_classes, H, W), the model's per-class scores at the input
resolution (argmax = the label map), and, with SGR, ``sgr_regions`` (1, K, h, w). The file takes
``--height`` × ``--width`` (default: INPUT.MIN_SIZE_TEST square); ``--dynamic`` makes it take any
size where the model allows it (a clear error names the part that does not). Unless
``--no-verify``, onnxruntime must reproduce PyTorch on a synthetic image (max |Δ| ≤ ``--atol``,
default 1e-4, and argmax agreement ≥ 99.9%); the tool prints the figures. Needs ``pip install 'sgr_d2[deploy]'``.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sgr_d2  # noqa: E402,F401  (before any detectron2 import)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True, help="checkpoint (.pth) written by train_net.py")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--height", type=int, default=None, help="input height (default INPUT.MIN_SIZE_TEST)")
    p.add_argument("--width", type=int, default=None, help="input width (default INPUT.MIN_SIZE_TEST)")
    p.add_argument("--dynamic", action="store_true", help="any input size (checked at a second size)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default sgr_d2.export.OPSET)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--atol", type=float, default=None,
                   help="largest difference allowed between onnxruntime and PyTorch (default sgr_d2.export.ATOL, 1e-4)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return p


def export(config_file, weights, output, height=None, width=None, dynamic=False, opset=None, verify=True,
           opts=(), atol=None):
    """Build the model, load ``weights``, export; returns ``(output names, {"HxW": report})``."""
    from detectron2.modeling import build_model

    from sgr_d2.engine import load_weights
    from sgr_d2.config import load_config
    from sgr_d2.export import ATOL, OPSET, check_exportable, export_onnx

    if not os.path.isfile(weights):
        raise FileNotFoundError(f"--weights {weights} does not exist")
    cfg = load_config(config_file, list(opts))
    cfg.MODEL.DEVICE = "cpu"  # onnxruntime is checked on the CPU; the graph does not depend on it
    cfg.freeze()
    model = build_model(cfg)
    check_exportable(model, dynamic)  # before loading the weights: fail fast
    load_weights(cfg, model, weights)  # the fit check every loading path uses
    model.eval()
    height = height or cfg.INPUT.MIN_SIZE_TEST
    width = width or cfg.INPUT.MIN_SIZE_TEST
    return export_onnx(model, output, height, width, dynamic=dynamic, opset=opset or OPSET, verify=verify,
                       atol=ATOL if atol is None else atol)


def main(argv=None):
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names, reports = export(args.config_file, args.weights, args.output, args.height, args.width, args.dynamic,
                            args.opset, not args.no_verify, args.opts, args.atol)
    print(f"wrote {args.output}: input 'image', outputs {names}")
    for size, report in reports.items():
        for name, e in report.items():
            extra = f", argmax agreement {100 * e['argmax_agreement']:.3f}%" if "argmax_agreement" in e else ""
            print(f"  {size} {name} {e['shape']}: onnxruntime vs PyTorch max |diff| {e['max_abs_diff']:.2e}{extra}")
    return names, reports


if __name__ == "__main__":
    main()
