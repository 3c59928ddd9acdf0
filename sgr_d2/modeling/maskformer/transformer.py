"""Transformer building blocks: sine position encoding, DETR-style encoder/decoder, attention layers.

Sequences are laid out (length, batch, channels), the layout of ``nn.MultiheadAttention``
without ``batch_first``. Positional encodings are added to queries and keys, never to values.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "PositionEmbeddingSine",
    "MLP",
    "SelfAttentionLayer",
    "CrossAttentionLayer",
    "FFNLayer",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerDecoder",
    "Transformer",
]


def _activation(name: str):
    table = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if name not in table:
        raise ValueError(f"activation is {name!r}; expected one of {sorted(table)}")
    return table[name]


def _with_pos(x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return x if pos is None else x + pos


class PositionEmbeddingSine(nn.Module):
    """2-d sine/cosine position encoding (as in DETR): ``num_pos_feats`` channels encode y, as
    many encode x; with ``normalize`` the cumulative coordinates are scaled to (0, scale]."""

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000.0, normalize: bool = True,
                 scale: Optional[float] = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, ·, H, W) -> (B, 2 · num_pos_feats, H, W). ``mask`` (B, H, W): True at padding."""
        b, _, h, w = x.shape
        if mask is None:
            mask = torch.zeros((b, h, w), dtype=torch.bool, device=x.device)
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _xavier(module: nn.Module):
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


# ------------------------------------------------------------------ Mask2Former-style single layers
class SelfAttentionLayer(nn.Module):
    """Self-attention among queries with residual, dropout and (pre- or post-) LayerNorm."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier(self)

    def forward(self, tgt, attn_mask=None, key_padding_mask=None, query_pos=None):
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = _with_pos(x, query_pos)
        out = self.self_attn(q, k, value=x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                             need_weights=False)[0]
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Queries attend to a memory; ``memory_mask`` (B·nhead, Q, S) bool: True = may not attend."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier(self)

    def forward(self, tgt, memory, memory_mask=None, memory_key_padding_mask=None, pos=None, query_pos=None):
        x = self.norm(tgt) if self.normalize_before else tgt
        out = self.multihead_attn(query=_with_pos(x, query_pos), key=_with_pos(memory, pos), value=memory,
                                  attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask,
                                  need_weights=False)[0]
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    """Two-layer feed-forward block with residual and (pre- or post-) LayerNorm."""

    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before
        _xavier(self)

    def forward(self, tgt):
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(self.activation(self.linear1(x)))))
        return tgt if self.normalize_before else self.norm(tgt)


# ------------------------------------------------------------------ DETR transformer (MaskFormer)
# The classes and their attributes carry MaskFormer's (and DETR's) names, so official checkpoints
# load as they are. One difference is kept on purpose: the cloned layers of an encoder / decoder
# start equal (each layer is initialised before it is copied), where the official re-initialises
# every matrix after cloning. Only the random start differs (a published file replaces it), and
# the MaskFormer numbers of docs/benchmarks.md were measured from this start.
class TransformerEncoderLayer(nn.Module):
    """Self-attention and feed-forward, each with residual, dropout and (pre- or post-) LayerNorm."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        _xavier(self.self_attn)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        _xavier(self.linear1), _xavier(self.linear2)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def forward(self, src, src_key_padding_mask=None, pos=None):
        x = self.norm1(src) if self.normalize_before else src
        q = k = _with_pos(x, pos)
        src = src + self.dropout1(self.self_attn(q, k, value=x, key_padding_mask=src_key_padding_mask,
                                                 need_weights=False)[0])
        if not self.normalize_before:
            src = self.norm1(src)
        x = self.norm2(src) if self.normalize_before else src
        src = src + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))
        return src if self.normalize_before else self.norm2(src)


class TransformerDecoderLayer(nn.Module):
    """Self-attention (``norm1``), cross-attention to the memory (``norm2``), feed-forward
    (``norm3``): DETR's order, each with residual, dropout and (pre- or post-) LayerNorm."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        _xavier(self.self_attn)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        _xavier(self.multihead_attn)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        _xavier(self.linear1), _xavier(self.linear2)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def forward(self, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None):
        pre = self.normalize_before
        x = self.norm1(tgt) if pre else tgt
        q = k = _with_pos(x, query_pos)
        tgt = tgt + self.dropout1(self.self_attn(q, k, value=x, need_weights=False)[0])
        tgt = tgt if pre else self.norm1(tgt)
        x = self.norm2(tgt) if pre else tgt
        tgt = tgt + self.dropout2(self.multihead_attn(query=_with_pos(x, query_pos), key=_with_pos(memory, pos),
                                                      value=memory, key_padding_mask=memory_key_padding_mask,
                                                      need_weights=False)[0])
        tgt = tgt if pre else self.norm2(tgt)
        x = self.norm3(tgt) if pre else tgt
        tgt = tgt + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))
        return tgt if pre else self.norm3(tgt)


def _clones(layer: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(layer) for _ in range(n))


class TransformerEncoder(nn.Module):
    """``num_layers`` copies of ``encoder_layer`` (``layers``) and an optional final LayerNorm
    (``norm``; the pre-norm configurations have one)."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src, src_key_padding_mask=None, pos=None):
        for layer in self.layers:
            src = layer(src, src_key_padding_mask=src_key_padding_mask, pos=pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """``num_layers`` copies of ``decoder_layer`` (``layers``) and the LayerNorm of their outputs
    (``norm``). ``forward`` returns (L, Q, B, C): the normalised output of every layer with
    ``return_intermediate``, else of the last one only (L = 1)."""

    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: nn.Module,
                 return_intermediate: bool = False):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(self, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None):
        hs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask=memory_key_padding_mask, pos=pos, query_pos=query_pos)
            if self.return_intermediate:
                hs.append(self.norm(tgt))
        if not self.return_intermediate:
            hs.append(self.norm(tgt))
        return torch.stack(hs)


class Transformer(nn.Module):
    """DETR's encoder-decoder over a flattened feature map (MaskFormer's transformer predictor).

    ``forward(src (B, C, H, W), mask (B, H, W) or None, query_embed (Q, C), pos (B, C, H, W))``
    returns ``(hs, memory)``: ``hs`` (num_dec_layers, B, Q, C) the normalised output of every
    decoder layer (only the last one with ``return_intermediate_dec=False``), ``memory``
    (B, C, H, W) the encoder output. Decoder queries start at zero, ``query_embed`` is their
    positional part.
    """

    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, dropout=0.1, activation="relu", normalize_before=False,
                 return_intermediate_dec=False):
        super().__init__()
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                normalize_before)
        encoder_norm = nn.LayerNorm(d_model) if normalize_before and num_encoder_layers > 0 else None
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, encoder_norm)
        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                normalize_before)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, nn.LayerNorm(d_model),
                                          return_intermediate=return_intermediate_dec)
        self.d_model = d_model
        self.nhead = nhead

    def forward(self, src, mask, query_embed, pos):
        b, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)  # (HW, B, C)
        pos = pos.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).repeat(1, b, 1)  # (Q, B, C)
        key_padding = mask.flatten(1) if mask is not None else None
        memory = self.encoder(src, src_key_padding_mask=key_padding, pos=pos)
        hs = self.decoder(torch.zeros_like(query_pos), memory, memory_key_padding_mask=key_padding, pos=pos,
                          query_pos=query_pos)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).view(b, c, h, w)  # (L, B, Q, C)
