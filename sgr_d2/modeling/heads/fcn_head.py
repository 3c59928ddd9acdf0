"""Dilated-FCN head (FCN on a dilated backbone, as in DeepLabV3's FCN baseline)."""
from __future__ import annotations

from typing import Dict, Sequence, Union

import fvcore.nn.weight_init as weight_init
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ...sgr.precision import autocast_off

__all__ = ["DilatedFCNHead", "PerPixelHead", "per_pixel_loss", "classifier", "conv_norm_relu"]


def per_pixel_loss(logits, targets, ignore_value: int, loss_weight: float, scale: int):
    """Per-pixel cross-entropy of ``logits`` upsampled ×``scale`` to the target resolution, in
    float32 with autocast off (also under mixed precision; detectron2's ``SemSegFPNHead`` upcasts
    its logits the same way)."""
    with autocast_off(logits.device):
        return _per_pixel_loss(logits.float(), targets, ignore_value, loss_weight, scale)


def _per_pixel_loss(logits, targets, ignore_value: int, loss_weight: float, scale: int):
    if scale != 1:
        logits = F.interpolate(logits, scale_factor=scale, mode="bilinear", align_corners=False)
    if logits.shape[-2:] != targets.shape[-2:]:
        logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    # the mean over the labelled pixels, written as sum / count so that an all-ignore batch trains
    # with a zero loss (not NaN) without reading the count back to the host
    count = (targets != ignore_value).sum().clamp(min=1)
    loss = F.cross_entropy(logits, targets, reduction="sum", ignore_index=ignore_value) / count
    return {"loss_sem_seg": loss * loss_weight}


def classifier(channels: int, num_classes: int, dropout: float):
    """The per-pixel heads' last layers: ``(Dropout2d or Identity, 1×1 conv)``, the conv
    initialised N(0, 0.01) with a zero bias."""
    predictor = Conv2d(channels, num_classes, kernel_size=1)
    nn.init.normal_(predictor.weight, std=0.01)
    nn.init.zeros_(predictor.bias)
    return (nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()), predictor


def conv_norm_relu(in_ch: int, out_ch: int, k: int, norm: str, dilation: int = 1) -> Conv2d:
    """A k×k conv (same padding, optionally dilated) + ``norm`` + ReLU, MSRA-initialised."""
    conv = Conv2d(in_ch, out_ch, k, padding=dilation * (k // 2), dilation=dilation, bias=not norm,
                  norm=get_norm(norm, out_ch), activation=F.relu)
    weight_init.c2_msra_fill(conv)
    return conv


class PerPixelHead(nn.Module):
    """What the per-pixel heads share, with detectron2's ``SemSegFPNHead`` contract: a subclass
    defines ``layers(features)`` (logits at ``self.stride``); ``forward(features, targets)``
    returns ``(None, losses)`` in training and ``(logits at the input resolution, {})`` in
    inference. ``in_features`` (``key``'s value, one name or a list) must all be produced by the
    backbone; the stride is that of the first one.
    """

    def __init__(self, input_shape: Dict[str, ShapeSpec], key: str, in_features: Union[str, Sequence[str]],
                 ignore_value: int, loss_weight: float):
        super().__init__()
        names = [in_features] if isinstance(in_features, str) else list(in_features)
        if not names or any(f not in input_shape for f in names):
            shown = in_features if isinstance(in_features, str) else names
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.{key} is {shown!r}; the backbone produces {sorted(input_shape)}"
            )
        self.stride = input_shape[names[0]].stride
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight

    def layers(self, features):
        raise NotImplementedError

    def forward(self, features, targets=None):
        x = self.layers(features)
        if self.training:
            return None, per_pixel_loss(x, targets, self.ignore_value, self.loss_weight, self.stride)
        x = F.interpolate(x, scale_factor=self.stride, mode="bilinear", align_corners=False)
        return x, {}


@SEM_SEG_HEADS_REGISTRY.register()
class DilatedFCNHead(PerPixelHead):
    """``NUM_CONVS`` 3×3 conv-norm-ReLU on one feature map, dropout, a 1×1 classifier
    (the :class:`PerPixelHead` contract)."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, in_feature: str, num_classes: int,
                 conv_dims: int, num_convs: int, dropout: float, norm: str, ignore_value: int = 255,
                 loss_weight: float = 1.0):
        super().__init__(input_shape, "IN_FEATURE", in_feature, ignore_value, loss_weight)
        self.in_feature = in_feature
        channels = input_shape[in_feature].channels
        convs = []
        for _ in range(num_convs):
            convs.append(conv_norm_relu(channels, conv_dims, 3, norm))
            channels = conv_dims
        self.convs = nn.Sequential(*convs)
        self.dropout, self.predictor = classifier(channels, num_classes, dropout)

    @classmethod
    def from_config(cls, cfg, input_shape):
        h = cfg.MODEL.SEM_SEG_HEAD
        return dict(input_shape=input_shape, in_feature=h.IN_FEATURE, num_classes=h.NUM_CLASSES,
                    conv_dims=h.CONVS_DIM, num_convs=h.NUM_CONVS, dropout=h.DROPOUT, norm=h.NORM,
                    ignore_value=h.IGNORE_VALUE, loss_weight=h.LOSS_WEIGHT)

    def layers(self, features):
        return self.predictor(self.dropout(self.convs(features[self.in_feature])))
