"""``build_sgr_backbone``: any registered detectron2 backbone with SGR after one of its stages."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from ..config import validate_sgr_config
from ..sgr import SGRModule

__all__ = ["StageHookBackbone", "SGRBackbone", "build_sgr_backbone", "stage_channels", "sgr_module_from_config", "find_sgr_backbone",
           "attach_sgr_regions", "crop_region_maps"]


def sgr_module_from_config(cfg, in_channels: int, num_classes: Optional[int] = None) -> SGRModule:
    s = cfg.MODEL.SGR
    return SGRModule(
        in_channels,
        num_tokens=s.NUM_TOKENS,
        token_dim=s.TOKEN_DIM,
        num_layers=s.NUM_LAYERS,
        num_heads=s.NUM_HEADS,
        ffn_dim=s.FFN_DIM,
        dropout=s.DROPOUT,
        num_classes=num_classes,
        norm_layer=lambda c: get_norm(s.NORM, c),
        eps=s.EPS,
    )


class StageHookBackbone(Backbone):
    """Wraps ``backbone`` and applies ``block_forward`` to the output of its stage ``in_feature``.

    The stage is found as a sub-module named ``in_feature`` (``res4``, ``res5`` of detectron2's
    ResNet, the stages of the Swin wrapper, ...) whose output is replaced through a forward
    hook, so later stages and every returned feature see the new output. A backbone with a
    ``bottom_up`` network (detectron2's FPN) gets the block inside its bottom-up path. Otherwise
    the feature must be one of the backbone's outputs and the block is applied to it on return.
    ``output_shape()`` and ``size_divisibility`` are the wrapped backbone's. ``config_key`` names
    the config key in error messages. Subclasses: :class:`SGRBackbone`, ``GloReBackbone``.
    """

    def __init__(self, backbone: Backbone, in_feature: str, config_key: str):
        super().__init__()
        self.backbone = backbone
        self.in_feature = in_feature
        self._post_hoc = False
        stage = self._find_stage(backbone, in_feature)
        if stage is None:
            if in_feature not in backbone.output_shape():
                raise ValueError(
                    f"{config_key} is {in_feature!r}, but the backbone "
                    f"{type(backbone).__name__} has no stage of that name; its outputs are "
                    f"{sorted(backbone.output_shape())}"
                )
            self._post_hoc = True
        else:
            stage.register_forward_hook(self._hook)

    @staticmethod
    def _find_stage(backbone: nn.Module, name: str) -> Optional[nn.Module]:
        for candidate in (backbone, getattr(backbone, "bottom_up", None)):
            if candidate is None:
                continue
            stage = getattr(candidate, name, None)
            if isinstance(stage, nn.Module):
                return stage
        return None

    def block_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _hook(self, module, inputs, output):
        return self.block_forward(output)

    def forward(self, x):
        features = self.backbone(x)
        if self._post_hoc:
            features = dict(features)
            features[self.in_feature] = self.block_forward(features[self.in_feature])
        return features

    def output_shape(self):
        return self.backbone.output_shape()

    @property
    def size_divisibility(self):
        return self.backbone.size_divisibility

    @property
    def padding_constraints(self):
        return getattr(self.backbone, "padding_constraints", {})


class SGRBackbone(StageHookBackbone):
    """A backbone with SGR after its stage ``in_feature`` (see :class:`StageHookBackbone`).

    After each forward, ``self.sgr_outputs`` holds the component's region maps, logits and
    tokens for the losses and the metrics.
    """

    def __init__(self, backbone: Backbone, in_feature: str, sgr: SGRModule):
        super().__init__(backbone, in_feature, "MODEL.SGR.IN_FEATURE")
        self.sgr = sgr
        self.sgr_outputs: Optional[Dict[str, torch.Tensor]] = None

    def block_forward(self, x):
        y, self.sgr_outputs = self.sgr(x)
        return y

    def forward(self, x):
        self.sgr_outputs = None
        return super().forward(x)


def stage_channels(backbone: Backbone, name: str, config_key: str = "MODEL.SGR.IN_FEATURE") -> int:
    """Channels of the stage ``name`` of ``backbone`` (an output, or a ResNet stage's last block)."""
    for candidate in (backbone, getattr(backbone, "bottom_up", None)):
        if candidate is not None and name in candidate.output_shape():
            return candidate.output_shape()[name].channels
    stage = StageHookBackbone._find_stage(backbone, name)
    channels = getattr(stage, "out_channels", None)
    if channels is None and isinstance(stage, nn.Sequential) and len(stage):
        # a detectron2 ResNet stage that is not an output: the width of its last block
        channels = getattr(list(stage.children())[-1], "out_channels", None)
    if channels is None:
        outs = sorted(backbone.output_shape())
        raise ValueError(
            f"{config_key} is {name!r}, but the backbone {type(backbone).__name__} "
            f"does not produce it; its outputs are {outs}"
        )
    return channels


@BACKBONE_REGISTRY.register()
def build_sgr_backbone(cfg, input_shape):
    """Builds ``cfg.MODEL.SGR.BACKBONE_NAME`` and inserts SGR after ``cfg.MODEL.SGR.IN_FEATURE``."""
    validate_sgr_config(cfg)
    name = cfg.MODEL.SGR.BACKBONE_NAME
    if name == "build_sgr_backbone":
        raise ValueError("MODEL.SGR.BACKBONE_NAME cannot be build_sgr_backbone itself")
    if name not in BACKBONE_REGISTRY:
        raise KeyError(
            f"MODEL.SGR.BACKBONE_NAME is {name!r}, which is not a registered backbone; "
            f"registered: {sorted(k for k, _ in BACKBONE_REGISTRY)}"
        )
    inner = BACKBONE_REGISTRY.get(name)(cfg, input_shape)
    in_feature = cfg.MODEL.SGR.IN_FEATURE
    channels = stage_channels(inner, in_feature)
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES if cfg.MODEL.SGR.CLASS_WEIGHT > 0 else None
    return SGRBackbone(inner, in_feature, sgr_module_from_config(cfg, channels, num_classes))


def find_sgr_backbone(model: nn.Module) -> Optional[SGRBackbone]:
    """The SGRBackbone inside ``model`` (None when it has none)."""
    for m in model.modules():
        if isinstance(m, SGRBackbone):
            return m
    return None


def crop_region_maps(regions: torch.Tensor, image_size, padded_hw) -> torch.Tensor:
    """The part of region maps (K, fh, fw) over a padded input that covers the image itself.

    The maps span the padded input (``padded_hw``), the image its top-left ``image_size`` (h, w).
    They are resampled (bilinear, as the label-sized maps are read: a map cell is centred on its
    stride-sized block, ``align_corners=False``) at the centres of a ``vh × vw`` grid that covers
    exactly the image, ``vh = min(fh, ceil(h · fh / H_pad))`` (likewise vw): the partial last cell
    is not stretched over the image. Without padding this is the maps themselves. Each output
    cell is a convex combination of the maps' cells, so ``Σ_k P_k`` is kept.
    """
    k, fh, fw = regions.shape
    h, w = int(image_size[0]), int(image_size[1])
    ph, pw = int(padded_hw[0]), int(padded_hw[1])
    if (h, w) == (ph, pw):
        return regions
    vh, vw = min(fh, -(-h * fh // ph)), min(fw, -(-w * fw // pw))
    dev = regions.device
    # cell centres in input pixels, as grid_sample coordinates of the padded extent (-1..1)
    ys = (torch.arange(vh, device=dev, dtype=torch.float32) + 0.5) * (h / vh) * (2.0 / ph) - 1.0
    xs = (torch.arange(vw, device=dev, dtype=torch.float32) + 0.5) * (w / vw) * (2.0 / pw) - 1.0
    grid = torch.stack([xs.view(1, vw).expand(vh, vw), ys.view(vh, 1).expand(vh, vw)], dim=-1)
    out = F.grid_sample(regions[None].float(), grid[None], mode="bilinear", padding_mode="border",
                        align_corners=False)[0]
    return out.to(regions.dtype)


def attach_sgr_regions(results, backbone, image_sizes, padded_hw):
    """Add ``"sgr_regions"`` (K, h, w) to each inference result of a model with SGR.

    The region maps cover the padded batch; each image keeps the part over its own pixels,
    cropped exactly (:func:`crop_region_maps`), at about the feature stride. The token-semantics
    metrics and the figures read them, resized to the label map or image.
    """
    if not isinstance(backbone, SGRBackbone) or backbone.sgr_outputs is None:
        return results
    regions = backbone.sgr_outputs["region_maps"]
    for i, (r, size) in enumerate(zip(results, image_sizes)):
        r["sgr_regions"] = crop_region_maps(regions[i], size, padded_hw)
    return results
