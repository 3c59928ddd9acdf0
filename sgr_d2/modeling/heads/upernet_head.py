"""UperNet head (Xiao et al., ECCV 2018): a pyramid pooling module on the last feature and an
FPN over all of them, fused at the finest resolution."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from .fcn_head import PerPixelHead, classifier, conv_norm_relu

__all__ = ["PyramidPooling", "UperNetHead"]


def _resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def adaptive_avg_pool2d(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)``; during ONNX export the same averages as two matrix
    products, ``P_h @ x @ P_wᵀ`` (the exporter needs the input's spatial size for adaptive pooling,
    and Swin's reshapes hide it; the matrices are built for the traced size)."""
    if not torch.onnx.is_in_onnx_export():
        return F.adaptive_avg_pool2d(x, size)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    return _pooling_matrix(h, size, x) @ x @ _pooling_matrix(w, size, x).T


def _pooling_matrix(n: int, s: int, like: torch.Tensor) -> torch.Tensor:
    """(s, n): row i averages the cells ``floor(i n / s) .. ceil((i + 1) n / s) - 1``, PyTorch's
    adaptive-pooling bins."""
    i = torch.arange(s).unsqueeze(1)
    j = torch.arange(n).unsqueeze(0)
    inside = (j >= i * n // s) & (j < ((i + 1) * n + s - 1) // s)
    m = inside.to(like.dtype)
    return (m / m.sum(1, keepdim=True)).to(like.device)


class PyramidPooling(nn.Module):
    """PSPNet's pooling module: the input and, for each scale s, an s×s average pooling followed
    by a 1×1 conv and bilinear upsampling, concatenated and fused by a 3×3 conv.

    The 1×1-pooled branch is normalised over a batch of 1×1 maps: with BatchNorm it needs more
    than one image per device in training (use SyncBN)."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int], norm: str):
        super().__init__()
        if not scales or any(int(s) < 1 for s in scales):
            raise ValueError(f"MODEL.SEM_SEG_HEAD.POOL_SCALES is {list(scales)}; expected positive sizes")
        self.scales = [int(s) for s in scales]
        self.convs = nn.ModuleList(conv_norm_relu(in_channels, channels, 1, norm) for _ in self.scales)
        self.bottleneck = conv_norm_relu(in_channels + len(self.scales) * channels, channels, 3, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        outs = [x] + [_resize(conv(adaptive_avg_pool2d(x, s)), size) for s, conv in zip(self.scales, self.convs)]
        return self.bottleneck(torch.cat(outs, dim=1))


@SEM_SEG_HEADS_REGISTRY.register()
class UperNetHead(PerPixelHead):
    """UperNet on ``MODEL.SEM_SEG_HEAD.IN_FEATURES`` (finest first, e.g. res2..res5).

    * pyramid pooling on the coarsest feature gives the top of the FPN;
    * every other feature: 1×1 lateral conv, plus the upsampled coarser level (top-down);
    * each level except the top: a 3×3 conv; all levels are upsampled to the finest one,
      concatenated, fused by a 3×3 conv, then dropout and a 1×1 classifier.

    Every conv is ``CONVS_DIM`` wide with ``NORM`` and ReLU. Same contract as
    :class:`PerPixelHead` (losses in training, logits at the input resolution in inference).
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, in_features: List[str], num_classes: int,
                 conv_dims: int, pool_scales: Sequence[int], dropout: float, norm: str,
                 ignore_value: int = 255, loss_weight: float = 1.0):
        super().__init__(input_shape, "IN_FEATURES", in_features, ignore_value, loss_weight)
        strides = [input_shape[f].stride for f in in_features]
        if strides != sorted(strides):
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES {list(in_features)} must go from fine to coarse; "
                f"their strides are {strides}"
            )
        self.in_features = list(in_features)
        channels = [input_shape[f].channels for f in in_features]
        self.ppm = PyramidPooling(channels[-1], conv_dims, pool_scales, norm)
        self.lateral_convs = nn.ModuleList(conv_norm_relu(c, conv_dims, 1, norm) for c in channels[:-1])
        self.fpn_convs = nn.ModuleList(conv_norm_relu(conv_dims, conv_dims, 3, norm) for _ in channels[:-1])
        self.fuse = conv_norm_relu(conv_dims * len(channels), conv_dims, 3, norm)
        self.dropout, self.predictor = classifier(conv_dims, num_classes, dropout)

    @classmethod
    def from_config(cls, cfg, input_shape):
        h = cfg.MODEL.SEM_SEG_HEAD
        return dict(input_shape=input_shape, in_features=list(h.IN_FEATURES), num_classes=h.NUM_CLASSES,
                    conv_dims=h.CONVS_DIM, pool_scales=list(h.POOL_SCALES), dropout=h.DROPOUT,
                    norm=h.NORM, ignore_value=h.IGNORE_VALUE, loss_weight=h.LOSS_WEIGHT)

    def layers(self, features):
        feats = [features[f] for f in self.in_features]
        levels = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1])] + [self.ppm(feats[-1])]
        for i in range(len(levels) - 1, 0, -1):  # top-down
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [_resize(x, size) for x in outs[1:]], dim=1))
        return self.predictor(self.dropout(fused))
