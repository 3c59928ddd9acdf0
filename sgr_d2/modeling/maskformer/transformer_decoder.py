"""Transformer decoders that turn N learned queries into (class, mask) predictions.

* ``StandardTransformerDecoder`` (MaskFormer): a DETR transformer over one feature map
  (``MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE``), DEC_LAYERS decoder layers, a prediction from
  every layer.
* ``MultiScaleMaskedTransformerDecoder`` (Mask2Former): masked cross-attention, self-attention
  and FFN per layer; layer i attends to the pixel decoder's feature level ``i mod 3`` (coarsest
  first), only where the mask predicted by the previous layer is above 0.5.

Both return ``{"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, h, w), "aux_outputs": [...]}``,
mask logits at the resolution of the mask features. Registered in
``TRANSFORMER_DECODER_REGISTRY`` (``MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``).
"""
from __future__ import annotations

from typing import List, Optional

import fvcore.nn.weight_init as weight_init
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.utils.registry import Registry

from .transformer import (
    MLP,
    CrossAttentionLayer,
    FFNLayer,
    PositionEmbeddingSine,
    SelfAttentionLayer,
    Transformer,
)

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "build_transformer_decoder",
    "StandardTransformerDecoder",
    "MultiScaleMaskedTransformerDecoder",
    "attention_mask_from_predictions",
]

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = (
    "Transformer decoders of MaskFormer / Mask2Former (MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME)."
)


def build_transformer_decoder(cfg, in_channels: int, mask_classification: bool = True):
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    if name not in TRANSFORMER_DECODER_REGISTRY:
        raise KeyError(f"MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME is {name!r}; registered decoders: "
                       f"{sorted(k for k, _ in TRANSFORMER_DECODER_REGISTRY)}")
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)


def _common_from_config(cfg, in_channels, mask_classification):
    mf = cfg.MODEL.MASK_FORMER
    return dict(
        in_channels=in_channels,
        mask_classification=mask_classification,
        num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        hidden_dim=mf.HIDDEN_DIM,
        num_queries=mf.NUM_OBJECT_QUERIES,
        nheads=mf.NHEADS,
        dim_feedforward=mf.DIM_FEEDFORWARD,
        pre_norm=mf.PRE_NORM,
        mask_dim=cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
        enforce_input_project=mf.ENFORCE_INPUT_PROJ,
        deep_supervision=mf.DEEP_SUPERVISION,
    )


def _aux(classes: List[torch.Tensor], masks: List[torch.Tensor], mask_classification: bool):
    if mask_classification:
        return [{"pred_logits": c, "pred_masks": m} for c, m in zip(classes, masks)]
    return [{"pred_masks": m} for m in masks]


@TRANSFORMER_DECODER_REGISTRY.register()
class StandardTransformerDecoder(nn.Module):
    """MaskFormer's transformer predictor."""

    @configurable
    def __init__(self, in_channels: int, mask_classification: bool = True, *, num_classes: int, hidden_dim: int,
                 num_queries: int, nheads: int, dropout: float, dim_feedforward: int, enc_layers: int,
                 dec_layers: int, pre_norm: bool, deep_supervision: bool, mask_dim: int,
                 enforce_input_project: bool):
        super().__init__()
        self.mask_classification = mask_classification
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer = Transformer(hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout,
                                           normalize_before=pre_norm, return_intermediate_dec=deep_supervision)
        self.num_queries = num_queries
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        if in_channels != hidden_dim or enforce_input_project:
            self.input_proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
            weight_init.c2_xavier_fill(self.input_proj)
        else:
            self.input_proj = nn.Identity()
        self.aux_loss = deep_supervision
        if mask_classification:
            self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        ret = _common_from_config(cfg, in_channels, mask_classification)
        mf = cfg.MODEL.MASK_FORMER
        ret.update(dropout=mf.DROPOUT, enc_layers=mf.ENC_LAYERS, dec_layers=mf.DEC_LAYERS)
        return ret

    def forward(self, x: torch.Tensor, mask_features: torch.Tensor, mask: Optional[torch.Tensor] = None):
        if mask is not None:
            mask = F.interpolate(mask[None].float(), size=x.shape[-2:])[0].bool()
        pos = self.pe_layer(x, mask)
        hs, _ = self.transformer(self.input_proj(x), mask, self.query_embed.weight, pos)  # (L, B, Q, C)
        masks = torch.einsum("lbqc,bchw->lbqhw", self.mask_embed(hs), mask_features)
        classes = self.class_embed(hs) if self.mask_classification else [None] * len(hs)
        out = {"pred_masks": masks[-1]}
        if self.mask_classification:
            out["pred_logits"] = classes[-1]
        if self.aux_loss:
            out["aux_outputs"] = _aux(list(classes[:-1]), list(masks[:-1]), self.mask_classification)
        return out


def attention_mask_from_predictions(mask_logits: torch.Tensor, size, num_heads: int) -> torch.Tensor:
    """Mask2Former's attention mask from (B, Q, h, w) mask logits for a (H, W) memory.

    Returns a (B · num_heads, Q, H·W) bool mask, True where the query may *not* attend: where
    its predicted mask, bilinearly resized to (H, W), has ``sigmoid < 0.5``. A query whose mask
    is empty at that level may attend everywhere (otherwise its attention would be undefined).
    """
    m = F.interpolate(mask_logits, size=tuple(size), mode="bilinear", align_corners=False)
    blocked = (m.sigmoid().flatten(2) < 0.5)  # (B, Q, HW)
    blocked = blocked & ~blocked.all(-1, keepdim=True)
    return blocked.unsqueeze(1).expand(-1, num_heads, -1, -1).flatten(0, 1).detach()


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Mask2Former's masked-attention decoder (DEC_LAYERS − 1 layers, DEC_LAYERS predictions:
    one from the learned queries before the first layer, one after each layer)."""

    _version = 2  # the official decoder's: its files name the query features query_feat

    @configurable
    def __init__(self, in_channels: int, mask_classification: bool = True, *, num_classes: int, hidden_dim: int,
                 num_queries: int, nheads: int, dim_feedforward: int, dec_layers: int, pre_norm: bool,
                 mask_dim: int, enforce_input_project: bool, deep_supervision: bool = True,
                 num_feature_levels: int = 3):
        super().__init__()
        if not mask_classification:
            raise ValueError("MultiScaleMaskedTransformerDecoder supports only mask classification")
        self.mask_classification = mask_classification
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, 0.0, pre_norm) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, 0.0, pre_norm) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, 0.0, normalize_before=pre_norm) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learnable query features
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query positions
        self.num_feature_levels = num_feature_levels
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
                weight_init.c2_xavier_fill(proj)
            else:
                proj = nn.Identity()
            self.input_proj.append(proj)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.aux_loss = deep_supervision

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        ret = _common_from_config(cfg, in_channels, mask_classification)
        ret["dec_layers"] = cfg.MODEL.MASK_FORMER.DEC_LAYERS - 1  # the first prediction needs no layer
        return ret

    def forward_prediction_heads(self, output: torch.Tensor, mask_features: torch.Tensor, attn_mask_target_size):
        """(Q, B, C) queries -> class logits (B, Q, K+1), mask logits (B, Q, h, w), and the
        attention mask of the next layer, whose memory is ``attn_mask_target_size`` (h', w')."""
        decoded = self.decoder_norm(output).transpose(0, 1)
        classes = self.class_embed(decoded)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)
        return classes, masks, attention_mask_from_predictions(masks, attn_mask_target_size, self.num_heads)

    def forward(self, x: List[torch.Tensor], mask_features: torch.Tensor, mask: Optional[torch.Tensor] = None):
        if len(x) != self.num_feature_levels:
            raise ValueError(f"MultiScaleMaskedTransformerDecoder expects {self.num_feature_levels} feature "
                             f"levels from the pixel decoder, got {len(x)}")
        src, pos, sizes = [], [], []
        for i, feat in enumerate(x):
            sizes.append(feat.shape[-2:])
            pos.append(self.pe_layer(feat).flatten(2).permute(2, 0, 1))  # (HW, B, C)
            s = self.input_proj[i](feat).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(s.permute(2, 0, 1))
        b = x[0].shape[0]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, b, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, b, 1)
        classes, masks = [], []
        c, m, attn_mask = self.forward_prediction_heads(output, mask_features, sizes[0])
        classes.append(c)
        masks.append(m)
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            output = self.transformer_cross_attention_layers[i](output, src[level], memory_mask=attn_mask, pos=pos[level],
                                                    query_pos=query_embed)
            output = self.transformer_self_attention_layers[i](output, query_pos=query_embed)
            output = self.transformer_ffn_layers[i](output)
            c, m, attn_mask = self.forward_prediction_heads(output, mask_features,
                                                            sizes[(i + 1) % self.num_feature_levels])
            classes.append(c)
            masks.append(m)
        out = {"pred_logits": classes[-1], "pred_masks": masks[-1]}
        if self.aux_loss:
            out["aux_outputs"] = _aux(classes[:-1], masks[:-1], True)
        return out
