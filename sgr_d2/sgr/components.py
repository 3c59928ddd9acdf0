"""Connected components of a semantic label map (docs/method.md#supervision-from-connected-components), 8-connectivity, per class,
and the instance-aware variant (:func:`instance_component_map`, ``MODEL.SGR.COMPONENTS "instances"``).

All classes are labelled in one pass over the map's horizontal runs: each row is cut into
maximal runs of one value, two runs of consecutive rows are linked when they hold the same
class and their column ranges, widened by one pixel on each side, overlap (that is exactly
8-adjacency), and the linked runs are grouped with ``scipy.sparse.csgraph``. The work is
linear in the number of pixels plus a graph over the runs (a few thousand for a 512x512
scene), instead of one labelling pass per class.
"""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as _graph_components

__all__ = ["connected_components", "component_label_map", "instance_component_map", "COMPONENT_MODES"]

# The values of MODEL.SGR.COMPONENTS: what the SGR losses match tokens to.
COMPONENT_MODES = ("connected", "instances")

ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_label_map(sem_seg: ArrayLike) -> np.ndarray:
    sem = sem_seg.cpu().numpy() if isinstance(sem_seg, torch.Tensor) else np.asarray(sem_seg)
    if sem.ndim != 2:
        raise ValueError(f"connected_components expects an (H, W) label map, got shape {sem.shape}")
    if not np.issubdtype(sem.dtype, np.integer):
        raise ValueError(f"connected_components expects an integer label map, got dtype {sem.dtype}")
    if sem.size and np.issubdtype(sem.dtype, np.signedinteger) and sem.min() < 0:
        raise ValueError(f"connected_components: negative label {int(sem.min())} in the label map")
    return sem


def _label(sem: np.ndarray, ignore_label: int, with_boxes: bool = False):
    """Returns ``(labels, classes[, boxes])``; see :func:`component_label_map`. ``boxes`` is
    (4, N): first row, last row, first column, last column + 1 of each component."""
    h, w = sem.shape
    if sem.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        out = (np.full((h, w), -1, dtype=np.int32), empty)
        return out + (np.zeros((4, 0), dtype=np.int64),) if with_boxes else out
    # Runs: a run starts at every column 0 and wherever the value changes along the row.
    change = np.empty((h, w), dtype=bool)
    change[:, 0] = True
    np.not_equal(sem[:, 1:], sem[:, :-1], out=change[:, 1:])
    starts = np.flatnonzero(change)
    num_runs = len(starts)
    run_class = sem.reshape(-1)[starts]
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1] = h * w
    row = starts // w
    first_col = starts - row * w
    end_col = ends - row * w  # exclusive
    # For each run below the first row, the runs of the row above that touch it (8-adjacency:
    # columns first_col - 1 .. end_col) form a contiguous index range [lo, hi].
    below = np.flatnonzero(row > 0)
    above_base = (row[below] - 1) * w
    lo = np.searchsorted(starts, above_base + np.maximum(first_col[below] - 1, 0), "right") - 1
    hi = np.searchsorted(starts, above_base + np.minimum(end_col[below], w - 1), "right") - 1
    span = hi - lo + 1
    src = np.repeat(below, span)
    dst = np.repeat(lo - (np.cumsum(span) - span), span) + np.arange(len(src))
    same = run_class[src] == run_class[dst]
    src, dst = src[same], dst[same]
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(num_runs, num_runs))
    num_groups, group = _graph_components(graph.tocsr(), directed=False)
    # Number components by class, then by raster order of their first pixel (the order
    # scipy.ndimage.label gives within one class); runs of the ignore label get -1.
    first_run = np.full(num_groups, num_runs, dtype=np.int64)
    np.minimum.at(first_run, group, np.arange(num_runs))
    group_class = run_class[first_run]
    order = np.argsort(group_class, kind="stable")
    order = order[group_class[order] != ignore_label]
    new_id = np.full(num_groups, -1, dtype=np.int32)
    new_id[order] = np.arange(len(order), dtype=np.int32)
    run_label = new_id[group]
    labels = np.repeat(run_label, ends - starts).reshape(h, w)
    classes = group_class[order].astype(np.int64)
    if not with_boxes:
        return labels, classes
    n = len(order)
    boxes = np.empty((4, n + 1), dtype=np.int64)  # column n collects the ignore runs
    boxes[0], boxes[1], boxes[2], boxes[3] = h, -1, w, -1
    np.minimum.at(boxes[0], run_label, row)
    np.maximum.at(boxes[1], run_label, row)
    np.minimum.at(boxes[2], run_label, first_col)
    np.maximum.at(boxes[3], run_label, end_col)
    return labels, classes, boxes[:, :n]


def component_label_map(sem_seg: ArrayLike, ignore_label: int = 255) -> Tuple[np.ndarray, np.ndarray]:
    """Label every 8-connected region of equal class.

    Returns ``(labels, classes)``: ``labels`` (H, W) int32 with -1 on ignore pixels and
    0..N-1 elsewhere, ``classes`` (N,) int64, the class of each component. Components are
    ordered by class, then by the raster order (row-major) of their first pixel.
    """
    return _label(_as_label_map(sem_seg), ignore_label)


def connected_components(sem_seg: ArrayLike, ignore_label: int = 255) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split a semantic map into the 8-connected regions of each class (ignore label excluded).

    Args:
        sem_seg: (H, W) integer label map (numpy array or tensor).
        ignore_label: pixels with this value belong to no component.

    Returns:
        masks: bool tensor (N, H, W), one per component, in the order of
            :func:`component_label_map`;
        classes: int64 tensor (N,), the class of each component.
    """
    labels, classes, boxes = _label(_as_label_map(sem_seg), ignore_label, with_boxes=True)
    masks = np.zeros((len(classes), *labels.shape), dtype=bool)
    for j, (r0, r1, c0, c1) in enumerate(boxes.T.tolist()):
        np.equal(labels[r0:r1 + 1, c0:c1], j, out=masks[j, r0:r1 + 1, c0:c1])
    return torch.from_numpy(masks), torch.as_tensor(classes, dtype=torch.int64)


def instance_component_map(sem_seg: ArrayLike, instances: ArrayLike = None,
                           ignore_label: int = 255) -> Tuple[np.ndarray, np.ndarray]:
    """Components where ground-truth instances are known: ``(labels, classes)`` as
    :func:`component_label_map` gives them, ``labels`` (H, W) int32 (-1 = none).

    ``instances`` (H, W): > 0 = id of a ground-truth instance, 0 = none. Each (class, instance
    id) pair of labelled pixels is one component, whether or not it is connected (two touching
    objects of one class are two components; one object cut in two by an occluder is one).
    Labelled pixels without an instance (stuff, crowd regions, or no instance map at all:
    ``instances=None``) are split into the 8-connected components of their class. Instance
    components come first, sorted by class then instance id, then the connected ones in the
    order of :func:`component_label_map`.
    """
    sem = _as_label_map(sem_seg)
    if instances is None:
        return _label(sem, ignore_label)
    inst = instances.cpu().numpy() if isinstance(instances, torch.Tensor) else np.asarray(instances)
    if inst.shape != sem.shape:
        raise ValueError(f"instance map of shape {inst.shape} does not match the label map {sem.shape}")
    if not np.issubdtype(inst.dtype, np.integer):
        raise ValueError(f"instance map must hold integers, got dtype {inst.dtype}")
    has = (sem != ignore_label) & (inst > 0)
    labels = np.full(sem.shape, -1, dtype=np.int32)
    pairs = np.stack([sem[has].astype(np.int64), inst[has].astype(np.int64)], axis=1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    labels[has] = inverse.reshape(-1)
    rest, rest_classes = _label(np.where(has, ignore_label, sem), ignore_label)
    sel = rest >= 0
    labels[sel] = rest[sel] + len(uniq)
    return labels, np.concatenate([uniq[:, 0], rest_classes]).astype(np.int64)
