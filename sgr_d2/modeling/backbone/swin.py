"""Swin Transformer (timm's implementation) as a detectron2 backbone with stages ``res2``..``res5``.

The backbone computes what the official Swin segmentation backbones compute (the detectron2 port
``D2SwinTransformer`` of MaskFormer / Mask2Former, and the UperNet code of the Swin authors), with
timm's modules and weights layout:

* **Names and output norms.** The modules carry the official names, so an official checkpoint
  loads as it is: ``patch_embed``, ``layers.{i}.blocks`` (timm's blocks of stage i),
  ``layers.{i}.downsample`` (the patch merging at the *end* of stage i, as in the official code;
  timm keeps it at the start of stage i + 1) and ``norm{i}``, the LayerNorm of output ``res{i+2}``.
  The next stage continues from the stage output *before* that norm, as in the official code.
  ``build_sgr_backbone`` hooks ``norm{i}`` for ``res{i+2}`` (:attr:`SwinBackbone.hook_points`),
  whose output is the normed NCHW feature: SGR after ``res5`` sees what the official head sees.
  (SGR after an earlier Swin stage changes that stage's feature only; the next stage reads the
  un-normed stage output.)
* **Windows.** Windows are always ``MODEL.SWIN.WINDOW_SIZE`` and every second block is shifted, at
  any input size (timm's ``always_partition=True``, ``strict_img_size=False``; timm's
  classification default would shrink the window and drop the shift on a stage whose map is not
  larger than the window). A feature map that is not a multiple of the window is padded at the
  bottom/right **before** the cyclic shift, and the shifted-window mask is computed on the padded
  map, as the official code does (``OfficialOrderSwinBlock``); timm shifts first and pads after,
  which groups other pixels into the border windows. The two agree when every stage's map is a
  multiple of the window (e.g. 224×224 inputs).

Non-persistent buffers that timm computes itself (``relative_position_index``, the attention
mask) are not part of the state dict. A timm (or official Microsoft) ImageNet checkpoint
converted by ``tools/convert_pretrained.py`` fills every parameter: the output norms are not
part of an ImageNet model, so the converted file holds LayerNorm's initial values for them
(weight 1, bias 0), which is where the official segmentation code starts them.
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = ["OutputNorm", "SwinLayer", "SwinBackbone", "build_swin_backbone", "SWIN_STAGE_NAMES"]

SWIN_STAGE_NAMES = ("res2", "res3", "res4", "res5")


class SwinLayer(nn.Module):
    """Stage i of the official layout: ``blocks`` (timm's), then ``downsample`` (the patch
    merging timm runs at the start of stage i + 1; None after the last built stage). NHWC."""

    def __init__(self, blocks: nn.Module, downsample, use_checkpoint: bool = False):
        super().__init__()
        self.blocks = blocks
        self.downsample = downsample
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stage output before the downsampling (the feature the output norm reads)."""
        if self.use_checkpoint and not torch.jit.is_scripting():
            from timm.models._manipulate import checkpoint_seq

            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class OutputNorm(nn.LayerNorm):
    """The LayerNorm of a stage output (official ``norm{i}``): (B, H, W, C) in, (B, C, H, W) out.
    Without ``channels`` (a stage that is not an output) it only transposes, so that every stage
    has a module ``build_sgr_backbone`` can hook; it then has no parameters."""

    def __init__(self, channels: int = 0):
        if channels:
            super().__init__(channels)
        else:
            nn.Module.__init__(self)
        self.normalize = bool(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = super().forward(x)
        return x.permute(0, 3, 1, 2).contiguous()


def _official_window_attention(block, x: torch.Tensor) -> torch.Tensor:
    """Shifted-window attention of a timm block in the official order: pad the (B, H, W, C) map to
    a multiple of the window (bottom/right, zeros), then shift, then attend within windows with the
    shifted-window mask of the padded map; undo the shift and crop."""
    from timm.models.swin_transformer import window_partition, window_reverse

    _, h, w, c = x.shape
    wh, ww = block.window_size
    x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
    hp, wp = x.shape[1:3]
    shift = tuple(block.shift_size)
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        mask = block.get_attn_mask(x)
    else:
        mask = None
    windows = window_partition(x, block.window_size).view(-1, wh * ww, c)
    x = window_reverse(block.attn(windows, mask=mask).view(-1, wh, ww, c), block.window_size, hp, wp)
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


@functools.lru_cache(maxsize=None)
def _official_order_block_class():
    from timm.models.swin_transformer import SwinTransformerBlock

    class OfficialOrderSwinBlock(SwinTransformerBlock):
        """timm's block with the official pad-then-shift window attention
        (:func:`_official_window_attention`); weights and names unchanged."""

        def _attn(self, x):
            return _official_window_attention(self, x)

    return OfficialOrderSwinBlock


def _timm_swin_class():
    try:
        from timm.models.swin_transformer import SwinTransformer
    except ImportError as e:  # pragma: no cover - timm is a dependency
        raise ImportError("build_swin_backbone needs timm (pip install timm)") from e
    params = inspect.signature(SwinTransformer.__init__).parameters
    missing = [p for p in ("always_partition", "strict_img_size") if p not in params]
    if missing:
        import timm

        raise ImportError(
            f"timm {timm.__version__}'s SwinTransformer has no {missing} argument; sgr_d2's Swin "
            "backbone needs a timm 1.0.x that has them (tested with 1.0.31): pip install -U timm"
        )
    return SwinTransformer


class SwinBackbone(Backbone):
    """Swin Transformer with outputs ``res2``..``res5`` (strides 4, 8, 16, 32)."""

    def __init__(self, *, in_chans: int = 3, patch_size: int = 4, embed_dim: int = 96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size: int = 7,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.3,
                 out_features=SWIN_STAGE_NAMES, use_checkpoint: bool = False):
        super().__init__()
        depths, num_heads, out_features = list(depths), list(num_heads), list(out_features)
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(
                f"MODEL.SWIN.DEPTHS ({depths}) and MODEL.SWIN.NUM_HEADS ({num_heads}) must have 4 "
                "entries, one per stage res2..res5"
            )
        bad = [f for f in out_features if f not in SWIN_STAGE_NAMES]
        if bad or not out_features:
            raise ValueError(
                f"MODEL.SWIN.OUT_FEATURES is {out_features}; expected a non-empty subset of "
                f"{list(SWIN_STAGE_NAMES)}"
            )
        for i, heads in enumerate(num_heads):
            if (embed_dim * 2**i) % heads:
                raise ValueError(
                    f"MODEL.SWIN.NUM_HEADS[{i}] ({heads}) must divide the width of stage "
                    f"{SWIN_STAGE_NAMES[i]} (MODEL.SWIN.EMBED_DIM × 2^{i} = {embed_dim * 2**i})"
                )
        timm_swin = _timm_swin_class()(
            img_size=224,  # nominal: any input size works (strict_img_size=False)
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            embed_dim=embed_dim,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            always_partition=True,
            strict_img_size=False,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        self.patch_size = patch_size
        self.patch_embed = timm_swin.patch_embed
        self._out_features = out_features
        self._out_feature_strides, self._out_feature_channels = {}, {}
        last = max(SWIN_STAGE_NAMES.index(f) for f in out_features)
        block_class = _official_order_block_class()
        self.layers = nn.ModuleList()
        self.hook_points = {}  # stage feature -> the module whose output it is
        for i, name in enumerate(SWIN_STAGE_NAMES[: last + 1]):
            for block in timm_swin.layers[i].blocks:
                block.__class__ = block_class  # same module, official window order
            downsample = timm_swin.layers[i + 1].downsample if i < last else None
            self.layers.append(SwinLayer(timm_swin.layers[i].blocks, downsample, use_checkpoint))
            channels, stride = embed_dim * 2**i, patch_size * 2**i
            self.add_module(f"norm{i}", OutputNorm(channels if name in out_features else 0))
            self.hook_points[name] = f"norm{i}"
            self._out_feature_strides[name] = stride
            self._out_feature_channels[name] = channels
        del timm_swin

    @property
    def size_divisibility(self) -> int:
        return self.patch_size * 8  # 32: four halvings of the resolution after the patch embedding

    def forward(self, x: torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"SwinBackbone expects (B, C, H, W) images, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"SwinBackbone: input size {h}x{w} must be a multiple of the patch size "
                f"{self.patch_size} (pad batches to size_divisibility {self.size_divisibility})"
            )
        x = self.patch_embed(x)  # NHWC
        outputs = {}
        for i, (name, layer) in enumerate(zip(SWIN_STAGE_NAMES, self.layers)):
            x = layer(x)  # the next stage continues from here, before the output norm
            feature = getattr(self, f"norm{i}")(x)  # normed, NCHW (a forward hook may replace it)
            if name in self._out_features:
                outputs[name] = feature
            if layer.downsample is not None:
                x = layer.downsample(x)
        return outputs

    def output_shape(self):
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_swin_backbone(cfg, input_shape: ShapeSpec):
    """Swin Transformer from ``MODEL.SWIN.*`` (Swin-T by default), outputs ``MODEL.SWIN.OUT_FEATURES``."""
    s = cfg.MODEL.SWIN
    return SwinBackbone(
        in_chans=input_shape.channels,
        patch_size=s.PATCH_SIZE,
        embed_dim=s.EMBED_DIM,
        depths=s.DEPTHS,
        num_heads=s.NUM_HEADS,
        window_size=s.WINDOW_SIZE,
        mlp_ratio=s.MLP_RATIO,
        qkv_bias=s.QKV_BIAS,
        drop_rate=s.DROP_RATE,
        attn_drop_rate=s.ATTN_DROP_RATE,
        drop_path_rate=s.DROP_PATH_RATE,
        out_features=s.OUT_FEATURES,
        use_checkpoint=s.USE_CHECKPOINT,
    )
