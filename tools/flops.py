#!/usr/bin/env python
"""FLOPs and parameters of a model's inference on one SIZE×SIZE image, and of its SGR component.

    python tools/flops.py --config-file configs/coco_stuff_10k/dil_fcn_r101_sgr.yaml --size 512

Counting is fvcore's ``FlopCountAnalysis``, tracing the model on a ``[{"image": ...}]`` batch
(detectron2's own wrapper of it imports caffe2 in v0.6, so the model is wrapped here): one fused multiply-add counts as one flop, as in the FLOPs tables of
the segmentation literature (and SGR's supplementary Table 1). Element-wise ops (additions,
activations, softmax, ...) are not counted. The fused attention ops fvcore does not know
(``scaled_dot_product_attention`` and PyTorch's inference fast paths of ``nn.MultiheadAttention``
and ``nn.TransformerEncoderLayer``) are counted here by their matrix products. Ops with no
counter are listed with a warning. The weights are random (MODEL.WEIGHTS is ignored): FLOPs and
parameter counts do not depend on them.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from typing import Any, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import sgr_d2  # noqa: E402,F401  (before detectron2: compatibility shims)
import torch  # noqa: E402
from fvcore.nn import FlopCountAnalysis  # noqa: E402
from fvcore.nn.jit_handles import get_shape  # noqa: E402
from torch import nn  # noqa: E402

from detectron2.modeling import build_model  # noqa: E402

from sgr_d2.config import load_config  # noqa: E402
from sgr_d2.modeling import find_sgr_backbone  # noqa: E402

__all__ = ["sdpa_flop_jit", "native_mha_flop_jit", "encoder_layer_flop_jit", "count_flops", "main"]


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``scaled_dot_product_attention(q, k, v)``: Q·Kᵀ and softmax(·)·V, i.e.
    ``batch × Lq × Lk × (E + Ev)`` multiply-adds for q (…, Lq, E), k (…, Lk, E), v (…, Lk, Ev)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= d
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def native_mha_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``_native_multi_head_attention(q, k, v, E, heads, qkv_w, qkv_b, proj_w, proj_b, ...)``, the
    inference fast path of ``nn.MultiheadAttention``: the q/k/v and output projections plus Q·Kᵀ and
    attention·V, ``Lq·E·E + 2·Lk·E·E + 2·Lq·Lk·E + Lq·E·E`` per batch element."""
    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    batch, lq, e = (q[0], q[1], q[2]) if len(q) == 3 else (1, q[0], q[1])
    lk = k[-2]
    return batch * (2 * lq * e * e + 2 * lk * e * e + 2 * lq * lk * e)


def encoder_layer_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``_transformer_encoder_layer_fwd(src, E, heads, qkv_w, qkv_b, proj_w, proj_b, gelu, norm_first,
    eps, n1_w, n1_b, n2_w, n2_b, ffn1_w, ffn1_b, ffn2_w, ffn2_b, mask, ...)``: self-attention as
    above plus the two feed-forward layers, ``2·L·E·F``."""
    src = get_shape(inputs[0])
    batch, length, e = (src[0], src[1], src[2]) if len(src) == 3 else (1, src[0], src[1])
    ffn = get_shape(inputs[14])[0]
    return batch * (4 * length * e * e + 2 * length * length * e + 2 * length * e * ffn)


EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::_native_multi_head_attention": native_mha_flop_jit,
    "aten::_transformer_encoder_layer_fwd": encoder_layer_flop_jit,
}
# element-wise and bookkeeping ops that are deliberately not counted (as in detectron2's analysis)
IGNORED_OPS = (
    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::mul_", "aten::div",
    "aten::div_", "aten::neg", "aten::exp", "aten::sqrt", "aten::reciprocal", "aten::log2",
    "aten::sigmoid", "aten::sigmoid_", "aten::softmax", "aten::batch_norm", "aten::max_pool2d",
    "aten::constant_pad_nd", "aten::argmax", "aten::sort", "aten::argsort", "aten::meshgrid",
    "aten::nonzero_numpy", "aten::gelu", "aten::relu", "aten::relu_", "aten::dropout",
    "aten::feature_dropout", "aten::roll", "aten::fill_", "aten::masked_fill", "aten::sum",
    "aten::mean", "aten::clone", "aten::pad", "aten::copy_", "aten::zeros", "aten::ne", "aten::eq",
    "aten::expand_as", "aten::unflatten",
)


class _Inference(nn.Module):
    """``model([{"image": image, "height": H, "width": W}])[0]["sem_seg"]``, traceable by fvcore."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        return self.model([{"image": image, "height": int(h), "width": int(w)}])[0]["sem_seg"]


def _module_name(model: torch.nn.Module, target: torch.nn.Module) -> str:
    for name, m in model.named_modules():
        if m is target:
            return name
    raise LookupError("module not found in the model")


def count_flops(cfg, size: int):
    """``(results, unsupported)``: a dict of totals (GFLOPs, M params, for the model and its SGR
    component) and a Counter of the ops fvcore could not count."""
    model = build_model(cfg)
    model.eval()
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8).float()
    analysis = FlopCountAnalysis(_Inference(model), (image.to(model.device),))
    analysis.set_op_handle(**EXTRA_HANDLES, **{op: None for op in IGNORED_OPS})
    analysis.unsupported_ops_warnings(False)  # listed once below instead of per occurrence
    analysis.uncalled_modules_warnings(False)
    total = analysis.total()
    results = {
        "gflops": total / 1e9,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "sgr_gflops": 0.0,
        "sgr_params_m": 0.0,
        "has_sgr": False,
    }
    sgr_backbone = find_sgr_backbone(model)
    if sgr_backbone is not None:
        # The traced module is _Inference, whose attribute "model" is ours.
        name = "model." + _module_name(model, sgr_backbone.sgr)
        by_module = analysis.by_module()
        if name not in by_module:
            raise RuntimeError(f"fvcore reported no module {name!r}; modules: {sorted(by_module)[:10]} ...")
        results.update(
            has_sgr=True,
            sgr_module=name[len("model."):],
            sgr_gflops=by_module[name] / 1e9,
            sgr_params_m=sum(p.numel() for p in sgr_backbone.sgr.parameters()) / 1e6,
        )
    unsupported = Counter(analysis.unsupported_ops())
    return results, unsupported


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--size", type=int, default=512, help="input height and width (default 512)")
    parser.add_argument("--device", default="cpu", help="MODEL.DEVICE for the count (default cpu)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.size < 32:
        parser.error(f"--size {args.size}: expected at least 32")
    logging.basicConfig(level=logging.ERROR)
    cfg = load_config(args.config_file, list(args.opts) + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device])
    with torch.no_grad():
        res, unsupported = count_flops(cfg, args.size)
    print(f"config: {args.config_file}  input: 1x3x{args.size}x{args.size}")
    print(f"model: {res['gflops']:.2f} GFLOPs  {res['params_m']:.2f} M parameters")
    if res["has_sgr"]:
        share = 100.0 * res["sgr_gflops"] / res["gflops"]
        base = res["gflops"] - res["sgr_gflops"]
        print(f"SGR ({res['sgr_module']}): {res['sgr_gflops']:.2f} GFLOPs ({share:.2f}% of the model, "
              f"+{100.0 * res['sgr_gflops'] / base:.2f}% over the rest)  {res['sgr_params_m']:.2f} M parameters")
    else:
        print("SGR: none in this model")
    if unsupported:
        ops = ", ".join(f"{op} ×{n}" for op, n in sorted(unsupported.items()))
        print(f"WARNING: ops fvcore could not count (not in the totals): {ops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
