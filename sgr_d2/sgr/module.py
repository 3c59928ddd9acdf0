"""The SGR component (docs/method.md#the-sgr-component): concept regions, tokens, global reasoning, re-projection."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .precision import autocast_off

__all__ = ["SGRModule"]


class SGRModule(nn.Module):
    """Semantically-aware Global Reasoning over a feature map.

    ``forward(x)`` with ``x`` of shape (B, D, H, W) returns ``(y, outputs)`` where
    ``y = x + fuse(x̃)`` has the shape of ``x`` and ``outputs`` holds:

    * ``region_logits`` A (B, K, H, W): the 1×1-conv logits of the concept regions;
    * ``region_maps`` P (B, K, H, W): ``softmax(A)`` over the K tokens at each pixel;
    * ``tokens`` T̃ (B, K, C): the tokens after the transformer encoder;
    * ``token_logits`` (B, K, num_classes) when ``num_classes`` is given (the class term).

    Args:
        in_channels: D, channels of the input feature map.
        num_tokens: K.
        token_dim: C, the token width.
        num_layers, num_heads, ffn_dim, dropout: the pre-norm transformer encoder.
        num_classes: classes of the class term (None: no classifier).
        norm_layer: a callable ``norm_layer(channels) -> nn.Module`` for the 2-d norms
            (default ``nn.BatchNorm2d``; detectron2 users pass ``get_norm``-based factories).
        eps: ε in the token average.
    """

    def __init__(
        self,
        in_channels: int,
        num_tokens: int = 128,
        token_dim: int = 256,
        num_layers: int = 2,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        num_classes: Optional[int] = None,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
        eps: float = 1e-6,
    ):
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"SGRModule: num_tokens must be >= 1, got {num_tokens}")
        if token_dim % num_heads != 0:
            raise ValueError(
                f"SGRModule: token_dim ({token_dim}) must be divisible by num_heads ({num_heads})"
            )
        norm_layer = norm_layer or nn.BatchNorm2d
        self.in_channels = in_channels
        self.num_tokens = num_tokens
        self.token_dim = token_dim
        self.eps = eps

        self.region_conv = nn.Conv2d(in_channels, num_tokens, kernel_size=1)
        self.value_conv = nn.Sequential(
            nn.Conv2d(in_channels, token_dim, kernel_size=1, bias=False),
            norm_layer(token_dim),
            nn.ReLU(inplace=True),
        )
        layer = nn.TransformerEncoderLayer(
            d_model=token_dim,
            nhead=num_heads,
            dim_feedforward=ffn_dim,
            dropout=dropout,
            activation="relu",
            batch_first=True,
            norm_first=True,
        )
        # enable_nested_tensor only matters for padding masks, which tokens never have.
        self.encoder = nn.TransformerEncoder(
            layer, num_layers=num_layers, enable_nested_tensor=False
        ) if num_layers > 0 else nn.Identity()
        self.encoder_norm = nn.LayerNorm(token_dim) if num_layers > 0 else nn.Identity()
        self.out_conv = nn.Conv2d(token_dim, in_channels, kernel_size=1, bias=False)
        self.out_norm = norm_layer(in_channels)
        self.classifier = nn.Linear(token_dim, num_classes) if num_classes else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in (self.region_conv, self.value_conv[0], self.out_conv):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.region_conv.bias)
        # Zero-initialised last norm: the component starts as the identity map (docs/method.md#the-sgr-component).
        if getattr(self.out_norm, "weight", None) is not None:
            nn.init.zeros_(self.out_norm.weight)
        else:
            nn.init.zeros_(self.out_conv.weight)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"SGRModule expects a (B, {self.in_channels}, H, W) feature map, got {tuple(x.shape)}"
            )
        logits = self.region_conv(x)  # (B, K, H, W)
        values = self.value_conv(x)  # (B, C, H, W)
        b, k = logits.shape[:2]
        # The region softmax and the token average in float32 whatever the autocast state (AMP):
        # the region maps feed the losses, whose log(1 - P) a bfloat16 P (1 - 1e-6 rounds to 1)
        # would make infinite. Without autocast this changes nothing.
        with autocast_off(x.device):
            regions = logits.float().softmax(dim=1)
            p = regions.flatten(2)  # (B, K, HW)
            v = values.float().flatten(2).transpose(1, 2)  # (B, HW, C)
            tokens = torch.bmm(p, v) / (p.sum(dim=2, keepdim=True) + self.eps)  # (B, K, C)
        tokens = self.encoder_norm(self.encoder(tokens))
        reproj = torch.bmm(tokens.transpose(1, 2), p)  # (B, C, HW)
        reproj = reproj.view(b, self.token_dim, *x.shape[2:])
        y = x + self.out_norm(self.out_conv(reproj))
        outputs = {"region_logits": logits, "region_maps": regions, "tokens": tokens}
        if self.classifier is not None:
            outputs["token_logits"] = self.classifier(tokens)
        return y, outputs
