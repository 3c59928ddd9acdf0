"""Pixel decoders: turn backbone features into per-pixel embeddings (the "mask features") and the
features the transformer decoder attends to.

Every pixel decoder has ``forward_features(features) -> (mask_features, transformer_encoder_features,
multi_scale_features)``:

* ``mask_features`` (B, MASK_DIM, H/4, W/4), dotted with the mask embeddings of the queries;
* ``transformer_encoder_features``: the output of a transformer encoder over the coarsest map
  (``TransformerEncoderPixelDecoder``; the coarsest deformable-encoder level for
  ``MSDeformAttnPixelDecoder``; None for ``BasePixelDecoder``);
* ``multi_scale_features``: three maps, coarsest first, for Mask2Former's round-robin decoder.

Registered in ``PIXEL_DECODER_REGISTRY`` and chosen by ``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``.
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
from detectron2.utils.registry import Registry

from .ms_deform_attn import MSDeformAttn
from .transformer import DetrEncoder, PositionEmbeddingSine

__all__ = [
    "PIXEL_DECODER_REGISTRY",
    "build_pixel_decoder",
    "BasePixelDecoder",
    "TransformerEncoderPixelDecoder",
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnEncoder",
]

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = "Pixel decoders of MaskFormer / Mask2Former (MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME)."


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]):
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    if name not in PIXEL_DECODER_REGISTRY:
        raise KeyError(f"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME is {name!r}; registered pixel decoders: "
                       f"{sorted(k for k, _ in PIXEL_DECODER_REGISTRY)}")
    decoder = PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(decoder, "forward_features", None)):
        raise TypeError(f"pixel decoder {name} has no forward_features method")
    return decoder


def _head_input_shape(cfg, input_shape: Dict[str, ShapeSpec]) -> Dict[str, ShapeSpec]:
    wanted = list(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES)
    missing = [f for f in wanted if f not in input_shape]
    if missing:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.IN_FEATURES is {wanted}, but the backbone does not output "
                         f"{missing}; its outputs are {sorted(input_shape)} (set MODEL.RESNETS.OUT_FEATURES "
                         "or the backbone's OUT_FEATURES to include them)")
    return {k: input_shape[k] for k in wanted}


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
        self.transformer = nn.Module()  # the official TransformerEncoderOnly: its encoder
        self.transformer.encoder = DetrEncoder(conv_dim, transformer_nheads, transformer_enc_layers,
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
        b, c, h, w = x.shape
        pos = self.pe_layer(x).flatten(2).permute(2, 0, 1)
        enc = self.transformer.encoder(x.flatten(2).permute(2, 0, 1), pos=pos).permute(1, 2, 0).view(b, c, h, w)
        y, multi_scale = self._top_down(features, y=enc)
        return self.mask_features(y), enc, multi_scale


PIXEL_DECODER_REGISTRY.register(BasePixelDecoder)
PIXEL_DECODER_REGISTRY.register(TransformerEncoderPixelDecoder)


# ------------------------------------------------------------------ Mask2Former's pixel decoder
class MSDeformAttnEncoderLayer(nn.Module):
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


class MSDeformAttnEncoder(nn.Module):
    """Encoder over several flattened levels; each pixel is a query whose reference point is its
    own centre, repeated on every level (the normalised coordinates are shared)."""

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, dim_feedforward=1024, dropout=0.0,
                 num_feature_levels=3, enc_n_points=4):
        super().__init__()
        self.d_model = d_model
        self.encoder = nn.Module()  # the official MSDeformAttnTransformerEncoder: its layers
        self.encoder.layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points)
            for _ in range(num_encoder_layers)
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        nn.init.normal_(self.level_embed)
        for layer in self.encoder.layers:
            for lin in (layer.linear1, layer.linear2):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)

    @staticmethod
    def reference_points(spatial_shapes: List[tuple], n_levels: int, device) -> torch.Tensor:
        refs = []
        for h, w in spatial_shapes:
            ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
            xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            refs.append(torch.stack([ref_x.reshape(-1), ref_y.reshape(-1)], -1))
        ref = torch.cat(refs, 0)  # (S, 2)
        return ref[None, :, None, :].expand(1, -1, n_levels, -1)  # (1, S, L, 2)

    def forward(self, srcs: List[torch.Tensor], pos_embeds: List[torch.Tensor]):
        shapes = [tuple(x.shape[-2:]) for x in srcs]
        src = torch.cat([x.flatten(2).transpose(1, 2) for x in srcs], 1)  # (B, S, C)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i][None, None]
                         for i, p in enumerate(pos_embeds)], 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src.device)
        ref = self.reference_points(shapes, len(srcs), src.device).expand(src.shape[0], -1, -1, -1)
        for layer in self.encoder.layers:
            src = layer(src, pos, ref, spatial_shapes, level_shapes=shapes)
        return src, shapes


@PIXEL_DECODER_REGISTRY.register()
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
        self.transformer = MSDeformAttnEncoder(conv_dim, transformer_nheads, transformer_enc_layers,
                                               transformer_dim_feedforward, transformer_dropout,
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
