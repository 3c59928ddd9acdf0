"""``build_sgr_backbone``: any registered detectron2 backbone with SGR after one of its stages."""
from __future__ import annotations

from typing import Optional

from torch import nn

from detectron2.layers import get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from ...sgr import SGRModule
from .stage_hook import StageHookBackbone, stage_channels

__all__ = ["SGR_OUTPUTS", "SGRBackbone", "build_sgr_backbone", "find_sgr_backbone", "sgr_module_from_config"]

# The key of the features dict under which an SGRBackbone returns the component's outputs
# (region maps and logits, tokens, token logits): the meta-architectures pop it for the losses
# and the region maps; the heads never see it.
SGR_OUTPUTS = "sgr"


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


class SGRBackbone(StageHookBackbone):
    """A backbone with SGR after its stage ``in_feature`` (see :class:`StageHookBackbone`); its
    features carry the component's outputs under :data:`SGR_OUTPUTS`."""

    extras_key = SGR_OUTPUTS

    def __init__(self, backbone: Backbone, in_feature: str, sgr: SGRModule):
        super().__init__(backbone, in_feature, "MODEL.SGR.IN_FEATURE")
        self.sgr = sgr

    def block_forward(self, x):
        return self.sgr(x)


@BACKBONE_REGISTRY.register()
def build_sgr_backbone(cfg, input_shape):
    """Builds ``cfg.MODEL.SGR.BACKBONE_NAME`` and inserts SGR after ``cfg.MODEL.SGR.IN_FEATURE``."""
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
    channels = stage_channels(inner, in_feature, "MODEL.SGR.IN_FEATURE")
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES if cfg.MODEL.SGR.CLASS_WEIGHT > 0 else None
    return SGRBackbone(inner, in_feature, sgr_module_from_config(cfg, channels, num_classes))


def find_sgr_backbone(model: nn.Module) -> Optional[SGRBackbone]:
    """The SGRBackbone inside ``model`` (None when it has none)."""
    return next((m for m in model.modules() if isinstance(m, SGRBackbone)), None)
