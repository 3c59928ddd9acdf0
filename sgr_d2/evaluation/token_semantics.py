"""Token-semantics metrics S_C, D_C, S_I, D_I (definitions: docs/method.md#token-semantics-metrics-s_c-d_c-s_i-d_i).

Pure functions first (no detectron2), then the detectron2 ``DatasetEvaluator``.

For one image with region maps P (K, h, w), resized bilinearly to the label map's size, and the
labelled pixels V (ignore label dropped):

* ``m_k = Σ_{x∈V} P_k(x)`` is token k's mass, ``w_k(x) = P_k(x) / m_k``;
* over a partition of V into segments (classes, or instances), the histogram of token k is
  ``h_k(s) = Σ_{x∈s} w_k(x)``;
* **S** = mean, over the tokens with ``m_k > 0``, of ``1 − H(h_k) / log N`` (N = segments in the
  image, natural log, 0·log 0 = 0);
* **D** = |{argmax_s h_k(s) : k carries mass}| / N, where token k *carries mass* when
  ``m_k ≥ min_mass_fraction · (Σ_j m_j) / K`` (default 0.1: a tenth of an equal share of the
  labelled pixels; ties in the argmax go to the lowest segment index);
* images with fewer than 2 segments give no value (NaN) and are skipped in the averages.

Class segments are the classes present. Instance segments are the ground-truth instances
where an instance map gives them (pixel value > 0; for Cityscapes ``*_gtFine_instanceIds.png``
values ≥ 1000; for a panoptic dataset the non-crowd segments of its thing classes) and, for
every other labelled pixel, the 8-connected components of its class.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.nn import functional as F

from detectron2.evaluation import DatasetEvaluator

from ..data.datasets.layout import instance_map_path
from ..data.labels import (check_label_values, panoptic_maps, read_id_map, read_instance_map,
                           read_panoptic_png, read_sem_seg_checked, rgb2id)
from ..sgr.components import instance_component_map
from .sem_seg import _nanmean

__all__ = [
    "DEFAULT_MIN_MASS_FRACTION",
    "segment_masses",
    "semantics_from_masses",
    "class_segments",
    "instance_segments",
    "image_token_semantics",
    "read_label_map",
    "read_instance_map",
    "TokenSemanticsEvaluator",
    "METRIC_KEYS",
    "summarize",
]

logger = logging.getLogger(__name__)

DEFAULT_MIN_MASS_FRACTION = 0.1
METRIC_KEYS = ("S_C", "D_C", "S_I", "D_I")

ArrayOrTensor = Union[np.ndarray, torch.Tensor]


# ----------------------------------------------------------------------------- segments
def _as_label_array(labels: ArrayOrTensor, name: str) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name} must be an (H, W) map, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def class_segments(labels: ArrayOrTensor, ignore_label: int = 255) -> Tuple[np.ndarray, np.ndarray]:
    """Segment ids of the class partition: ``(ids (H, W) int64, -1 on ignore; classes (N,))``.

    Segment j is the j-th smallest class id present (ignore label excluded).
    """
    y = _as_label_array(labels, "labels")
    valid = y != ignore_label
    classes, inverse = np.unique(y[valid], return_inverse=True)
    ids = np.full(y.shape, -1, np.int64)
    ids[valid] = inverse.reshape(-1)
    return ids, classes.astype(np.int64)


def instance_segments(labels: ArrayOrTensor, instances: Optional[ArrayOrTensor] = None,
                      ignore_label: int = 255) -> Tuple[np.ndarray, np.ndarray]:
    """Segment ids of the instance partition: ``(ids (H, W) int64, -1 on ignore; classes (N,))``.

    ``instances`` (H, W): > 0 = id of a ground-truth instance, 0 = none. A segment is one
    (class, instance id) pair; labelled pixels without an instance (stuff, crowd regions, or
    no instance map at all) are split into the 8-connected components of their class.
    Instance segments come first (sorted by class, then id), then the components.
    """
    y = _as_label_array(labels, "labels")
    inst = None if instances is None else _as_label_array(instances, "instance map")
    ids, classes = instance_component_map(y, inst, ignore_label)
    return ids.astype(np.int64), classes


# ----------------------------------------------------------------------------- core
def segment_masses(region_maps: ArrayOrTensor, segment_ids: List[ArrayOrTensor],
                   num_segments: List[int], max_floats: int = 1 << 25) -> List[torch.Tensor]:
    """``M[k, s] = Σ_{x ∈ segment s} P_k(x)`` for one or several partitions of the same pixels.

    ``region_maps`` (K, h, w) are resized bilinearly (align_corners=False, which keeps
    ``Σ_k P_k(x)``) to the size (H, W) of the segment-id maps, a chunk of tokens at a time so
    that about ``max_floats`` values are held at once. Pixels with a negative id (ignore) are
    left out; every partition must leave out the same pixels. Returns one float64 (K, N) tensor
    per partition, on the CPU.
    """
    p = region_maps if isinstance(region_maps, torch.Tensor) else torch.from_numpy(np.asarray(region_maps))
    if p.dim() != 3 or min(p.shape) == 0:
        raise ValueError(f"region maps must have shape (K, h, w) with K, h, w >= 1, got {tuple(p.shape)}")
    if not torch.is_floating_point(p):
        p = p.float()
    if not torch.isfinite(p).all():
        raise ValueError("region maps hold NaN or infinite values")
    if (p < 0).any():
        raise ValueError(f"region maps must be non-negative (min {float(p.min()):.3g})")
    ids_list = [torch.as_tensor(np.asarray(s) if not isinstance(s, torch.Tensor) else s) for s in segment_ids]
    size = tuple(ids_list[0].shape)
    for s in ids_list:
        if tuple(s.shape) != size:
            raise ValueError(f"segment maps of different shapes: {size} vs {tuple(s.shape)}")
    device = p.device
    k = p.shape[0]
    valid = (ids_list[0] >= 0).reshape(-1).to(device)
    for s in ids_list[1:]:
        if not torch.equal((s >= 0).reshape(-1).to(device), valid):
            raise ValueError("the segment maps do not label the same pixels (negative ids differ)")
    flat_ids = [s.reshape(-1).to(device)[valid] for s in ids_list]
    out = [torch.zeros(k, n, dtype=torch.float64, device=device) for n in num_segments]
    for s, n in zip(flat_ids, num_segments):
        if s.numel() and int(s.max()) >= n:
            raise ValueError(f"segment id {int(s.max())} >= number of segments {n}")
    chunk = max(1, max_floats // max(1, size[0] * size[1]))
    for start in range(0, k, chunk):
        part = p[start:start + chunk].float()
        if tuple(part.shape[-2:]) != size:
            part = F.interpolate(part[None], size=size, mode="bilinear", align_corners=False)[0]
        part = part.reshape(part.shape[0], -1)[:, valid].double()
        for o, s in zip(out, flat_ids):
            o[start:start + part.shape[0]].index_add_(1, s, part)
    return [o.cpu() for o in out]


def semantics_from_masses(masses: torch.Tensor,
                          min_mass_fraction: float = DEFAULT_MIN_MASS_FRACTION) -> Tuple[float, float, int]:
    """(S, D, number of tokens carrying mass) from token-by-segment masses M (K, N).

    ``S = mean_{k: m_k>0} (1 − H(h_k) / log N)``, ``D = |{argmax h_k : m_k ≥ f·Σm/K}| / N``
    with ``h_k = M[k] / m_k``, ``m_k = Σ_s M[k, s]``, f = ``min_mass_fraction``.
    NaN for both when N < 2 or no token has mass.
    """
    if masses.dim() != 2:
        raise ValueError(f"masses must be (K, N), got {tuple(masses.shape)}")
    if not 0.0 <= min_mass_fraction <= 1.0:
        raise ValueError(f"min_mass_fraction must lie in [0, 1], got {min_mass_fraction}")
    m = masses.double()
    k, n = m.shape
    mass = m.sum(dim=1)
    if n < 2 or not bool((mass > 0).any()):
        return math.nan, math.nan, 0
    used = mass > 0
    h = m[used] / mass[used, None]
    ent = -(h * torch.log(h.clamp_min(1e-300))).sum(dim=1)
    s = float((1.0 - ent / math.log(n)).mean())
    carrying = mass >= min_mass_fraction * float(mass.sum()) / k
    carrying &= used
    dominant = torch.argmax(m[carrying], dim=1) if bool(carrying.any()) else torch.zeros(0, dtype=torch.long)
    d = len(set(dominant.tolist())) / n
    return s, d, int(carrying.sum())


def image_token_semantics(region_maps: ArrayOrTensor, labels: ArrayOrTensor,
                          instances: Optional[ArrayOrTensor] = None, *, ignore_label: int = 255,
                          min_mass_fraction: float = DEFAULT_MIN_MASS_FRACTION) -> Dict[str, float]:
    """S_C, D_C, S_I, D_I of one image.

    Args:
        region_maps: (K, h, w) region maps over the image (any resolution; resized to the labels).
        labels: (H, W) ground-truth class ids; ``ignore_label`` pixels are dropped.
        instances: optional (H, W) instance ids (> 0 = instance, 0 = none); see
            :func:`instance_segments`. Without it the instances are the connected components.
        min_mass_fraction: f in the "carries mass" rule of D (see the module docstring).

    Returns a dict with ``S_C, D_C, S_I, D_I`` (NaN where the image has fewer than 2 classes,
    resp. instances), ``num_classes``, ``num_instances``, ``tokens_with_mass_C/_I``.
    """
    cls_ids, classes = class_segments(labels, ignore_label)
    inst_ids, inst_classes = instance_segments(labels, instances, ignore_label)
    mc, mi = segment_masses(region_maps, [cls_ids, inst_ids], [len(classes), len(inst_classes)])
    s_c, d_c, n_c = semantics_from_masses(mc, min_mass_fraction)
    s_i, d_i, n_i = semantics_from_masses(mi, min_mass_fraction)
    return {"S_C": s_c, "D_C": d_c, "S_I": s_i, "D_I": d_i, "num_classes": int(len(classes)),
            "num_instances": int(len(inst_classes)), "tokens_with_mass_C": n_c, "tokens_with_mass_I": n_i}


# ----------------------------------------------------------------------------- files
def read_label_map(path: str, num_classes: Optional[int] = None, ignore_label: int = 255) -> np.ndarray:
    """A single-channel label PNG as (H, W) int64; errors name the file and the bad values."""
    y = read_id_map(path, "label").astype(np.int64)
    if num_classes is not None:
        check_label_values(y, path, num_classes, ignore_label)
    return y


# ----------------------------------------------------------------------------- evaluator
def summarize(per_image: List[Dict[str, float]]) -> Dict[str, float]:
    """Dataset averages of per-image results: each metric over the images where it is defined."""
    return {key: _nanmean(r[key] for r in per_image) for key in METRIC_KEYS}


class TokenSemanticsEvaluator(DatasetEvaluator):
    """detectron2 ``DatasetEvaluator`` for S_C, D_C, S_I, D_I, averaged over a dataset's images.

    Reads each image's label map (``sem_seg_file_name`` of its dataset dict) and, when the dict
    has one, its instance map (``instance_file_name``, or the Cityscapes ``*_instanceIds.png``,
    or the thing segments of its panoptic annotation: ``pan_seg_file_name``, ``segments_info``);
    the region maps are the model output's ``"sgr_regions"`` (K, h, w). Each metric is averaged
    over the images where it is defined (≥ 2 classes, resp. instances). Per-worker results are
    gathered with ``detectron2.utils.comm``.

    ``evaluate()`` returns ``{"token_semantics": {"S_C", "D_C", "S_I", "D_I"}}`` and, with an
    ``output_dir``, writes ``<output_dir>/token_semantics.json`` (the averages, the number of
    images behind each, K and the mass fraction). Outputs without ``"sgr_regions"`` (a model
    without SGR, test-time augmentation) are counted and skipped; when no output has them,
    ``evaluate()`` warns and returns ``{}``.
    """

    def __init__(self, dataset_name: str, distributed: bool = True, output_dir: Optional[str] = None, *,
                 min_mass_fraction: float = DEFAULT_MIN_MASS_FRACTION):
        from detectron2.data import DatasetCatalog, MetadataCatalog

        if not 0.0 <= min_mass_fraction <= 1.0:
            raise ValueError(f"min_mass_fraction must lie in [0, 1], got {min_mass_fraction}")
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._min_mass_fraction = min_mass_fraction
        meta = MetadataCatalog.get(dataset_name)
        self._ignore_label = int(meta.get("ignore_label", 255))
        classes = meta.get("stuff_classes", None)
        self._num_classes = len(classes) if classes else None
        self._things = frozenset(meta.get("thing_dataset_id_to_contiguous_id", {}).values())
        self._files = {}
        for d in DatasetCatalog.get(dataset_name):
            if "sem_seg_file_name" not in d:
                raise KeyError(f"dataset {dataset_name!r}: the dict of {d.get('file_name')} has no "
                               "'sem_seg_file_name'; token semantics (TEST.TOKEN_SEMANTICS) need ground-truth "
                               "label maps, which an instance-only dataset does not have (a panoptic one does)")
            instances = instance_map_path(d)
            if instances is None and "pan_seg_file_name" in d:
                instances = (d["pan_seg_file_name"], d["segments_info"])
            self._files[d["file_name"]] = (d["sem_seg_file_name"], instances)
        self.reset()

    def reset(self):
        self._per_image: List[Dict[str, float]] = []
        self._missing = 0
        self._num_tokens = None

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            regions = out.get("sgr_regions")
            if regions is None:
                self._missing += 1
                continue
            name = inp.get("file_name")
            if name not in self._files:
                raise KeyError(f"image {name!r} is not in dataset {self._dataset_name!r}")
            label_file, inst_file = self._files[name]
            if "height" in inp and "width" in inp:  # also check the label's size against the image's
                labels = read_sem_seg_checked(label_file, (inp["height"], inp["width"]), self._num_classes,
                                              self._ignore_label).astype(np.int64)
            else:
                labels = read_label_map(label_file, self._num_classes, self._ignore_label)
            if isinstance(inst_file, tuple):  # a panoptic annotation: its thing segments
                ids = rgb2id(read_panoptic_png(inst_file[0], labels.shape))
                instances = panoptic_maps(ids, inst_file[1], self._things, self._ignore_label)[1]
            else:
                instances = read_instance_map(inst_file, labels.shape) if inst_file else None
            r = image_token_semantics(regions, labels, instances, ignore_label=self._ignore_label,
                                      min_mass_fraction=self._min_mass_fraction)
            r["file_name"] = name
            self._per_image.append(r)
            self._num_tokens = int(regions.shape[0])

    def evaluate(self):
        from detectron2.utils import comm

        per_image, missing, num_tokens = self._per_image, self._missing, self._num_tokens
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather((per_image, missing, num_tokens), dst=0)
            if not comm.is_main_process():
                return {}
            per_image = list(itertools.chain(*[g[0] for g in gathered]))
            missing = sum(g[1] for g in gathered)
            num_tokens = next((g[2] for g in gathered if g[2] is not None), None)
        if not per_image:
            logger.warning(f"TokenSemanticsEvaluator on {self._dataset_name}: no model output carried "
                           f"'sgr_regions' ({missing} images): a model without SGR, or test-time "
                           "augmentation; token semantics not computed")
            return {}
        if missing:
            logger.warning(f"TokenSemanticsEvaluator: {missing} outputs without 'sgr_regions' were skipped")
        res = summarize(per_image)
        counts = {f"images_{k}": int(sum(not math.isnan(r[k]) for r in per_image)) for k in METRIC_KEYS}
        for key in METRIC_KEYS:
            if math.isnan(res[key]):
                logger.warning(f"TokenSemanticsEvaluator on {self._dataset_name}: {key} is undefined "
                               "(no image with at least two classes / instances)")
        logger.info("Token semantics on %s (K=%s, %d images): %s", self._dataset_name, num_tokens,
                    len(per_image), ", ".join(f"{k}={res[k]:.4f}" for k in METRIC_KEYS))
        if self._output_dir:
            from detectron2.utils.file_io import PathManager

            PathManager.mkdirs(self._output_dir)
            record = {"dataset": self._dataset_name, "num_tokens": num_tokens,
                      "min_mass_fraction": self._min_mass_fraction, "num_images": len(per_image),
                      "skipped_without_regions": missing, **counts,
                      **{k: (None if math.isnan(v) else v) for k, v in res.items()}}
            path = os.path.join(self._output_dir, "token_semantics.json")
            with PathManager.open(path, "w") as f:
                json.dump(record, f, indent=2)
        return OrderedDict({"token_semantics": res})
