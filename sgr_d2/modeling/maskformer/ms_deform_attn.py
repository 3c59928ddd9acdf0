"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) in pure PyTorch.

Each query attends, per head and per feature level, to ``n_points`` locations: a reference
point plus learned offsets. The value of a location is read by bilinear interpolation
(``grid_sample``, zero outside the map) and the values are summed with learned attention
weights that are softmax-normalised over all levels × points of the head.

Coordinates are normalised to [0, 1] per level, 0 and 1 being the outer edges of the map (so
pixel (i, j) of an H × W level has its centre at ((j + 0.5) / W, (i + 0.5) / H)), and offsets
are expressed in pixels of each level. No custom CUDA op is used.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ms_deform_attn", "MSDeformAttn"]


def ms_deform_attn(value: torch.Tensor, spatial_shapes: Union[torch.Tensor, Sequence[Tuple[int, int]]],
                   sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor) -> torch.Tensor:
    """The sampling and weighting core.

    Args:
        value: (B, S, n_heads, head_dim), the levels' pixels concatenated (level by level,
            row-major), S = Σ_l H_l W_l.
        spatial_shapes: (H_l, W_l) of each level: host ints (what the pixel decoder passes; a
            tensor is read back to the host, a sync when it lives on a GPU).
        sampling_locations: (B, Lq, n_heads, n_levels, n_points, 2), (x, y) in [0, 1].
        attention_weights: (B, Lq, n_heads, n_levels, n_points).
    Returns:
        (B, Lq, n_heads · head_dim).
    """
    b, s, n_heads, head_dim = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != s:
        raise ValueError(f"ms_deform_attn: value has {s} positions but the spatial shapes "
                         f"{shapes} hold {sum(sizes)}")
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled: List[torch.Tensor] = []
    for lvl, v in enumerate(value.split(sizes, dim=1)):
        h, w = shapes[lvl]
        # (B, H·W, heads, d) -> (B·heads, d, H, W)
        v = v.flatten(2).transpose(1, 2).reshape(b * n_heads, head_dim, h, w)
        # (B, Lq, heads, points, 2) -> (B·heads, Lq, points, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g.to(v.dtype), mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (B·heads, d, Lq, points)
    # (B, Lq, heads, levels, points) -> (B·heads, 1, Lq, levels·points)
    weights = attention_weights.transpose(1, 2).reshape(b * n_heads, 1, lq, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights.to(value.dtype)).sum(-1)  # (B·heads, d, Lq)
    return out.view(b, n_heads * head_dim, lq).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module.

    ``forward(query (B, Lq, C), reference_points (B, Lq, n_levels, 2), input_flatten (B, S, C),
    spatial_shapes (n_levels, 2) on the input's device, padding_mask (B, S) or None,
    level_shapes) -> (B, Lq, C)``; ``level_shapes``: the same (H_l, W_l) as host ints, so that
    no shape is read back from the device (default: read from ``spatial_shapes``).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        # Offsets start at 0 weight; the bias spreads the heads' points in n_heads directions,
        # point k of a head at distance k + 1 pixels.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        dirs = torch.stack([angles.cos(), angles.sin()], -1)
        dirs = dirs / dirs.abs().max(-1, keepdim=True).values  # onto the unit square
        bias = dirs[:, None, None, :].repeat(1, self.n_levels, self.n_points, 1)
        bias = bias * torch.arange(1, self.n_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                spatial_shapes: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                level_shapes: Optional[Sequence[Tuple[int, int]]] = None) -> torch.Tensor:
        b, lq, _ = query.shape
        s = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(b, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(b, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(b, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(b, lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] != 2:
            raise ValueError(f"MSDeformAttn: reference points must be (x, y), got last dim "
                             f"{reference_points.shape[-1]}")
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets)  # (W, H)
        locations = (reference_points[:, :, None, :, None, :]
                     + offsets / normalizer[None, None, None, :, None, :])
        shapes = spatial_shapes if level_shapes is None else level_shapes
        return self.output_proj(ms_deform_attn(value, shapes, locations, weights))
