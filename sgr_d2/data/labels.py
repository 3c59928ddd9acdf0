"""Reading label, instance and panoptic maps with checks whose errors name the file: what the
training mappers (:mod:`sgr_d2.data.dataset_mapper`, :mod:`sgr_d2.data.mappers`), the
evaluators (:mod:`sgr_d2.evaluation`) and the ``datasets/prepare_*.py`` scripts share.

Panoptic PNGs use the COCO panoptic encoding: segment id = R + 256·G + 256²·B, 0 = VOID
(:func:`rgb2id` / :func:`id2rgb`, the functions of ``panopticapi.utils`` of the same names)."""
from __future__ import annotations

from typing import Collection, Iterable, Mapping, Optional, Tuple

import numpy as np

from detectron2.data import detection_utils as utils

__all__ = ["read_id_map", "check_label_values", "read_sem_seg_checked", "read_instance_map", "rgb2id", "id2rgb",
           "read_panoptic_png", "panoptic_maps", "CITYSCAPES_INSTANCE_SUFFIX"]

CITYSCAPES_INSTANCE_SUFFIX = "_gtFine_instanceIds.png"
CITYSCAPES_MIN_INSTANCE_ID = 1000  # label_id * 1000 + k for instance k of a "thing" class


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


def read_instance_map(path: str, shape: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """An instance-id PNG as (H, W) int64 with 0 where a pixel has no instance.

    Cityscapes ``*_gtFine_instanceIds.png`` store ``label_id`` (< 1000) for stuff and crowd
    regions and ``label_id · 1000 + k`` for instances: values below 1000 become 0.
    """
    inst = read_id_map(path, "instance").astype(np.int64)
    if shape is not None and inst.shape != tuple(shape):
        raise ValueError(f"instance file {path} is {inst.shape[1]}x{inst.shape[0]} (WxH) but its label map is "
                         f"{shape[1]}x{shape[0]}")
    if path.endswith(CITYSCAPES_INSTANCE_SUFFIX):
        inst[inst < CITYSCAPES_MIN_INSTANCE_ID] = 0
    return inst


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """Segment ids (H, W) int64 of a panoptic PNG's (H, W, 3) colors: R + 256·G + 256²·B."""
    rgb = np.asarray(rgb).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """The (H, W, 3) uint8 colors of segment ids (H, W) (0 <= id < 256³), inverse of :func:`rgb2id`."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 24):
        raise ValueError(f"panoptic segment ids must lie in 0..{(1 << 24) - 1}, got {int(ids.min())}..{int(ids.max())}")
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def read_panoptic_png(path: str, image_shape: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """A COCO-format panoptic PNG as its (H, W, 3) uint8 colors (decode with :func:`rgb2id`);
    an unreadable or missing file, or one of another size than its image, is an error naming
    the file."""
    try:
        rgb = utils.read_image(path, format="RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"panoptic file {path} does not exist") from None
    except Exception as e:
        raise ValueError(f"cannot read panoptic file {path}: {type(e).__name__}: {e}") from e
    if image_shape is not None and tuple(rgb.shape[:2]) != tuple(image_shape[:2]):
        raise ValueError(
            f"panoptic file {path} is {rgb.shape[1]}x{rgb.shape[0]} (WxH) but its image is "
            f"{image_shape[1]}x{image_shape[0]}; a panoptic map must have its image's size"
        )
    return rgb


def panoptic_maps(ids: np.ndarray, segments_info: Iterable[Mapping], thing_classes: Collection[int],
                  ignore_label: int, crowd_labels: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """``(labels, instances)`` of a panoptic id map: ``labels`` (H, W) int64 holds the
    ``category_id`` of every non-crowd segment (``crowd_labels=True``: of crowd ones too) and
    ``ignore_label`` elsewhere (VOID, ids without a segment); ``instances`` (H, W) int64 holds
    the segment id on the non-crowd segments of a thing class and 0 elsewhere. A segment is a
    thing by its ``isthing`` entry, else by its category being in ``thing_classes``."""
    ids = np.asarray(ids)
    uniq, inverse = np.unique(ids, return_inverse=True)
    where = {int(v): j for j, v in enumerate(uniq.tolist())}
    label_of = np.full(len(uniq), ignore_label, dtype=np.int64)
    instance_of = np.zeros(len(uniq), dtype=np.int64)
    for seg in segments_info:
        j = where.get(int(seg["id"]))
        crowd = bool(seg.get("iscrowd", 0))
        if j is None or int(seg["id"]) == 0 or (crowd and not crowd_labels):
            continue
        label_of[j] = int(seg["category_id"])
        if crowd:
            continue
        isthing = seg.get("isthing")
        if isthing is None:
            isthing = int(seg["category_id"]) in thing_classes
        if isthing:
            instance_of[j] = int(seg["id"])
    inverse = inverse.reshape(ids.shape)
    return label_of[inverse], instance_of[inverse]
