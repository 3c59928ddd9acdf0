"""``StageHookBackbone``: a registered backbone with a block applied to the output of one stage.

SGR (``build_sgr_backbone``) and GloRe (``build_glore_backbone``) are both such a block. The
stage is a sub-module named ``in_feature`` (``res4``, ``res5`` of detectron2's ResNet, the stages
of the Swin wrapper, ...), inside ``bottom_up`` for an FPN, whose output the block replaces
during the forward pass (a forward hook registered for that call only), so later stages and every
returned feature see the new output. A feature that is only an output of the backbone gets the
block on return.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from detectron2.modeling import Backbone

__all__ = ["StageHookBackbone", "stage_channels"]


def _stage_name(backbone: nn.Module, name: str) -> Optional[str]:
    """The path of the module whose output is the stage ``name`` of ``backbone`` (or of its FPN
    ``bottom_up``): the sub-module of that name, or the one the backbone's ``hook_points`` names."""
    for prefix, net in (("", backbone), ("bottom_up.", getattr(backbone, "bottom_up", None))):
        if not isinstance(net, nn.Module):
            continue
        path = getattr(net, "hook_points", {}).get(name, name)
        if isinstance(getattr(net, path, None), nn.Module):
            return prefix + path
    return None


class StageHookBackbone(Backbone):
    """Wraps ``backbone`` and applies ``block_forward`` to the output of its stage ``in_feature``.

    ``block_forward(x)`` returns ``(y, extras)``: the stage's new output and a dict of the block's
    other outputs, which ``forward`` returns under the key :attr:`extras_key` of the features
    (absent when the block has none). ``output_shape()`` and ``size_divisibility`` are the
    wrapped backbone's. ``config_key`` names the config key in error messages. Subclasses:
    ``SGRBackbone``, ``GloReBackbone``.
    """

    extras_key: str = ""

    def __init__(self, backbone: Backbone, in_feature: str, config_key: str):
        super().__init__()
        self.backbone = backbone
        self.in_feature = in_feature
        self._stage = _stage_name(backbone, in_feature)
        if self._stage is None and in_feature not in backbone.output_shape():
            raise ValueError(
                f"{config_key} is {in_feature!r}, but the backbone {type(backbone).__name__} has no "
                f"stage of that name; its outputs are {sorted(backbone.output_shape())}"
            )

    def block_forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def forward(self, x):
        extras: Dict[str, torch.Tensor] = {}

        def replace(module, inputs, output):
            y, found = self.block_forward(output)
            extras.update(found)
            return y

        if self._stage is None:
            features = dict(self.backbone(x))
            features[self.in_feature] = replace(None, None, features[self.in_feature])
        else:
            handle = self.backbone.get_submodule(self._stage).register_forward_hook(replace)
            try:
                features = dict(self.backbone(x))
            finally:
                handle.remove()
        if extras:
            features[self.extras_key] = extras
        return features

    def output_shape(self):
        return self.backbone.output_shape()

    @property
    def size_divisibility(self):
        return self.backbone.size_divisibility

    @property
    def padding_constraints(self):
        return getattr(self.backbone, "padding_constraints", {})


def stage_channels(backbone: Backbone, name: str, config_key: str) -> int:
    """Channels of the stage ``name`` of ``backbone`` (an output, or a ResNet stage's last block)."""
    for candidate in (backbone, getattr(backbone, "bottom_up", None)):
        if candidate is not None and name in candidate.output_shape():
            return candidate.output_shape()[name].channels
    path = _stage_name(backbone, name)
    stage = backbone.get_submodule(path) if path else None
    channels = getattr(stage, "out_channels", None)
    if channels is None and isinstance(stage, nn.Sequential) and len(stage):
        # a detectron2 ResNet stage that is not an output: the width of its last block
        channels = getattr(list(stage.children())[-1], "out_channels", None)
    if channels is None:
        raise ValueError(
            f"{config_key} is {name!r}, but the backbone {type(backbone).__name__} does not produce it; "
            f"its outputs are {sorted(backbone.output_shape())}"
        )
    return channels
