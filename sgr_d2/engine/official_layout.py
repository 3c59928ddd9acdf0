"""Official MaskFormer / Mask2Former checkpoint names <-> sgr_d2 names: the one place they are renamed.

sgr_d2's MaskFormer, Mask2Former and Swin modules are the official architectures (same layers,
widths and order of operations), but some sub-modules carry other names. Published model-zoo
files (``{"model": {name: array}, "__author__": ...}`` pickles or ``{"model": {name: tensor}}``
torch files) are recognised from their names and renamed here, by ``AtomicCheckpointer`` when
it loads ``MODEL.WEIGHTS`` (as detectron2 renames Caffe2 files) and by
``tools/convert_checkpoint.py``, which writes files in either layout.

official name (prefix)                                   sgr_d2 name
-------------------------------------------------------  ------------------------------------------------
backbone.layers.{i}.blocks.*          (Swin)             backbone.res{i+2}.stage.blocks.*
backbone.layers.{i}.downsample.*      (Swin)             backbone.res{i+3}.stage.downsample.*
backbone.norm{i}.*                    (Swin)             backbone.res{i+2}.norm.*
sem_seg_head.pixel_decoder.adapter_{k}.*                 sem_seg_head.pixel_decoder.lateral_convs.{A-k}.*
sem_seg_head.pixel_decoder.layer_{k}.*                   sem_seg_head.pixel_decoder.output_convs.{L-k}.*
sem_seg_head.pixel_decoder.transformer.encoder.layers.*  sem_seg_head.pixel_decoder.transformer.layers.*
sem_seg_head.predictor.transformer_self_attention_layers.*   sem_seg_head.predictor.self_attention_layers.*
sem_seg_head.predictor.transformer_cross_attention_layers.*  sem_seg_head.predictor.cross_attention_layers.*
sem_seg_head.predictor.transformer_ffn_layers.*              sem_seg_head.predictor.ffn_layers.*
sem_seg_head.predictor.transformer.decoder.layers.{n}.X  sem_seg_head.predictor.transformer.decoder_layers.{n}.Y
sem_seg_head.predictor.transformer.decoder.norm.*        sem_seg_head.predictor.transformer.decoder_norm.*

``A`` and ``L`` are the numbers of ``adapter_k`` / ``layer_k`` modules: the official pixel
decoders number them from the finest level (``adapter_1`` reads ``res2``), sgr_d2's lists run
coarsest first. In MaskFormer's DETR decoder layers, X -> Y is ``self_attn`` -> ``self_attn.self_attn``,
``norm1`` -> ``self_attn.norm``, ``multihead_attn`` -> ``cross_attn.multihead_attn``, ``norm2`` ->
``cross_attn.norm``, ``linear1``/``linear2`` -> ``ffn.linear1``/``ffn.linear2``, ``norm3`` -> ``ffn.norm``.
Every other name (the ResNet, ``class_embed``, ``mask_embed``, ``query_embed``, ``input_proj``, ...)
is the same in both.

Official tensors that no sgr_d2 parameter takes (:data:`OFFICIAL_ONLY`): ``criterion.empty_weight``
(the loss's class weights, which sgr_d2 builds from ``MODEL.MASK_FORMER.NO_OBJECT_WEIGHT``),
Swin's ``relative_position_index`` (an index timm computes, by the same formula) and BatchNorm's
``num_batches_tracked`` counters of the SyncBN-trained models (unused with a momentum). They are
set aside, not loaded; ``tools/convert_checkpoint.py`` keeps them in the converted file so that
converting back restores them bit for bit, and otherwise recomputes them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple, TypeVar

__all__ = ["Recognised", "recognise", "official_to_sgr", "sgr_to_official", "official_name", "is_official_only",
           "OFFICIAL_ONLY"]

T = TypeVar("T")

PD = "sem_seg_head.pixel_decoder."
PRED = "sem_seg_head.predictor."
# tensors of official files that no sgr_d2 parameter or persistent buffer takes
OFFICIAL_ONLY = ("criterion.empty_weight", "*.relative_position_index", "*.num_batches_tracked")

# Mask2Former's decoder lists
_M2F_LISTS = (("transformer_self_attention_layers.", "self_attention_layers."),
              ("transformer_cross_attention_layers.", "cross_attention_layers."),
              ("transformer_ffn_layers.", "ffn_layers."))
# MaskFormer's DETR decoder layer: official sub-module -> sgr_d2 sub-module
_DETR_DECODER = {"self_attn": "self_attn.self_attn", "norm1": "self_attn.norm",
                 "multihead_attn": "cross_attn.multihead_attn", "norm2": "cross_attn.norm",
                 "linear1": "ffn.linear1", "linear2": "ffn.linear2", "norm3": "ffn.norm"}
_DETR_DECODER_BACK = {v: k for k, v in _DETR_DECODER.items()}

_SWIN_BLOCKS = re.compile(r"^backbone\.layers\.(\d+)\.blocks\.(.+)$")
_SWIN_DOWN = re.compile(r"^backbone\.layers\.(\d+)\.downsample\.(.+)$")
_SWIN_NORM = re.compile(r"^backbone\.norm(\d+)\.(.+)$")
_ADAPTER = re.compile(r"^" + re.escape(PD) + r"adapter_(\d+)\.(.+)$")
_LAYER = re.compile(r"^" + re.escape(PD) + r"layer_(\d+)\.(.+)$")
_DETR_LAYER = re.compile(r"^" + re.escape(PRED) + r"transformer\.decoder\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)$")

_OURS_SWIN_BLOCKS = re.compile(r"^backbone\.res(\d)\.stage\.blocks\.(.+)$")
_OURS_SWIN_DOWN = re.compile(r"^backbone\.res(\d)\.stage\.downsample\.(.+)$")
_OURS_SWIN_NORM = re.compile(r"^backbone\.res(\d)\.norm\.(.+)$")
_OURS_LATERAL = re.compile(r"^" + re.escape(PD) + r"lateral_convs\.(\d+)\.(.+)$")
_OURS_OUTPUT = re.compile(r"^" + re.escape(PD) + r"output_convs\.(\d+)\.(.+)$")
# the same, under any prefix (a model with SGR: backbone.backbone.*; the head is never wrapped)
_OURS_LATERAL_ANY = re.compile(r"^(?:.*\.)?" + re.escape(PD) + r"lateral_convs\.(\d+)\.")
_OURS_OUTPUT_ANY = re.compile(r"^(?:.*\.)?" + re.escape(PD) + r"output_convs\.(\d+)\.")
_OURS_DETR_LAYER = re.compile(r"^" + re.escape(PRED) + r"transformer\.decoder_layers\.(\d+)\.([a-z_]+\.[a-z_0-9]+)\.(.+)$")


@dataclass(frozen=True)
class Recognised:
    """What :func:`recognise` found in a file's names."""

    head: Optional[str]  # "MaskFormer" or "Mask2Former" (its transformer decoder's names), or None
    pixel_decoder: bool  # the official pixel decoder names (adapter_k / layer_k / transformer.encoder)
    swin: bool  # the official (detectron2-port) Swin backbone

    def describe(self) -> str:
        parts = []
        if self.head:
            parts.append(f"the official {self.head} head")
        elif self.pixel_decoder:
            parts.append("the official pixel decoder")
        if self.swin:
            parts.append("the official Swin backbone (D2SwinTransformer)")
        return " with ".join(parts)


def _index_count(keys, pattern: re.Pattern, base: int) -> int:
    """How many numbered modules ``pattern`` names: the largest index (numbered from ``base``)."""
    found = [int(m[1]) for k in keys if (m := pattern.match(k))]
    return max(found) + 1 - base if found else 0


def recognise(keys) -> Optional[Recognised]:
    """The official layout of a state dict's names, or None when it has none of its names."""
    keys = list(keys)
    m2f = any(k.startswith(PRED + a) for k in keys for a, _ in _M2F_LISTS) or any(
        k.startswith(PD + "transformer.encoder.layers.") for k in keys)
    maskformer = any(k.startswith(PRED + "transformer.decoder.") for k in keys)
    pixel = any(_ADAPTER.match(k) or _LAYER.match(k) for k in keys)
    swin = any(_SWIN_BLOCKS.match(k) or _SWIN_NORM.match(k) for k in keys)
    if m2f and maskformer:
        raise ValueError("the file holds both official MaskFormer (sem_seg_head.predictor.transformer."
                         "decoder.*) and Mask2Former (sem_seg_head.predictor.transformer_*_layers.*) names")
    head = "Mask2Former" if m2f else "MaskFormer" if maskformer else None
    if head is None and not pixel and not swin:
        return None
    return Recognised(head=head, pixel_decoder=pixel or m2f, swin=swin)


def is_official_only(key: str) -> bool:
    return key == "criterion.empty_weight" or key.endswith((".relative_position_index", ".num_batches_tracked"))


def _to_sgr(key: str, n_adapters: int, n_layers: int) -> str:
    if m := _SWIN_BLOCKS.match(key):
        return f"backbone.res{int(m[1]) + 2}.stage.blocks.{m[2]}"
    if m := _SWIN_DOWN.match(key):
        return f"backbone.res{int(m[1]) + 3}.stage.downsample.{m[2]}"
    if m := _SWIN_NORM.match(key):
        return f"backbone.res{int(m[1]) + 2}.norm.{m[2]}"
    if m := _ADAPTER.match(key):
        return f"{PD}lateral_convs.{n_adapters - int(m[1])}.{m[2]}"
    if m := _LAYER.match(key):
        return f"{PD}output_convs.{n_layers - int(m[1])}.{m[2]}"
    if key.startswith(PD + "transformer.encoder.layers."):
        return PD + "transformer.layers." + key[len(PD + "transformer.encoder.layers."):]
    for official, ours in _M2F_LISTS:
        if key.startswith(PRED + official):
            return PRED + ours + key[len(PRED + official):]
    if m := _DETR_LAYER.match(key):
        if m[2] not in _DETR_DECODER:
            raise ValueError(f"official MaskFormer decoder tensor {key}: unknown sub-module {m[2]!r}; "
                             f"expected one of {sorted(_DETR_DECODER)}")
        return f"{PRED}transformer.decoder_layers.{m[1]}.{_DETR_DECODER[m[2]]}.{m[3]}"
    if key.startswith(PRED + "transformer.decoder.norm."):
        return PRED + "transformer.decoder_norm." + key[len(PRED + "transformer.decoder.norm."):]
    if key.startswith(PRED + "transformer.encoder."):
        raise ValueError(f"official tensor {key}: MaskFormer's DETR encoder (MODEL.MASK_FORMER.ENC_LAYERS > 0) "
                         "is not used by the official semantic-segmentation models and has no sgr_d2 name here")
    return key


def official_to_sgr(state: Mapping[str, T], model_keys=None
                    ) -> Tuple[Dict[str, T], Dict[str, T], Optional[Recognised], int]:
    """Rename an official state dict to sgr_d2's names.

    Returns ``(renamed, set_aside, recognised, n_renamed)``: the tensors under sgr_d2 names (the
    same objects, in the file's order), the official-only tensors (:data:`OFFICIAL_ONLY`),
    what was recognised (None: not an official layout; ``renamed`` is then ``state``) and how
    many names changed. ``model_keys`` (the names of the model it is for): the pixel decoder's
    levels are counted in the model rather than in the file, so a file that lacks a level
    still maps the others to the right place.
    """
    recognised = recognise(state.keys())
    if recognised is None:
        return dict(state), {}, None, 0
    n_adapters = _index_count(state.keys(), _ADAPTER, 1)
    n_layers = _index_count(state.keys(), _LAYER, 1)
    if model_keys is not None:  # a model without these lists (another head) keeps the file's count
        model_keys = list(model_keys)
        n_adapters = _index_count(model_keys, _OURS_LATERAL_ANY, 0) or n_adapters
        n_layers = _index_count(model_keys, _OURS_OUTPUT_ANY, 0) or n_layers
    renamed, aside, n = {}, {}, 0
    for key, value in state.items():
        if is_official_only(key):
            aside[key] = value
            continue
        new = _to_sgr(key, n_adapters, n_layers)
        if new in renamed:
            raise ValueError(f"official tensors map twice to {new} (the second is {key})")
        n += new != key
        renamed[new] = value
    return renamed, aside, recognised, n


def _to_official(key: str, n_lateral: int, n_output: int) -> str:
    if m := _OURS_SWIN_BLOCKS.match(key):
        return f"backbone.layers.{int(m[1]) - 2}.blocks.{m[2]}"
    if m := _OURS_SWIN_DOWN.match(key):
        return f"backbone.layers.{int(m[1]) - 3}.downsample.{m[2]}"
    if m := _OURS_SWIN_NORM.match(key):
        return f"backbone.norm{int(m[1]) - 2}.{m[2]}"
    if m := _OURS_LATERAL.match(key):
        return f"{PD}adapter_{n_lateral - int(m[1])}.{m[2]}"
    if m := _OURS_OUTPUT.match(key):
        return f"{PD}layer_{n_output - int(m[1])}.{m[2]}"
    if key.startswith(PD + "transformer.layers."):
        rest = key[len(PD + "transformer.layers."):]
        if re.match(r"^\d+\.(attn|ffn)\.", rest):
            raise ValueError(f"{key}: the official semantic models have no TransformerEncoderPixelDecoder; "
                             "this pixel decoder has no official layout here")
        return PD + "transformer.encoder.layers." + rest
    for official, ours in _M2F_LISTS:
        if key.startswith(PRED + ours):
            return PRED + official + key[len(PRED + ours):]
    if m := _OURS_DETR_LAYER.match(key):
        if m[2] not in _DETR_DECODER_BACK:
            raise ValueError(f"{key}: unknown MaskFormer decoder sub-module {m[2]!r}")
        return f"{PRED}transformer.decoder.layers.{m[1]}.{_DETR_DECODER_BACK[m[2]]}.{m[3]}"
    if key.startswith(PRED + "transformer.decoder_norm."):
        return PRED + "transformer.decoder.norm." + key[len(PRED + "transformer.decoder_norm."):]
    if key.startswith(PRED + "transformer.encoder."):
        raise ValueError(f"{key}: MaskFormer's DETR encoder (MODEL.MASK_FORMER.ENC_LAYERS > 0) is not used "
                         "by the official semantic models; it has no official layout here")
    return key


def official_name(key: str, keys) -> str:
    """The official name of the sgr_d2 tensor ``key``; ``keys``: all the model's names (the pixel
    decoder's numbering depends on how many levels it has)."""
    return _to_official(key, _index_count(keys, _OURS_LATERAL, 0), _index_count(keys, _OURS_OUTPUT, 0))


def sgr_to_official(state: Mapping[str, T], *, no_object_weight: float = 0.1,
                    set_aside: Optional[Mapping[str, T]] = None) -> Dict[str, "object"]:
    """Rename an sgr_d2 MaskFormer / Mask2Former state dict (without SGR) to the official names.

    The official-only tensors come from ``set_aside`` (what :func:`official_to_sgr` set aside)
    when given, else they are recomputed: ``criterion.empty_weight`` (ones, the last entry
    ``no_object_weight``; 0.1 in every official config) and Swin's ``relative_position_index``.
    BatchNorm's ``num_batches_tracked`` counters are dropped (the official ResNets use FrozenBN).
    """
    import torch

    bad = [k for k in state if k.startswith(("backbone.sgr.", "backbone.glore.", "backbone.backbone."))]
    if bad:
        raise ValueError(f"the checkpoint has an SGR / GloRe component ({bad[0]}, ...): the official "
                         "MaskFormer / Mask2Former code has none, so it has no official layout")
    if PRED + "class_embed.weight" not in state:
        raise ValueError(f"the checkpoint has no {PRED}class_embed.weight: not a MaskFormer / Mask2Former model")
    n_lateral = _index_count(state.keys(), _OURS_LATERAL, 0)
    n_output = _index_count(state.keys(), _OURS_OUTPUT, 0)
    out: Dict[str, object] = {}
    for key, value in state.items():
        if key.endswith(".num_batches_tracked") or key in ("pixel_mean", "pixel_std"):
            continue
        new = _to_official(key, n_lateral, n_output)
        if new in out:
            raise ValueError(f"sgr_d2 tensors map twice to the official name {new} (the second is {key})")
        out[new] = value
    if set_aside:
        out.update(set_aside)
        return out
    cls = state.get(PRED + "class_embed.weight")
    if cls is not None and "criterion.empty_weight" not in out:
        weight = torch.ones(cls.shape[0], dtype=torch.float32)
        weight[-1] = no_object_weight
        out["criterion.empty_weight"] = weight if isinstance(cls, torch.Tensor) else weight.numpy()
    for key in [k for k in out if k.endswith(".attn.relative_position_bias_table")]:
        index_key = key[: -len("relative_position_bias_table")] + "relative_position_index"
        if index_key not in out:
            out[index_key] = _relative_position_index(out[key], key)
    return out


def _relative_position_index(table, key: str):
    """Swin's index into a (2w-1)^2-row bias table for a w x w window (timm's formula, the same as
    the official code's)."""
    import math

    import numpy as np
    import torch
    from timm.models.swin_transformer import get_relative_position_index

    rows = table.shape[0]
    w = (math.isqrt(rows) + 1) // 2
    if (2 * w - 1) ** 2 != rows:
        raise ValueError(f"{key} has {rows} rows; expected (2w-1)^2 for a w x w window")
    index = get_relative_position_index(w, w)
    return index if isinstance(table, torch.Tensor) else np.asarray(index.numpy())
