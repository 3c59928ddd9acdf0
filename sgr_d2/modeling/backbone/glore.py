"""GloRe, the graph-based global reasoning unit (Chen et al., CVPR 2019), as a backbone wrapper.

The transfer experiment (docs/method.md#transfer-to-detection) compares SGR with GloRe in its place. ``build_glore_backbone`` wraps any registered
backbone (``MODEL.GLORE.BACKBONE_NAME``) and inserts a :class:`GloReUnit` after the stage
``MODEL.GLORE.IN_FEATURE``, found the way :class:`~sgr_d2.modeling.backbone.sgr_backbone.SGRBackbone`
finds it (a sub-module of that name, inside ``bottom_up`` for an FPN). State-dict keys are
``backbone.backbone.*`` (the wrapped backbone) and ``backbone.glore.*``, as with SGR. It works
under segmentation heads and under Mask R-CNN alike; it has no loss of its own.
"""
from __future__ import annotations

import torch
from torch import nn

from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from .stage_hook import StageHookBackbone, stage_channels

__all__ = ["GloReUnit", "GloReBackbone", "build_glore_backbone", "glore_num_params"]


def glore_num_params(in_channels: int, num_state: int, num_nodes: int) -> int:
    """Trainable parameters of a GloReUnit with an affine norm (derivation in GloReUnit)."""
    d, c, n = in_channels, num_state, num_nodes
    return (d * c + c) + (d * n + n) + (n * n + n) + c * c + c * d + 2 * d


class GloReUnit(nn.Module):
    """Global reasoning over a (B, D, H, W) map; returns a map of the same shape.

    1. reduce: 1x1 conv D -> C' (``reduce``), X' of shape (B, C', L), L = H·W;
    2. projection: 1x1 conv D -> N (``project``), B of shape (B, N, L);
    3. node features V = B · X'^T, (B, N, C') (divided by L when ``normalize``);
    4. graph convolution: V' = V - A(V) with A a 1-d conv over the nodes (the adjacency;
       the paper's (I - A_g) V), then ReLU(W(V')) with W a 1-d conv over the channels;
    5. reverse projection with the same B: Y' = B^T · Z, (B, C', H, W);
    6. 1x1 conv C' -> D + norm, added to the input. The norm's weight starts at zero, so a new
       unit is the identity and a pretrained backbone starts unchanged.

    Parameters (affine norm): reduce D·C' + C', project D·N + N, adjacency N·N + N,
    channel conv C'·C' (no bias), output conv C'·D (no bias), norm 2·D.
    """

    def __init__(self, in_channels: int, num_state: int = 256, num_nodes: int = 128,
                 norm: str = "BN", normalize: bool = True):
        super().__init__()
        if min(in_channels, num_state, num_nodes) < 1:
            raise ValueError(f"GloReUnit: in_channels ({in_channels}), num_state ({num_state}) and "
                             f"num_nodes ({num_nodes}) must be >= 1")
        self.in_channels = in_channels
        self.num_state = num_state
        self.num_nodes = num_nodes
        self.normalize = normalize
        self.reduce = nn.Conv2d(in_channels, num_state, kernel_size=1)
        self.project = nn.Conv2d(in_channels, num_nodes, kernel_size=1)
        self.adjacency = nn.Conv1d(num_nodes, num_nodes, kernel_size=1)
        self.state_conv = nn.Conv1d(num_state, num_state, kernel_size=1, bias=False)
        self.out_conv = nn.Conv2d(num_state, in_channels, kernel_size=1, bias=False)
        self.out_norm = get_norm(norm, in_channels) if norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in (self.reduce, self.project, self.out_conv):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in (self.reduce, self.project):
            nn.init.zeros_(m.bias)
        if self.out_norm is not None and getattr(self.out_norm, "weight", None) is not None:
            nn.init.zeros_(self.out_norm.weight)
        else:  # no affine norm: zero the output conv instead, for the same identity start
            nn.init.zeros_(self.out_conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"GloReUnit expects a (B, {self.in_channels}, H, W) feature map, got {tuple(x.shape)}"
            )
        b, _, h, w = x.shape
        state = self.reduce(x).flatten(2)  # (B, C', L)
        proj = self.project(x).flatten(2)  # (B, N, L)
        nodes = torch.bmm(proj, state.transpose(1, 2))  # (B, N, C')
        if self.normalize:
            nodes = nodes / (h * w)
        nodes = nodes - self.adjacency(nodes)  # (I - A) V, the 1-d conv mixes nodes
        nodes = torch.relu(self.state_conv(nodes.transpose(1, 2)))  # (B, C', N)
        out = torch.bmm(nodes, proj).view(b, self.num_state, h, w)  # reverse projection
        out = self.out_conv(out)
        if self.out_norm is not None:
            out = self.out_norm(out)
        return x + out


class GloReBackbone(StageHookBackbone):
    """``backbone`` with a GloReUnit applied to the output of its stage ``in_feature``.

    The stage is located as :class:`StageHookBackbone` does for SGR (a sub-module
    of that name, in ``bottom_up`` for an FPN) and replaced through a forward hook; a feature
    that is only an output of the backbone gets the unit on return. Not an SGRBackbone: the
    segmentors' SGR losses and region maps must not see it.
    """

    def __init__(self, backbone: Backbone, in_feature: str, glore: GloReUnit):
        super().__init__(backbone, in_feature, "MODEL.GLORE.IN_FEATURE")
        self.glore = glore

    def block_forward(self, x):
        return self.glore(x), {}


@BACKBONE_REGISTRY.register()
def build_glore_backbone(cfg, input_shape: ShapeSpec):
    """Builds ``cfg.MODEL.GLORE.BACKBONE_NAME`` with GloRe after ``cfg.MODEL.GLORE.IN_FEATURE``."""
    g = cfg.MODEL.GLORE
    name = g.BACKBONE_NAME
    if name in ("build_glore_backbone", "build_sgr_backbone"):
        raise ValueError(f"MODEL.GLORE.BACKBONE_NAME is {name!r}; expected a plain backbone "
                         "(GloRe replaces SGR, it does not wrap it)")
    if name not in BACKBONE_REGISTRY:
        raise KeyError(
            f"MODEL.GLORE.BACKBONE_NAME is {name!r}, which is not a registered backbone; "
            f"registered: {sorted(k for k, _ in BACKBONE_REGISTRY)}"
        )
    inner = BACKBONE_REGISTRY.get(name)(cfg, input_shape)
    channels = stage_channels(inner, g.IN_FEATURE, "MODEL.GLORE.IN_FEATURE")
    unit = GloReUnit(channels, num_state=g.NUM_STATE, num_nodes=g.NUM_NODES, norm=g.NORM,
                     normalize=g.NORMALIZE)
    return GloReBackbone(inner, g.IN_FEATURE, unit)
