"""DeepLabV3 head: Atrous Spatial Pyramid Pooling on one feature map (Chen et al., 2017)."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from .fcn_head import PerPixelHead, classifier, conv_norm_relu

__all__ = ["ASPP", "DeepLabV3Head"]


class ASPP(nn.Module):
    """A 1×1 branch, one 3×3 branch per atrous rate and an image-pooling branch, each
    ``out_channels`` wide with norm and ReLU; concatenated, then projected by a 1×1 conv.

    The image-pooling branch normalises a 1×1 map: with BatchNorm it needs more than one image
    per device in training (use SyncBN, or GN via ``norm``).
    """

    def __init__(self, in_channels: int, out_channels: int, dilations: Sequence[int], norm: str,
                 dropout: float = 0.0):
        super().__init__()
        if not dilations or any(int(d) < 1 for d in dilations):
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.ASPP_DILATIONS is {list(dilations)}; expected positive atrous rates"
            )
        self.branches = nn.ModuleList([conv_norm_relu(in_channels, out_channels, 1, norm)])
        self.branches.extend(conv_norm_relu(in_channels, out_channels, 3, norm, int(d)) for d in dilations)
        self.pool_conv = conv_norm_relu(in_channels, out_channels, 1, norm)
        self.project = conv_norm_relu(out_channels * (len(dilations) + 2), out_channels, 1, norm)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.pool_conv(F.adaptive_avg_pool2d(x, 1))
        outs.append(pooled.expand(-1, -1, *x.shape[-2:]))  # bilinear upsampling of a 1×1 map
        return self.dropout(self.project(torch.cat(outs, dim=1)))


@SEM_SEG_HEADS_REGISTRY.register()
class DeepLabV3Head(PerPixelHead):
    """ASPP on ``IN_FEATURE``, a 3×3 conv-norm-ReLU, dropout and a 1×1 classifier (the
    :class:`PerPixelHead` contract)."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, in_feature: str, num_classes: int,
                 conv_dims: int, dilations: Sequence[int], aspp_dropout: float, dropout: float,
                 norm: str, ignore_value: int = 255, loss_weight: float = 1.0):
        super().__init__(input_shape, "IN_FEATURE", in_feature, ignore_value, loss_weight)
        self.in_feature = in_feature
        self.aspp = ASPP(input_shape[in_feature].channels, conv_dims, dilations, norm, aspp_dropout)
        self.conv = conv_norm_relu(conv_dims, conv_dims, 3, norm)
        self.dropout, self.predictor = classifier(conv_dims, num_classes, dropout)

    @classmethod
    def from_config(cls, cfg, input_shape):
        h = cfg.MODEL.SEM_SEG_HEAD
        return dict(input_shape=input_shape, in_feature=h.IN_FEATURE, num_classes=h.NUM_CLASSES,
                    conv_dims=h.CONVS_DIM, dilations=list(h.ASPP_DILATIONS), aspp_dropout=h.ASPP_DROPOUT,
                    dropout=h.DROPOUT, norm=h.NORM, ignore_value=h.IGNORE_VALUE, loss_weight=h.LOSS_WEIGHT)

    def layers(self, features):
        return self.predictor(self.dropout(self.conv(self.aspp(features[self.in_feature]))))
