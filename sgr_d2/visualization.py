"""Drawing code shared by the demo and the figure tools (matplotlib, Agg backend).

Every figure is saved at an exact size: ``figsize × dpi`` pixels, never cropped
(``bbox_inches`` is not "tight"), so callers and tests can compute the PNG's dimensions from the
settings. Each function's docstring gives its size formula. Segmentation maps are drawn with
detectron2's :class:`~detectron2.utils.visualizer.Visualizer` and the dataset's metadata
(``stuff_classes`` / ``stuff_colors``).

* :func:`concept_region_figure` — image, argmax-token region map, a few token heatmaps
  (``make demo`` and ``demo/demo.py``);
* :func:`components_figure` — a label map beside its connected components (supplementary Fig. 1);
* :func:`token_histogram_figure` — concept regions with class / instance histograms (Fig. 2);
* :func:`qualitative_figure` — image, ground truth, predictions of several models (Figs. 3–5).

Only drawing: reading a dataset's images and labels and running a model on them is
:mod:`sgr_d2.predict`'s.
"""
from __future__ import annotations

import colorsys
import os
from typing import Dict, List, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")  # before pyplot: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from .predict import check_image  # noqa: E402

__all__ = [
    "concept_region_figure",
    "components_figure",
    "panoptic_figure",
    "token_histogram_figure",
    "qualitative_figure",
    "draw_sem_seg",
    "token_colors",
    "upsample_regions",
    "figure_size_px",
]

ArrayOrTensor = Union[np.ndarray, torch.Tensor]


# ----------------------------------------------------------------------------- helpers
def figure_size_px(width_in: float, height_in: float, dpi: int) -> tuple:
    """(width, height) in pixels of a PNG saved from a ``width_in × height_in`` figure at ``dpi``."""
    return int(round(width_in * dpi)), int(round(height_in * dpi))


def _check_regions(region_maps, name: str = "region_maps") -> torch.Tensor:
    if isinstance(region_maps, np.ndarray):
        region_maps = torch.from_numpy(region_maps)
    if not isinstance(region_maps, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(region_maps).__name__}")
    if region_maps.dim() != 3 or min(region_maps.shape) == 0:
        raise ValueError(f"{name} must have shape (K, h, w) with K, h, w >= 1, got {tuple(region_maps.shape)}")
    return region_maps.detach().float().cpu()


def upsample_regions(region_maps: ArrayOrTensor, size) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of (K, h, w) region maps to ``size`` = (H, W)."""
    p = _check_regions(region_maps)
    if tuple(p.shape[-2:]) == tuple(size):
        return p
    return F.interpolate(p[None], size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)[0]


def token_colors(num: int) -> np.ndarray:
    """``num`` well-separated RGB colours (uint8, (num, 3)): golden-ratio hue steps."""
    out = np.zeros((num, 3), np.uint8)
    for k in range(num):
        h = (k * 0.618033988749895) % 1.0
        s = 0.55 + 0.4 * ((k // 5) % 2)
        v = 0.95 - 0.3 * ((k // 3) % 2)
        out[k] = np.round(np.asarray(colorsys.hsv_to_rgb(h, s, v)) * 255)
    return out


def _boundaries(label_map: np.ndarray) -> np.ndarray:
    b = np.zeros(label_map.shape, bool)
    b[1:, :] |= label_map[1:, :] != label_map[:-1, :]
    b[:, 1:] |= label_map[:, 1:] != label_map[:, :-1]
    return b


def _overlay(image: np.ndarray, colour_map: np.ndarray, alpha: float, borders: Optional[np.ndarray] = None):
    out = image.astype(np.float32) * (1 - alpha) + colour_map.astype(np.float32) * alpha
    if borders is not None:
        out[borders] = 255
    return np.clip(out, 0, 255).astype(np.uint8)


def _render_scale(shape, panel_px: float) -> float:
    """Visualizer scale that renders an image about as large as its panel (never below 1)."""
    return max(1.0, float(panel_px) / max(shape[0], shape[1]))


def _save(fig, output_path: str, dpi: int) -> str:
    parent = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(output_path, dpi=dpi, facecolor="white")
    plt.close(fig)
    return output_path


def _blank_axis(ax, title: Optional[str] = None, fontsize: int = 9):
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)
    if title:
        ax.set_title(title, fontsize=fontsize)


def _panel_row(panels, output_path: str, panel_inches: float, dpi: int) -> str:
    """``(image, title)`` panels in one row, ``panel_inches`` square each, saved to ``output_path``."""
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * panel_inches, panel_inches), dpi=dpi,
                             squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.9, wspace=0.04)
    for ax, (img, title) in zip(axes[0], panels):
        ax.imshow(img)
        _blank_axis(ax, title, fontsize=10)
    return _save(fig, output_path, dpi)


def draw_sem_seg(image_rgb: np.ndarray, sem_seg: ArrayOrTensor, metadata, alpha: float = 0.6,
                 area_threshold: Optional[int] = None, show_labels: bool = True,
                 scale: float = 1.0) -> np.ndarray:
    """``sem_seg`` (H, W) class ids drawn over the image by detectron2's Visualizer.

    Colours come from ``metadata.stuff_colors``; pixels with a value outside
    ``0..len(stuff_classes)-1`` (the ignore label) stay uncoloured; ``show_labels=False`` omits
    the class names written in the regions (figures with a legend). Returns a uint8 RGB image of
    the image's size times ``scale`` (rendering larger keeps the text small next to the regions).
    """
    from detectron2.data.catalog import Metadata
    from detectron2.utils.visualizer import ColorMode, Visualizer

    image = check_image(image_rgb)
    if isinstance(sem_seg, torch.Tensor):
        sem_seg = sem_seg.detach().cpu().numpy()
    sem_seg = np.asarray(sem_seg)
    if sem_seg.shape != image.shape[:2]:
        raise ValueError(f"label map of shape {sem_seg.shape} does not match the image {image.shape[:2]}")
    if not getattr(metadata, "stuff_classes", None):
        raise ValueError(f"metadata {getattr(metadata, 'name', '?')!r} has no stuff_classes to name the labels")
    if not show_labels:
        metadata = Metadata(name=getattr(metadata, "name", "unnamed"),
                            stuff_classes=[""] * len(metadata.stuff_classes),
                            stuff_colors=getattr(metadata, "stuff_colors", None)
                            or token_colors(len(metadata.stuff_classes)).tolist())
    vis = Visualizer(image, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
    return vis.draw_sem_seg(sem_seg.astype(np.int64), area_threshold=area_threshold, alpha=alpha).get_image()


def _class_legend(fig, metadata, class_ids: Sequence[int], height_frac: float, ncol: int):
    names = metadata.stuff_classes
    colours = getattr(metadata, "stuff_colors", None)
    handles = []
    for c in class_ids:
        col = np.asarray(colours[c]) / 255.0 if colours is not None and c < len(colours) else (0.5, 0.5, 0.5)
        handles.append(Patch(facecolor=col, edgecolor="black", linewidth=0.5, label=names[c]))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=max(1, min(ncol, len(handles))), fontsize=8,
                   frameon=False, bbox_to_anchor=(0.5, 0.0), bbox_transform=fig.transFigure)


def panoptic_figure(image_rgb: np.ndarray, panels: Sequence[tuple], metadata, output_path: str, *,
                    panel_inches: float = 4.0, dpi: int = 100) -> str:
    """The image beside panoptic segmentations, each drawn by detectron2's
    ``Visualizer.draw_panoptic_seg`` (things named and coloured per instance, stuff per class).

    ``panels``: ``(title, segment ids (H, W), segments_info)`` each, ``segments_info`` as
    MaskFormer's ``panoptic_inference`` returns it and detectron2's panoptic loaders give it
    (``id``, contiguous ``category_id``, ``isthing``). The same segments get the same colours in
    every panel. Returns ``output_path``.
    """
    from detectron2.utils.visualizer import Visualizer

    image = check_image(image_rgb)
    scale = _render_scale(image.shape, panel_inches * dpi)
    drawn = [(image, "image")]
    for title, seg, info in panels:
        seg = torch.as_tensor(np.asarray(seg))
        if tuple(seg.shape) != image.shape[:2]:
            raise ValueError(f"panel {title!r}: segment map of shape {tuple(seg.shape)} does not match the "
                             f"image {image.shape[:2]}")
        vis = Visualizer(image, metadata, scale=scale)
        state = np.random.get_state()  # the Visualizer jitters thing colours with numpy's global RNG:
        np.random.seed(0)  # the same for every panel (and every run), the caller's RNG state untouched
        try:
            drawn.append((vis.draw_panoptic_seg(seg, info, alpha=0.6).get_image(),
                          f"{title} ({len(info)} segments)"))
        finally:
            np.random.set_state(state)
    return _panel_row(drawn, output_path, panel_inches, dpi)


# ----------------------------------------------------------------------------- concept regions
def concept_region_figure(image_rgb: np.ndarray, region_maps: ArrayOrTensor, output_path: str,
                          num_tokens_shown: int = 4, *, tokens: Optional[Sequence[int]] = None,
                          panel_inches: float = 3.0, dpi: int = 100, alpha: float = 0.55) -> str:
    """Save the image, its concept-region map and a few token heatmaps side by side.

    Args:
        image_rgb: (H, W, 3) uint8 RGB image.
        region_maps: (K, h, w) soft region maps P of the SGR component over the image (any
            resolution; bilinearly resized to the image).
        output_path: PNG file to write (its folder is created).
        num_tokens_shown: heatmaps of this many tokens, those with the most mass
            ``Σ_x P_k(x)`` (clipped to K; 0 shows none).
        tokens: explicit token indices to show instead (overrides ``num_tokens_shown``).
        panel_inches, dpi: each panel is ``panel_inches`` square.

    Panels: the image; the argmax-token map (each pixel coloured by its token of largest
    ``P_k``, with region borders in white) over the image; one heatmap of ``P_k`` in [0, 1]
    per shown token. The PNG is ``(2 + n) · panel_inches · dpi`` wide and
    ``panel_inches · dpi`` high, n = number of heatmaps. Returns ``output_path``.
    """
    image = check_image(image_rgb)
    h, w = image.shape[:2]
    p = upsample_regions(region_maps, (h, w))
    k = p.shape[0]
    mass = p.sum(dim=(1, 2))
    if tokens is not None:
        shown = [int(t) for t in tokens]
        bad = [t for t in shown if not 0 <= t < k]
        if bad:
            raise ValueError(f"tokens {bad} out of range: the region maps have K={k} tokens")
    else:
        if num_tokens_shown < 0:
            raise ValueError(f"num_tokens_shown must be >= 0, got {num_tokens_shown}")
        shown = torch.argsort(mass, descending=True)[: min(num_tokens_shown, k)].tolist()
    ncols = 2 + len(shown)
    fig, axes = plt.subplots(1, ncols, figsize=(ncols * panel_inches, panel_inches), dpi=dpi, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.88, wspace=0.04)
    axes = axes[0]
    axes[0].imshow(image)
    _blank_axis(axes[0], "image")
    arg = p.argmax(dim=0).numpy()
    colours = token_colors(k)
    axes[1].imshow(_overlay(image, colours[arg], alpha, _boundaries(arg)))
    _blank_axis(axes[1], f"concept regions ({len(np.unique(arg))} of K={k})")
    total = float(mass.sum()) or 1.0
    gray = np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)
    for ax, t in zip(axes[2:], shown):
        ax.imshow(gray)
        ax.imshow(p[t].numpy(), cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.7)
        _blank_axis(ax, f"token {t} ({100 * float(mass[t]) / total:.1f}% of mass)")
    return _save(fig, output_path, dpi)


# ----------------------------------------------------------------------------- segments
def segment_names(segment_classes: Sequence[int], class_names: Sequence[str]) -> List[str]:
    """``<class>_<j>`` for each segment, j counting the segments of that class from 1."""
    seen: Dict[int, int] = {}
    names = []
    for c in segment_classes:
        seen[int(c)] = seen.get(int(c), 0) + 1
        name = class_names[c] if 0 <= c < len(class_names) else f"class{c}"
        names.append(f"{name}_{seen[int(c)]}")
    return names


def draw_segments(image_rgb: np.ndarray, segment_ids: np.ndarray, names: Sequence[str],
                  alpha: float = 0.6, min_label_area: float = 0.002, scale: float = 1.0) -> np.ndarray:
    """Segments (ids ≥ 0 in ``segment_ids``) drawn by detectron2's Visualizer, distinct colours.

    Segments smaller than ``min_label_area`` of the image are coloured but not named.
    """
    from detectron2.utils.visualizer import Visualizer

    image = check_image(image_rgb)
    n = len(names)
    if n == 0:
        return image.copy()
    masks = [segment_ids == j for j in range(n)]
    colours = token_colors(n).astype(np.float64) / 255.0
    area = image.shape[0] * image.shape[1]
    labels = [nm if m.sum() >= min_label_area * area else "" for nm, m in zip(names, masks)]
    vis = Visualizer(image, None, scale=scale)
    return vis.overlay_instances(masks=masks, labels=labels, assigned_colors=list(colours), alpha=alpha).get_image()


def _generic_metadata(num_classes: int):
    from detectron2.data.catalog import Metadata

    return Metadata(name="generic", stuff_classes=[f"class {i}" for i in range(num_classes)],
                    stuff_colors=token_colors(num_classes).tolist())


# ----------------------------------------------------------------------------- Figure 1
def components_figure(image_rgb: Optional[np.ndarray], labels: ArrayOrTensor, output_path: str, metadata=None,
                      *, ignore_label: int = 255, panel_inches: float = 4.0, dpi: int = 100) -> str:
    """The ground-truth label map beside its connected components (supplementary Figure 1).

    Panels: the image (when given), the label map in the dataset's colours (detectron2's
    Visualizer over the image, or over black), the 8-connected components of each class
    (``sgr_d2.sgr.component_label_map``) in distinct colours, named ``<class>_<j>``.
    Size: ``ncols · panel_inches · dpi`` × ``panel_inches · dpi`` pixels, ncols = 3 with the
    image, 2 without. Returns ``output_path``.
    """
    from .sgr.components import component_label_map

    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an (H, W) integer map, got shape {labels.shape} dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if image_rgb is None:
        base = np.zeros((*labels.shape, 3), np.uint8)
    else:
        base = check_image(image_rgb)
        if base.shape[:2] != labels.shape:
            raise ValueError(f"image {base.shape[:2]} and label map {labels.shape} differ in size")
    valid = labels[labels != ignore_label]
    if metadata is None:
        metadata = _generic_metadata(int(valid.max()) + 1 if valid.size else 1)
    comp, comp_classes = component_label_map(labels, ignore_label=ignore_label)
    names = segment_names(comp_classes.tolist(), metadata.stuff_classes)
    panels = []
    if image_rgb is not None:
        panels.append((base, "image"))
    present = np.unique(valid)
    scale = _render_scale(base.shape, panel_inches * dpi)
    panels.append((draw_sem_seg(base, labels, metadata, alpha=0.7, scale=scale),
                   f"ground truth ({len(present)} classes)"))
    panels.append((draw_segments(base, comp, names, alpha=0.7, scale=scale),
                   f"connected components ({len(names)})"))
    return _panel_row(panels, output_path, panel_inches, dpi)


# ----------------------------------------------------------------------------- Figure 2
def token_histogram_figure(image_rgb: np.ndarray, region_maps: ArrayOrTensor, labels: ArrayOrTensor,
                           output_path: str, metadata, instances: Optional[ArrayOrTensor] = None, *,
                           tokens: Optional[Sequence[int]] = None, num_tokens: int = 2,
                           ignore_label: int = 255, max_bars: int = 10, panel_inches: float = 3.0,
                           dpi: int = 100) -> str:
    """Concept regions of chosen tokens with their instance- and class-level histograms (Figure 2).

    Columns: the image with its ground-truth instances (instance segments of
    :func:`sgr_d2.evaluation.instance_segments`, named ``<class>_<j>``; spans all rows), the
    token's region map ``P_k`` over the image, its instance histogram ``g_k`` and its class
    histogram ``h_k`` (docs/method.md#token-semantics-metrics-s_c-d_c-s_i-d_i; the ``max_bars`` largest bins). One row per token; the
    default tokens are the ``num_tokens`` with the most mass over the labelled pixels.
    Size: ``4 · panel_inches · dpi`` × ``rows · panel_inches · dpi`` pixels.
    """
    from .evaluation.token_semantics import class_segments, instance_segments, segment_masses

    image = check_image(image_rgb)
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    labels = np.asarray(labels).astype(np.int64)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and label map {labels.shape} differ in size")
    p = upsample_regions(region_maps, labels.shape)
    k = p.shape[0]
    cls_ids, classes = class_segments(labels, ignore_label)
    inst_ids, inst_classes = instance_segments(labels, instances, ignore_label)
    if len(classes) == 0:
        raise ValueError("the label map has no labelled pixel: nothing to histogram")
    mc, mi = segment_masses(p, [cls_ids, inst_ids], [len(classes), len(inst_classes)])
    mass = mc.sum(dim=1)
    if tokens is None:
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        tokens = torch.argsort(mass, descending=True)[: min(num_tokens, k)].tolist()
    tokens = [int(t) for t in tokens]
    bad = [t for t in tokens if not 0 <= t < k]
    if bad or not tokens:
        raise ValueError(f"tokens {bad or tokens} invalid: the region maps have K={k} tokens (0..{k - 1})")
    names = metadata.stuff_classes
    colours = getattr(metadata, "stuff_colors", None)
    inst_names = segment_names(inst_classes.tolist(), names)
    rows = len(tokens)
    fig = plt.figure(figsize=(4 * panel_inches, rows * panel_inches), dpi=dpi)
    gs = fig.add_gridspec(rows, 4, left=0.02, right=0.99, bottom=0.16 / rows, top=1 - 0.1 / rows,
                          wspace=0.3, hspace=0.6)
    ax = fig.add_subplot(gs[:, 0])
    ax.imshow(draw_segments(image, inst_ids, inst_names, alpha=0.6,
                            scale=_render_scale(image.shape, panel_inches * dpi)))
    _blank_axis(ax, f"image, {len(inst_names)} instances")
    total = float(mass.sum()) or 1.0
    for r, t in enumerate(tokens):
        ax = fig.add_subplot(gs[r, 1])
        ax.imshow(image)
        ax.imshow(p[t].numpy(), cmap="inferno", vmin=0.0, vmax=float(max(p[t].max(), 1e-6)), alpha=0.65)
        _blank_axis(ax, f"token {t} ({100 * float(mass[t]) / total:.1f}% of mass)")
        for col, (m, seg_names, seg_classes, title) in enumerate(
                [(mi[t], inst_names, inst_classes, "instance-level"),
                 (mc[t], [names[c] for c in classes], classes, "class-level")], start=2):
            hist = (m / m.sum()).numpy() if float(m.sum()) > 0 else m.numpy()
            order = np.argsort(-hist, kind="stable")[:max_bars]
            ax = fig.add_subplot(gs[r, col])
            bar_colours = [np.asarray(colours[seg_classes[j]]) / 255.0 if colours is not None else "tab:blue"
                           for j in order]
            ax.bar(np.arange(len(order)), hist[order], color=bar_colours, edgecolor="black", linewidth=0.4)
            ax.set_xticks(np.arange(len(order)))
            ax.set_xticklabels([seg_names[j] for j in order], rotation=60, ha="right", fontsize=7)
            ax.set_ylim(0, 1)
            ax.set_ylabel("P(w)", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            ax.set_title(title, fontsize=9)
    return _save(fig, output_path, dpi)


# ----------------------------------------------------------------------------- Figures 3-5
def qualitative_figure(rows: Sequence[Dict[str, object]], model_names: Sequence[str], output_path: str,
                       metadata, *, panel_inches: float = 2.5, legend_inches: float = 0.8,
                       legend_columns: int = 8, dpi: int = 100) -> str:
    """Image, ground truth and the predictions of several models side by side (Figures 3–5).

    ``rows``: one dict per image with ``"image"`` (H, W, 3) RGB, ``"labels"`` (H, W) class ids
    (ignore label allowed) and ``"predictions"``, one (H, W) class map per model (same order as
    ``model_names``). Maps are drawn in the dataset's colours (``metadata.stuff_colors``) by
    detectron2's Visualizer; a legend of every class that occurs in any panel runs below.
    Size: ``(2 + M) · panel_inches · dpi`` × ``(R · panel_inches + legend_inches) · dpi`` pixels
    for M models and R images.
    """
    if not rows:
        raise ValueError("qualitative_figure needs at least one image")
    m = len(model_names)
    num_classes = len(metadata.stuff_classes)
    ncols = 2 + m
    fig, axes = plt.subplots(len(rows), ncols, dpi=dpi, squeeze=False,
                             figsize=(ncols * panel_inches, len(rows) * panel_inches + legend_inches))
    height = len(rows) * panel_inches + legend_inches
    fig.subplots_adjust(left=0.005, right=0.995, top=1 - 0.3 / height, bottom=legend_inches / height,
                        wspace=0.03, hspace=0.03)
    used = set()
    titles = ["image", "ground truth"] + list(model_names)
    for r, row in enumerate(rows):
        image = check_image(row["image"])
        preds = list(row["predictions"])
        if len(preds) != m:
            raise ValueError(f"row {r} has {len(preds)} predictions for {m} models")
        maps = [np.asarray(row["labels"])] + [np.asarray(p) for p in preds]
        panels = [image]
        for mp in maps:
            if mp.shape != image.shape[:2]:
                raise ValueError(f"row {r}: a map of shape {mp.shape} does not match the image {image.shape[:2]}")
            used.update(int(c) for c in np.unique(mp) if 0 <= c < num_classes)
            panels.append(draw_sem_seg(image, mp, metadata, alpha=0.8, show_labels=False,
                                       scale=_render_scale(image.shape, panel_inches * dpi)))
        for c, (ax, img) in enumerate(zip(axes[r], panels)):
            ax.imshow(img)
            _blank_axis(ax, titles[c] if r == 0 else None, fontsize=9)
    _class_legend(fig, metadata, sorted(used), legend_inches / height, legend_columns)
    return _save(fig, output_path, dpi)
