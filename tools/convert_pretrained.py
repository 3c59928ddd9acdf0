#!/usr/bin/env python
"""Convert an ImageNet backbone state dict on the local disk into a detectron2 weights file.

Inputs (the kind is detected from the parameter names):

* a torchvision ResNet (resnet18/34/50/101/152 ``state_dict``, e.g. ``resnet101-cd907fc2.pth``)
  -> detectron2's ResNet names (``stem.conv1.*``, ``res2.0.conv1.*``, ``res2.0.conv1.norm.*``,
  ``res2.0.shortcut.*``), for ``build_dilated_resnet_backbone`` (any output stride) and the
  bottom-up ResNet of ``build_resnet_fpn_backbone``. torchvision puts the stride of a bottleneck
  in its 3×3 conv: use these weights with ``MODEL.RESNETS.STRIDE_IN_1X1 False``.
* a timm Swin Transformer (``swin_tiny_patch4_window7_224`` ...), or an official Microsoft Swin
  checkpoint (patch merging at the end of each stage; timm's own converter rewrites it)
  -> ``build_swin_backbone``'s names, the official segmentation ones (``patch_embed.*``,
  ``layers.{i}.*``, ``norm{i}``). The per-output LayerNorms ``norm{0..3}`` of the segmentation
  backbone are not part of an ImageNet model:
  the file holds LayerNorm's initial values for them (weight 1, bias 0), where the official Swin
  segmentation code (MaskFormer / Mask2Former, Swin + UperNet) starts them; the classifier's final
  ``norm`` is dropped with the classifier, as that code does.

The classifier (``fc.*`` / ``head.*``) is dropped, and so are BatchNorm's ``num_batches_tracked``
(detectron2's FrozenBN has none; BatchNorm restores it when loading). The output is a pickle
``{"model": {name: numpy array}, "__author__": "sgr_d2", "matching_heuristics": True}``:
``DetectionCheckpointer`` (MODEL.WEIGHTS) matches the names as suffixes, so they load into the
backbone whatever wraps it (``backbone.``, ``backbone.bottom_up.``, ``backbone.backbone.``).

Usage:
    python tools/convert_pretrained.py --input resnet101.pth --output pretrained/R-101.pkl
    python tools/convert_pretrained.py --input swin_tiny_patch4_window7_224.pth \\
        --output pretrained/swin_tiny_patch4_window7_224.pkl
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
from typing import Dict, Optional

import numpy as np
import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgr_d2.files import UnsafeWeightsError, WeightsReadError, atomic_write, read_weights  # noqa: E402

__all__ = ["convert_resnet", "convert_swin", "convert_state_dict", "detect_kind", "load_state_dict",
           "convert_file"]

AUTHOR = "sgr_d2"


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.pth``/``.pt``/``.bin`` (torch) or ``.safetensors`` file, read by
    sgr_d2's safe reader, unwrapped from a ``{"model": ...}`` / ``{"state_dict": ...}``
    checkpoint and a ``module.`` prefix."""
    try:
        sd = read_weights(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--input file {path} does not exist") from None
    except (UnsafeWeightsError, WeightsReadError) as e:  # their message names the file
        raise type(e)(f"--input: {str(e).rstrip('.')}; expected a torch (.pth/.pt/.bin) or .safetensors "
                      "state dict") from e
    for key in ("model", "state_dict", "model_state"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    if not sd:
        raise ValueError(f"{path} holds no state dict (expected a dict of tensors, got an empty dict)")
    sd = dict(sd)
    consume_prefix_in_state_dict_if_present(sd, "module.")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries {bad[:5]} are not tensors; expected a state dict")
    return sd


def detect_kind(sd: Dict[str, torch.Tensor]) -> str:
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        return "resnet"
    if "patch_embed.proj.weight" in sd and any(k.startswith("layers.") for k in sd):
        return "swin"
    raise ValueError(
        "cannot tell the kind of this state dict: expected a torchvision ResNet (keys conv1.weight, "
        "layer1.0.conv1.weight, ...) or a timm/official Swin Transformer (patch_embed.proj.weight, "
        f"layers.0.blocks.0..., ...); its first keys are {sorted(sd)[:8]}"
    )


_RESNET_NORM = re.compile(r"^layer(\d)\.(\d+)\.bn(\d)\.(.+)$")
_RESNET_CONV = re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\.weight$")
_RESNET_DOWN = re.compile(r"^layer(\d)\.(\d+)\.downsample\.([01])\.(.+)$")


def convert_resnet(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """torchvision ResNet names -> detectron2 ResNet names (classifier dropped)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked") or k.startswith("fc."):
            continue
        if k == "conv1.weight":
            name = "stem.conv1.weight"
        elif k.startswith("bn1."):
            name = "stem.conv1.norm." + k[len("bn1."):]
        elif m := _RESNET_CONV.match(k):
            name = f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"
        elif m := _RESNET_NORM.match(k):
            name = f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"
        elif m := _RESNET_DOWN.match(k):
            name = f"res{int(m[1]) + 1}.{m[2]}.shortcut." + ("" if m[3] == "0" else "norm.") + m[4]
        else:
            raise ValueError(f"unexpected key {k!r} in a torchvision ResNet state dict")
        out[name] = v
    return out


def convert_swin(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm (or official Microsoft) Swin names -> ``build_swin_backbone``'s, which are the official
    segmentation names: the patch merging at the end of a stage (timm keeps it at the start of the
    next, ``layers.{i+1}.downsample``), the output norms ``norm{i}`` at LayerNorm's initial values;
    the classifier and its final norm dropped."""
    if "patch_embed.proj.weight" not in sd:
        raise ValueError("the Swin Transformer state dict has no patch_embed.proj.weight")
    timm_layout = "layers.0.downsample.reduction.weight" not in sd
    out = {}
    stages = set()
    for k, v in sd.items():
        if k.startswith(("head.", "norm.")) or k.endswith(("relative_position_index", "attn_mask")):
            continue  # classifier and its norm; buffers the model rebuilds
        m = re.match(r"^layers\.(\d)\.(.+)$", k)
        if m and timm_layout and m[2].startswith("downsample."):
            k = f"layers.{int(m[1]) - 1}.{m[2]}"
        elif m:
            stages.add(int(m[1]))
        elif not k.startswith("patch_embed."):
            raise ValueError(f"unexpected key {k!r} in a Swin Transformer state dict")
        out[k] = v
    embed_dim = sd["patch_embed.proj.weight"].shape[0]
    for i in sorted(stages):
        out[f"norm{i}.weight"] = torch.ones(embed_dim * 2**i)
        out[f"norm{i}.bias"] = torch.zeros(embed_dim * 2**i)
    return out


def convert_state_dict(sd: Dict[str, torch.Tensor], kind: Optional[str] = None) -> Dict[str, np.ndarray]:
    kind = kind or detect_kind(sd)
    if kind == "resnet":
        out = convert_resnet(sd)
    elif kind == "swin":
        out = convert_swin(sd)
    else:
        raise ValueError(f"--kind is {kind!r}; expected 'resnet' or 'swin'")
    return {k: v.detach().cpu().numpy() for k, v in out.items()}


def convert_file(input_path: str, output_path: str, kind: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Convert ``input_path`` and write the detectron2 pickle to ``output_path``; returns the weights."""
    if not output_path.endswith(".pkl"):
        raise ValueError(f"--output {output_path} must end with .pkl (DetectionCheckpointer reads "
                         "name-matched weights from .pkl files)")
    model = convert_state_dict(load_state_dict(input_path), kind)
    data = {"model": model, "__author__": AUTHOR, "matching_heuristics": True}
    atomic_write(output_path, lambda f: pickle.dump(data, f))
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="torchvision ResNet or timm/official Swin state dict")
    parser.add_argument("--output", required=True, help="detectron2 weights file to write (.pkl)")
    parser.add_argument("--kind", choices=("resnet", "swin"), default=None,
                        help="default: detected from the parameter names")
    args = parser.parse_args(argv)
    try:
        model = convert_file(args.input, args.output, args.kind)
    except (FileNotFoundError, ValueError) as e:
        print(f"convert_pretrained: error: {e}", file=sys.stderr)
        return 1
    n = sum(v.size for v in model.values())
    print(f"wrote {args.output}: {len(model)} tensors, {n / 1e6:.2f}M values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
