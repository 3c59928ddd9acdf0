"""Connected components of a semantic label map (SGR_SPEC §2), 8-connectivity, per class."""
from __future__ import annotations

from typing import Iterator, Tuple, Union

import cv2
import numpy as np
import torch

__all__ = ["connected_components", "component_label_map"]

ArrayLike = Union[np.ndarray, torch.Tensor]


def _per_class_components(sem_seg: ArrayLike, ignore_label: int) -> Iterator[Tuple[int, tuple, np.ndarray, int]]:
    """Yield ``(class, box, comp, count)`` for every class present (ignore label excluded).

    ``box`` is the class's bounding box as a pair of slices, ``comp`` the OpenCV labelling of
    the class inside that box (0 = other pixels, 1..count-1 = the class's components).
    """
    sem = sem_seg.cpu().numpy() if isinstance(sem_seg, torch.Tensor) else np.asarray(sem_seg)
    if sem.ndim != 2:
        raise ValueError(f"connected_components expects an (H, W) label map, got shape {sem.shape}")
    if not np.issubdtype(sem.dtype, np.integer):
        raise ValueError(f"connected_components expects an integer label map, got dtype {sem.dtype}")
    if sem.size == 0:
        return
    if sem.min() < 0:
        raise ValueError(f"connected_components: negative label {int(sem.min())} in the label map")
    h, w = sem.shape
    vmax = int(sem.max()) + 1
    # Bounding box of every class value from two histograms (class per row, class per column);
    # then each class is labelled inside its own box only.
    flat = sem.astype(np.int64, copy=False)
    rows = np.bincount((flat + vmax * np.arange(h)[:, None]).ravel(), minlength=h * vmax)
    cols = np.bincount((flat + vmax * np.arange(w)[None, :]).ravel(), minlength=w * vmax)
    rows = rows.reshape(h, vmax) > 0
    cols = cols.reshape(w, vmax) > 0
    for c in np.flatnonzero(rows.any(axis=0)):
        c = int(c)
        if c == ignore_label:
            continue
        r = np.flatnonzero(rows[:, c])
        q = np.flatnonzero(cols[:, c])
        box = (slice(r[0], r[-1] + 1), slice(q[0], q[-1] + 1))
        count, comp = cv2.connectedComponents((sem[box] == c).view(np.uint8), connectivity=8,
                                              ltype=cv2.CV_32S)
        yield c, box, comp, count


def component_label_map(sem_seg: ArrayLike, ignore_label: int = 255) -> Tuple[np.ndarray, np.ndarray]:
    """Label every 8-connected region of equal class.

    Returns ``(labels, classes)``: ``labels`` (H, W) int32 with -1 on ignore pixels and
    0..N-1 elsewhere, ``classes`` (N,) int64, the class of each component. Components are
    ordered by class, then by OpenCV's order inside the class's bounding box.
    """
    shape = tuple(sem_seg.shape)
    labels = np.full(shape, -1, dtype=np.int32)
    classes = []
    for c, box, comp, count in _per_class_components(sem_seg, ignore_label):
        np.copyto(labels[box], comp + (len(classes) - 1), where=comp > 0)
        classes.extend([c] * (count - 1))
    return labels, np.asarray(classes, dtype=np.int64)


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
    shape = tuple(sem_seg.shape)
    parts, classes = [], []
    for c, box, comp, count in _per_class_components(sem_seg, ignore_label):
        parts.append((box, comp, count))
        classes.extend([c] * (count - 1))
    masks = np.zeros((len(classes), *shape), dtype=bool)
    n = 0
    for box, comp, count in parts:
        ids = np.arange(1, count, dtype=np.int32).reshape(-1, 1, 1)
        masks[n:n + count - 1, box[0], box[1]] = comp[None] == ids
        n += count - 1
    return torch.from_numpy(masks), torch.as_tensor(classes, dtype=torch.int64)
