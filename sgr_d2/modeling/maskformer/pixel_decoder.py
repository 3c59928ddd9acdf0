"""Pixel decoders: turn backbone features into per-pixel embeddings (the "mask features") and the
features the transformer decoder attends to.

Every pixel decoder has ``forward_features(features) -> (mask_features, transformer_encoder_features,
multi_scale_features)``:

* ``mask_features`` (B, MASK_DIM, H/4, W/4), dotted with the mask embeddings of the queries;
* ``transformer_encoder_features``: the output of a transformer encoder over the coarsest map
  (``TransformerEncoderPixelDecoder``; the coarsest deformable-encoder level for
  ``MSDeformAttnPixelDecoder``; None for ``BasePixelDecoder``);
* ``multi_scale_features``: three maps, coarsest first, for Mask2Former's round-robin decoder.

As in the official code, the pixel decoders are registered in detectron2's
``SEM_SEG_HEADS_REGISTRY`` and chosen by ``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``; the classes
and their attributes carry the official names (``TransformerEncoderOnly``,
``MSDeformAttnTransformerEncoderOnly`` / ``MSDeformAttnTransformerEncoder`` /
``MSDeformAttnTransformerEncoderLayer``), so official files load without renaming.
"""
from __future__ import annotations

import math
from typing import Dict, List

import fvcore.nn.weight_init as weight_init
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ...sgr.precision import autocast_off
from .ms_deform_attn import MSDeformAttn
from .transformer import PositionEmbeddingSine, TransformerEncoder, TransformerEncoderLayer

__all__ = [
    "build_pixel_decoder",
    "BasePixelDecoder",
    "TransformerEncoderOnly",
    "TransformerEncoderPixelDecoder",
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnTransformerEncoderOnly",
    "MSDeformAttnTransformerEncoder",
    "MSDeformAttnTransformerEncoderLayer",
]

PIXEL_DECODERS = ("BasePixelDecoder", "TransformerEncoderPixelDecoder", "MSDeformAttnPixelDecoder")


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]):
    """The pixel decoder ``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME`` (a SEM_SEG_HEADS_REGISTRY entry
    with a ``forward_features`` method)."""
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    if name not in SEM_SEG_HEADS_REGISTRY:
        raise KeyError(f"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME is {name!r}, which is not registered in "
                       f"SEM_SEG_HEADS_REGISTRY; sgr_d2's pixel decoders: {list(PIXEL_DECODERS)}")
    decoder = SEM_SEG_HEADS_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(decoder, "forward_features", None)):
        raise TypeError(f"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME is {name!r}, a head without a forward_features "
                        f"method, which a pixel decoder needs; sgr_d2's pixel decoders: {list(PIXEL_DECODERS)}")
    return decoder


def _head_input_shape(cfg, input_shape: Dict[str, ShapeSpec]) -> Dict[str, ShapeSpec]:
    wanted = list(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES)
    missing = [f for f in wanted if f not in input_shape]
    if missing:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.IN_FEATURES is {wanted}, but the backbone does not output "
                         f"{missing}; its outputs are {sorted(input_shape)} (set MODEL.RESNETS.OUT_FEATURES "
                         "or the backbone's OUT_FEATURES to include them)")
    return {k: input_shape[k] for k in wanted}


@SEM_SEG_HEADS_REGISTRY.register()
class BasePixelDecoder(nn.Module):
    """A feature pyramid (FPN, top-down with nearest upsampling) over the input features;
    the finest level gives the mask features through a 3×3 conv (MaskFormer)."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, conv_dim: int, mask_dim: int, norm: str = "GN"):
        super().__init__()
        items = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        if not items:
            raise ValueError("BasePixelDecoder: no input features (MODEL.SEM_SEG_HEAD.IN_FEATURES is empty)")
        self.in_features = [k for k, _ in items]
        use_bias = norm == ""
        # The official names: adapter_k (the lateral 1x1 conv) and layer_k (the 3x3 output conv)
        # of the k-th finest level; the coarsest level has an output conv but no lateral one. The
        # lists hold them coarsest first, the order of the top-down pass (they are not modules).
        self.lateral_convs, self.output_convs = [], []
        for idx, (_, shape) in enumerate(items[::-1]):
            k = len(items) - idx
            in_ch = shape.channels if idx == 0 else conv_dim
            output = Conv2d(in_ch, conv_dim, 3, padding=1, bias=use_bias, norm=get_norm(norm, conv_dim),
                            activation=F.relu)
            weight_init.c2_xavier_fill(output)
            self.add_module(f"layer_{k}", output)
            self.output_convs.append(output)
            if idx > 0:
                lateral = Conv2d(shape.channels, conv_dim, 1, bias=use_bias, norm=get_norm(norm, conv_dim))
                weight_init.c2_xavier_fill(lateral)
                self.add_module(f"adapter_{k}", lateral)
                self.lateral_convs.append(lateral)
        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, 3, padding=1)
        weight_init.c2_xavier_fill(self.mask_features)
        self.maskformer_num_feature_levels = 3

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        sh = cfg.MODEL.SEM_SEG_HEAD
        return dict(input_shape=_head_input_shape(cfg, input_shape), conv_dim=sh.CONVS_DIM,
                    mask_dim=sh.MASK_DIM, norm=sh.NORM)

    def _top_down(self, features, y=None):
        multi_scale = []
        for idx, name in enumerate(self.in_features[::-1]):
            x = features[name]
            if idx == 0:
                y = self.output_convs[0](x if y is None else y)
            else:
                cur = self.lateral_convs[idx - 1](x)
                y = self.output_convs[idx](cur + F.interpolate(y, size=cur.shape[-2:], mode="nearest"))
            if len(multi_scale) < self.maskformer_num_feature_levels:
                multi_scale.append(y)
        return y, multi_scale

    def forward_features(self, features):
        y, multi_scale = self._top_down(features)
        return self.mask_features(y), None, multi_scale

    def forward(self, features, targets=None):
        return self.forward_features(features)


class TransformerEncoderOnly(nn.Module):
    """The encoder half of DETR's transformer (``encoder``): ``forward(src (B, C, H, W), mask,
    pos_embed (B, C, H, W))`` returns the encoded map (B, C, H, W)."""

    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, dim_feedforward=2048, dropout=0.1,
                 activation="relu", normalize_before=False):
        super().__init__()
        layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        norm = nn.LayerNorm(d_model) if normalize_before and num_encoder_layers > 0 else None
        self.encoder = TransformerEncoder(layer, num_encoder_layers, norm)
        self.d_model = d_model
        self.nhead = nhead

    def forward(self, src, mask, pos_embed):
        b, c, h, w = src.shape
        key_padding = mask.flatten(1) if mask is not None else None
        memory = self.encoder(src.flatten(2).permute(2, 0, 1), src_key_padding_mask=key_padding,
                              pos=pos_embed.flatten(2).permute(2, 0, 1))
        return memory.permute(1, 2, 0).view(b, c, h, w)


@SEM_SEG_HEADS_REGISTRY.register()
class TransformerEncoderPixelDecoder(BasePixelDecoder):
    """BasePixelDecoder whose coarsest level first goes through a DETR transformer encoder
    (``MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS`` layers) whose output is also returned as
    ``transformer_encoder_features`` (MaskFormer's TRANSFORMER_IN_FEATURE "transformer_encoder")."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, transformer_dropout: float, transformer_nheads: int,
                 transformer_dim_feedforward: int, transformer_enc_layers: int, transformer_pre_norm: bool,
                 conv_dim: int, mask_dim: int, norm: str = "GN"):
        super().__init__(input_shape, conv_dim=conv_dim, mask_dim=mask_dim, norm=norm)
        coarsest = sorted(input_shape.items(), key=lambda kv: kv[1].stride)[-1][1]
        self.input_proj = Conv2d(coarsest.channels, conv_dim, 1)
        weight_init.c2_xavier_fill(self.input_proj)
        self.transformer = TransformerEncoderOnly(conv_dim, transformer_nheads, transformer_enc_layers,
                                                  transformer_dim_feedforward, transformer_dropout,
                                                  normalize_before=transformer_pre_norm)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        # the coarsest level's output conv now reads the encoder output (conv_dim channels)
        use_bias = norm == ""
        out = Conv2d(conv_dim, conv_dim, 3, padding=1, bias=use_bias, norm=get_norm(norm, conv_dim),
                     activation=F.relu)
        weight_init.c2_xavier_fill(out)
        self.add_module(f"layer_{len(self.in_features)}", out)
        self.output_convs[0] = out

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        mf = cfg.MODEL.MASK_FORMER
        ret.update(transformer_dropout=mf.DROPOUT, transformer_nheads=mf.NHEADS,
                   transformer_dim_feedforward=mf.DIM_FEEDFORWARD,
                   transformer_enc_layers=cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS,
                   transformer_pre_norm=mf.PRE_NORM)
        return ret

    def forward_features(self, features):
        x = self.input_proj(features[self.in_features[-1]])
        enc = self.transformer(x, None, self.pe_layer(x))
        y, multi_scale = self._top_down(features, y=enc)
        return self.mask_features(y), enc, multi_scale


# ------------------------------------------------------------------ Mask2Former's pixel decoder
class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over all levels + feed-forward, post-norm."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.0, n_levels=3, n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, padding_mask=None, level_shapes=None):
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, reference_points, src, spatial_shapes,
                                                            padding_mask, level_shapes)))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnTransformerEncoder(nn.Module):
    """A stack of deformable encoder layers (``layers``) over several flattened levels; each
    pixel is a query whose reference point is its own centre, repeated on every level."""

    def __init__(self, layers: List[nn.Module]):
        # The official one takes a layer and clones it, then re-initialises; sgr_d2 takes layers
        # initialised one by one, so that its random start (and the toy numbers measured from it)
        # stays what it was. A published file replaces the start either way.
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(self.layers)

    @staticmethod
    def get_reference_points(spatial_shapes: List[tuple], n_levels: int, device) -> torch.Tensor:
        """(1, S, n_levels, 2): the normalised centre (x, y) of every pixel of every level, the
        same on every level. (The official code scales them by the valid ratios of the levels'
        padding masks; its masks are all False, so the ratios are 1 and sgr_d2 has no masks.)"""
        refs = []
        for h, w in spatial_shapes:
            ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
            xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            refs.append(torch.stack([ref_x.reshape(-1), ref_y.reshape(-1)], -1))
        ref = torch.cat(refs, 0)  # (S, 2)
        return ref[None, :, None, :].expand(1, -1, n_levels, -1)

    def forward(self, src, spatial_shapes, level_shapes: List[tuple], pos):
        ref = self.get_reference_points(level_shapes, len(level_shapes), src.device).expand(src.shape[0], -1, -1, -1)
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes, level_shapes=level_shapes)
        return src


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """The multi-scale deformable encoder of Deformable DETR (``encoder``) with a learned
    embedding per level (``level_embed``). ``forward(srcs, pos_embeds)`` (lists of (B, C, h, w),
    coarsest first) returns the encoded levels flattened into one (B, S, C) and their (h, w)."""

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, dim_feedforward=1024, dropout=0.0,
                 num_feature_levels=3, enc_n_points=4):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.encoder = MSDeformAttnTransformerEncoder([
            MSDeformAttnTransformerEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead,
                                                enc_n_points)
            for _ in range(num_encoder_layers)])
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        nn.init.normal_(self.level_embed)
        for layer in self.encoder.layers:
            for lin in (layer.linear1, layer.linear2):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, srcs: List[torch.Tensor], pos_embeds: List[torch.Tensor]):
        shapes = [tuple(x.shape[-2:]) for x in srcs]
        src = torch.cat([x.flatten(2).transpose(1, 2) for x in srcs], 1)  # (B, S, C)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i][None, None]
                         for i, p in enumerate(pos_embeds)], 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src.device)
        return self.encoder(src, spatial_shapes, shapes, pos), shapes


@SEM_SEG_HEADS_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder: a multi-scale deformable-attention encoder over the features
    in ``DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES`` (each projected to CONVS_DIM with
    GroupNorm, plus sine positions and a learned level embedding), then an FPN step down to
    ``COMMON_STRIDE`` for the finer input features, then a 1×1 conv to MASK_DIM."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, transformer_in_features: List[str],
                 transformer_dropout: float, transformer_nheads: int, transformer_dim_feedforward: int,
                 transformer_enc_layers: int, transformer_n_points: int, conv_dim: int, mask_dim: int,
                 norm: str = "GN", common_stride: int = 4):
        super().__init__()
        items = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in items]
        missing = [f for f in transformer_in_features if f not in input_shape]
        if missing:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES is "
                             f"{list(transformer_in_features)}, but {missing} are not among "
                             f"MODEL.SEM_SEG_HEAD.IN_FEATURES {self.in_features}")
        t_items = sorted(((k, input_shape[k]) for k in transformer_in_features), key=lambda kv: kv[1].stride)
        # coarsest first
        self.transformer_in_features = [k for k, _ in t_items][::-1]
        t_channels = [s.channels for _, s in t_items][::-1]
        self.transformer_num_feature_levels = len(self.transformer_in_features)
        self.input_proj = nn.ModuleList()
        for ch in t_channels:
            proj = nn.Sequential(nn.Conv2d(ch, conv_dim, kernel_size=1), get_norm(norm, conv_dim) or nn.Identity())
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)
        self.transformer = MSDeformAttnTransformerEncoderOnly(
            conv_dim, transformer_nheads, transformer_enc_layers, transformer_dim_feedforward, transformer_dropout,
            self.transformer_num_feature_levels, transformer_n_points)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, 1)
        weight_init.c2_xavier_fill(self.mask_features)
        self.maskformer_num_feature_levels = 3
        self.common_stride = common_stride
        min_stride = min(s.stride for _, s in t_items)
        self.num_fpn_levels = max(int(round(math.log2(min_stride) - math.log2(common_stride))), 0)
        fine = [(k, s) for k, s in items if s.stride < min_stride][::-1][: self.num_fpn_levels]  # coarser first
        use_bias = norm == ""
        self.fpn_features = [k for k, _ in fine]
        # official names: adapter_k / layer_k of the k-th finest FPN level; the lists run coarser first
        self.lateral_convs, self.output_convs = [], []
        for idx, (_, shape) in enumerate(fine):
            k = len(fine) - idx
            lateral = Conv2d(shape.channels, conv_dim, 1, bias=use_bias, norm=get_norm(norm, conv_dim))
            output = Conv2d(conv_dim, conv_dim, 3, padding=1, bias=use_bias, norm=get_norm(norm, conv_dim),
                            activation=F.relu)
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            self.add_module(f"adapter_{k}", lateral)
            self.add_module(f"layer_{k}", output)
            self.lateral_convs.append(lateral)
            self.output_convs.append(output)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        sh = cfg.MODEL.SEM_SEG_HEAD
        return dict(
            input_shape=_head_input_shape(cfg, input_shape),
            transformer_in_features=list(sh.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            transformer_dropout=sh.DEFORMABLE_TRANSFORMER_ENCODER_DROPOUT,
            transformer_nheads=sh.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS,
            transformer_dim_feedforward=sh.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD,
            transformer_enc_layers=sh.TRANSFORMER_ENC_LAYERS,
            transformer_n_points=sh.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
            conv_dim=sh.CONVS_DIM,
            mask_dim=sh.MASK_DIM,
            norm=sh.NORM,
            common_stride=sh.COMMON_STRIDE,
        )

    def forward_features(self, features):
        """In float32 whatever autocast says, for any device (the official decorates this method
        with ``torch.cuda.amp.autocast(enabled=False)``: "deformable detr does not support half
        precision"); the input features are cast to float32."""
        with autocast_off(next(iter(features.values())).device):
            return self._forward_features(features)

    def _forward_features(self, features):
        srcs, pos = [], []
        for i, name in enumerate(self.transformer_in_features):
            x = self.input_proj[i](features[name].float())
            srcs.append(x)
            pos.append(self.pe_layer(x))
        y, shapes = self.transformer(srcs, pos)
        b = y.shape[0]
        out = []
        for chunk, (h, w) in zip(y.split([h * w for h, w in shapes], dim=1), shapes):
            out.append(chunk.transpose(1, 2).reshape(b, -1, h, w))
        for name, lateral, output in zip(self.fpn_features, self.lateral_convs, self.output_convs):
            cur = lateral(features[name].float())
            out.append(output(cur + F.interpolate(out[-1], size=cur.shape[-2:], mode="bilinear",
                                                  align_corners=False)))
        multi_scale = out[: self.maskformer_num_feature_levels]
        return self.mask_features(out[-1]), out[0], multi_scale

    def forward(self, features, targets=None):
        return self.forward_features(features)
