"""Reading label and instance maps with checks whose errors name the file: what the training
mapper (:mod:`sgr_d2.data.dataset_mapper`) and the evaluators (:mod:`sgr_d2.evaluation`) share."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from detectron2.data import detection_utils as utils

__all__ = ["read_id_map", "check_label_values", "read_sem_seg_checked"]


def read_id_map(path: str, kind: str = "label") -> np.ndarray:
    """A single-channel PNG of ids (``kind``: "label" for class ids, "instance" for instance
    ids) as an (H, W) array of its stored dtype; every error names the file."""
    try:
        ids = utils.read_image(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{kind} file {path} does not exist") from None
    except Exception as e:
        raise ValueError(f"cannot read {kind} file {path}: {type(e).__name__}: {e}") from e
    if ids.ndim == 3:
        if ids.shape[2] != 1:
            raise ValueError(
                f"{kind} file {path} has {ids.shape[2]} channels; expected a single-channel PNG of {kind} ids"
            )
        ids = ids[:, :, 0]
    return ids


def check_label_values(sem: np.ndarray, path: str, num_classes: int, ignore_label: int) -> None:
    """Every value of a label map is a class id (0..num_classes-1) or the ignore label."""
    bad = np.unique(sem[((sem >= num_classes) & (sem != ignore_label)) | (sem < 0)])
    if bad.size:
        raise ValueError(
            f"label file {path} holds values {bad[:10].tolist()} outside the class range "
            f"0..{num_classes - 1} (ignore label {ignore_label}); was the dataset prepared "
            "with its datasets/prepare_*.py script?"
        )


def read_sem_seg_checked(path: str, image_shape: Tuple[int, int], num_classes: Optional[int],
                         ignore_label: int) -> np.ndarray:
    """Read a label PNG and check its size against the image and its values against the classes."""
    sem = read_id_map(path, "label")
    if tuple(sem.shape[:2]) != tuple(image_shape[:2]):
        raise ValueError(
            f"label file {path} is {sem.shape[1]}x{sem.shape[0]} (WxH) but its image is "
            f"{image_shape[1]}x{image_shape[0]}; a label map must have its image's size"
        )
    if num_classes is not None:
        check_label_values(sem, path, num_classes, ignore_label)
    # uint8 maps go through PIL in detectron2's transforms; others through torch, as doubles.
    return sem if sem.dtype == np.uint8 else sem.astype(np.float64)
