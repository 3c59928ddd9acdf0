"""Reading a dataset's images and labels, and running a trained model on an image: what the
figure tools, the demo and ``tools/demo_toy.py`` hand to the drawing functions
(:mod:`sgr_d2.visualization`).

The predictor is :func:`build_predictor` (detectron2's ``DefaultPredictor``, its weights loaded
through the fit check); :func:`predictor_config` reads the config it is built from.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import numpy as np
import torch

__all__ = ["OUTPUT_SWITCHES", "build_predictor", "check_image", "dataset_item", "predict", "predictor_config",
           "read_labelled_image", "training_batch"]


def check_image(image_rgb, name: str = "image_rgb") -> np.ndarray:
    """``image_rgb`` as a (H, W, 3) uint8 array; a clear ValueError otherwise."""
    if isinstance(image_rgb, torch.Tensor):
        image_rgb = image_rgb.detach().cpu().numpy()
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must be an (H, W, 3) RGB image, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {image.shape})")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and image.size and image.max() <= 1.0:
            image = image * 255.0
        image = np.clip(image, 0, 255).astype(np.uint8)
    return image


def predictor_config(config_file: str, weights: str, opts: Sequence[str] = ()):
    """The frozen config of a predictor: ``config_file`` read by :func:`sgr_d2.config.load_config`
    with ``opts`` and ``MODEL.WEIGHTS weights``; a config asking for CUDA on a machine without it
    runs on the CPU. A missing checkpoint is a FileNotFoundError naming it."""
    from .config import load_config

    if not weights or not os.path.isfile(weights):
        raise FileNotFoundError(f"checkpoint {weights!r} does not exist")
    cfg = load_config(config_file, list(opts) + ["MODEL.WEIGHTS", weights])
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def build_predictor(cfg):
    """detectron2's ``DefaultPredictor`` for ``cfg`` (input format, test resize, eval mode), its
    weights ``cfg.MODEL.WEIGHTS`` loaded by :func:`sgr_d2.engine.load_weights` (``DefaultPredictor`` alone would
    load them with detectron2's unchecked checkpointer)."""
    from detectron2.engine import DefaultPredictor

    from .engine.checkpoint import load_weights

    bare = cfg.clone()
    bare.defrost()
    bare.MODEL.WEIGHTS = ""
    predictor = DefaultPredictor(bare)
    load_weights(cfg, predictor.model)
    predictor.cfg = cfg
    return predictor


def read_labelled_image(image_path: str, label_path: str, num_classes: Optional[int] = None,
                        ignore_label: int = 255):
    """``(RGB image, labels (H, W) int64)`` of an image file and its label PNG (values checked
    against ``num_classes`` when given); every error names the file."""
    from .data.dataset_mapper import read_image_checked
    from .evaluation.token_semantics import read_label_map

    image = read_image_checked(image_path, "RGB")
    labels = read_label_map(label_path, num_classes, ignore_label)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"label file {label_path} is {labels.shape[1]}x{labels.shape[0]} but image "
                         f"{image_path} is {image.shape[1]}x{image.shape[0]} (WxH)")
    return image, labels


def dataset_item(dataset_name: str, index: int):
    """``(dataset dict, RGB image, labels (H, W) int64, instance map or None)`` of one image."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from .data.datasets.layout import instance_map_path
    from .evaluation.token_semantics import read_instance_map

    if dataset_name not in DatasetCatalog.list():
        raise KeyError(f"dataset {dataset_name!r} is not registered; registered sem-seg datasets include "
                       f"{sorted(n for n in DatasetCatalog.list() if 'sem_seg' in n)[:20]}")
    dicts = DatasetCatalog.get(dataset_name)
    if not -len(dicts) <= index < len(dicts):
        raise IndexError(f"index {index} out of range: dataset {dataset_name!r} has {len(dicts)} images")
    d = dicts[index]
    meta = MetadataCatalog.get(dataset_name)
    if "sem_seg_file_name" not in d:
        raise KeyError(f"dataset {dataset_name!r}: the dict of {d['file_name']} has no 'sem_seg_file_name'")
    image, labels = read_labelled_image(d["file_name"], d["sem_seg_file_name"], len(meta.stuff_classes),
                                        int(meta.get("ignore_label", 255)))
    inst_path = instance_map_path(d)
    instances = read_instance_map(inst_path, labels.shape) if inst_path else None
    return d, image, labels, instances


def training_batch(cfg, start: int = 0, n: Optional[int] = None, seed: int = 0):
    """Images ``start:start + n`` (default ``n``: ``SOLVER.IMS_PER_BATCH``) of ``cfg``'s first
    training dataset through the training mapper (``SemSegDatasetMapper(cfg, True)``), its random
    augmentation drawn from NumPy's generator seeded with ``seed`` (the global state is restored
    afterwards), so a batch does not depend on what was drawn before: what the tests, the AMP
    benches and ``bench/gpu_check.py`` train and compare on."""
    from detectron2.data import DatasetCatalog

    from .data import SemSegDatasetMapper

    n = cfg.SOLVER.IMS_PER_BATCH if n is None else n
    mapper = SemSegDatasetMapper(cfg, True)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[start:start + n]]
    finally:
        np.random.set_state(state)


# the config switch that makes a model return each output
OUTPUT_SWITCHES = {
    "sem_seg": "MODEL.MASK_FORMER.TEST.SEMANTIC_ON True (a MaskFormer)",
    "panoptic_seg": "MODEL.MASK_FORMER.TEST.PANOPTIC_ON True",
    "instances": "MODEL.MASK_FORMER.TEST.INSTANCE_ON True",
    "sgr_regions": "MODEL.BACKBONE.NAME 'build_sgr_backbone' (a model with SGR)",
}


def predict(predictor, image_rgb: np.ndarray, require: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """Run a ``DefaultPredictor`` on an RGB image; returns its output dict (tensors on the CPU).
    ``require``: the outputs the caller reads; one the model does not return is a KeyError naming
    the config switch that turns it on."""
    image = check_image(image_rgb)
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    out = predictor(bgr)
    missing = [k for k in require if k not in out]
    if missing:
        raise KeyError(f"the model returned {sorted(out)} but not {missing}; it returns "
                       + "; ".join(f"{k!r} with {OUTPUT_SWITCHES.get(k, 'its config')}" for k in missing))
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
