"""detectron2 ResNet with dilated last stages (output stride 8 or 16) and multi-grid (§4)."""
from __future__ import annotations

import fvcore.nn.weight_init as weight_init
from torch.nn import functional as F

from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet

__all__ = ["DilatedBasicBlock", "build_dilated_resnet_backbone", "build_dilated_resnet_fpn_backbone",
           "stage_strides_and_dilations", "receptive_field"]

_DEPTHS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


class DilatedBasicBlock(CNNBlockBase):
    """ResNet-18/34 basic block with a dilation (detectron2's BasicBlock has none)."""

    def __init__(self, in_channels, out_channels, *, stride=1, dilation=1, norm="BN"):
        super().__init__(in_channels, out_channels, stride)
        self.shortcut = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = Conv2d(in_channels, out_channels, 1, stride=stride, bias=False,
                                   norm=get_norm(norm, out_channels))
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation,
                            dilation=dilation, bias=False, norm=get_norm(norm, out_channels))
        self.conv2 = Conv2d(out_channels, out_channels, 3, stride=1, padding=dilation,
                            dilation=dilation, bias=False, norm=get_norm(norm, out_channels))
        for layer in (self.conv1, self.conv2, self.shortcut):
            if layer is not None:
                weight_init.c2_msra_fill(layer)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        out = self.conv2(out)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out + shortcut)


def stage_strides_and_dilations(output_stride: int):
    """(stride, dilation) of res2..res5 for an output stride of 8, 16 or 32."""
    table = {
        32: [(1, 1), (2, 1), (2, 1), (2, 1)],
        16: [(1, 1), (2, 1), (2, 1), (1, 2)],
        8: [(1, 1), (2, 1), (1, 2), (1, 4)],
    }
    if output_stride not in table:
        raise ValueError(f"MODEL.RESNETS.OUTPUT_STRIDE is {output_stride}; expected 8, 16 or 32")
    return table[output_stride]


def _stage_plan(r):
    """[(first block's stride, dilation of each block)] of res2..res5 for ``MODEL.RESNETS`` ``r``:
    dilation from the output stride, times the multi-grid in a dilated res5."""
    if r.DEPTH not in _DEPTHS:
        raise ValueError(f"MODEL.RESNETS.DEPTH is {r.DEPTH}; expected one of {sorted(_DEPTHS)}")
    grid = list(r.MULTI_GRID) or [1]
    plan = []
    for i, ((stride, dilation), n) in enumerate(zip(stage_strides_and_dilations(r.OUTPUT_STRIDE), _DEPTHS[r.DEPTH])):
        dilations = [dilation] * n
        if i == 3 and dilation > 1:
            dilations = [dilation * grid[b % len(grid)] for b in range(n)]
        plan.append((stride, dilations))
    return plan


def receptive_field(cfg):
    """(size, stride) of the theoretical receptive field of one res5 cell of
    ``build_dilated_resnet_backbone``: the side, in input pixels, of the square of pixels it
    depends on, and the cells' spacing. Walks the layers: a k×k layer with dilation d adds
    (k−1)·d·(current stride) — detectron2's stem (7×7/2 conv, 3×3/2 max-pool), then each
    block's convs (basic: two 3×3; bottleneck: 1×1, 3×3, 1×1 with the stride in the first 1×1
    when ``STRIDE_IN_1X1``). Cell i is centred on input pixel stride·i (every layer pads by
    (k−1)·d/2). Checked against the gradient support of a built model in
    ``tests/test_toy_context.py``."""
    r = cfg.MODEL.RESNETS
    size, jump = 1, 1

    def layer(k, stride=1, dilation=1):
        nonlocal size, jump
        size += (k - 1) * dilation * jump
        jump *= stride

    layer(7, 2)
    layer(3, 2)
    for stride, dilations in _stage_plan(r):
        for b, d in enumerate(dilations):
            s = stride if b == 0 else 1
            if r.DEPTH in (18, 34):
                layer(3, s, d)
                layer(3, 1, d)
            elif r.STRIDE_IN_1X1:
                layer(1, s)
                layer(3, 1, d)
                layer(1)
            else:
                layer(1)
                layer(3, s, d)
                layer(1)
    return size, jump


@BACKBONE_REGISTRY.register()
def build_dilated_resnet_backbone(cfg, input_shape: ShapeSpec):
    """ResNet-18..152 whose last downsamplings are replaced by dilation (MODEL.RESNETS.OUTPUT_STRIDE),
    with multi-grid dilations (MODEL.RESNETS.MULTI_GRID) in res5. Stride 32 is the plain ResNet."""
    r = cfg.MODEL.RESNETS
    norm = r.NORM
    depth = r.DEPTH
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=norm)
    out_channels = r.RES2_OUT_CHANNELS
    in_channels = r.STEM_OUT_CHANNELS
    bottleneck = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    stages = []
    for stride, dilations in _stage_plan(r):
        n = len(dilations)
        kwargs = dict(num_blocks=n, in_channels=in_channels, out_channels=out_channels,
                      stride_per_block=[stride] + [1] * (n - 1), dilation_per_block=dilations, norm=norm)
        if depth in (18, 34):
            kwargs["block_class"] = DilatedBasicBlock
        else:
            kwargs.update(block_class=BottleneckBlock, bottleneck_channels=bottleneck,
                          num_groups=r.NUM_GROUPS, stride_in_1x1=r.STRIDE_IN_1X1)
            bottleneck *= 2
        stages.append(ResNet.make_stage(**kwargs))
        in_channels = out_channels
        out_channels *= 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES).freeze(cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_dilated_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """detectron2's FPN (P2-P6, as ``build_resnet_fpn_backbone``) over
    ``build_dilated_resnet_backbone``; with ``MODEL.RESNETS.OUTPUT_STRIDE`` 32 the bottom-up
    network is the plain ResNet, any depth and width (the half-width toy ResNet-18 included)."""
    if cfg.MODEL.RESNETS.OUTPUT_STRIDE != 32:
        raise ValueError(
            f"MODEL.RESNETS.OUTPUT_STRIDE is {cfg.MODEL.RESNETS.OUTPUT_STRIDE}; an FPN needs the "
            "undilated ResNet (32): its levels must halve in resolution"
        )
    bottom_up = build_dilated_resnet_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
