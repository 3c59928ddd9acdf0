"""``VisualizationDemo``: detectron2's ``DefaultPredictor`` plus drawing, for sgr_d2 models.

In the style of detectron2's and Mask2Former's ``demo/predictor.py`` (the weights are loaded by
``sgr_d2.predict.build_predictor``, through the same fit check as training): the model's outputs are
drawn in the dataset's colours as the official demo draws them, the panoptic segmentation
(``Visualizer.draw_panoptic_seg``) when there is one, else the semantic one (``draw_sem_seg``) and
the instances over it (``draw_instance_predictions``), so that panoptic and instance-only configs
(``MODEL.MASK_FORMER.TEST.*_ON``) are drawn too; a model with SGR also returns its concept-region
maps, drawn by :func:`sgr_d2.visualization.concept_region_figure`.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

import sgr_d2  # noqa: F401  (before any detectron2 import)
from detectron2.data import Metadata, MetadataCatalog
from detectron2.utils.visualizer import ColorMode, Visualizer

from sgr_d2.predict import build_predictor
from sgr_d2.visualization import concept_region_figure

__all__ = ["VisualizationDemo", "drawing_metadata"]


def drawing_metadata(meta: Metadata) -> Metadata:
    """The metadata to draw panoptic and instance outputs with: ``thing_classes`` / ``thing_colors``
    indexed by the model's class ids, which the ``Visualizer`` assumes. Where the things are not
    the first classes (ADE20K panoptic: its 100 things among the 150 classes, "person" is class 12
    but thing 3), they are the names and colours of all classes (``stuff_classes`` /
    ``stuff_colors``), as detectron2's Cityscapes panoptic metadata holds them."""
    things = sorted(meta.get("thing_dataset_id_to_contiguous_id", {}).values())
    stuff = meta.get("stuff_classes", None)
    if not things or things == list(range(len(things))) or not stuff:
        return meta
    return Metadata(**dict(meta.as_dict(), thing_classes=list(stuff),
                           thing_colors=list(meta.get("stuff_colors", None) or [])))


class VisualizationDemo:
    def __init__(self, cfg, instance_mode: ColorMode = ColorMode.IMAGE, onnx: Optional[str] = None):
        """
        Args:
            cfg (CfgNode): an sgr_d2 config with ``MODEL.WEIGHTS`` set (unless ``onnx``); its
                metadata (class names and colours) is that of ``DATASETS.TEST[0]`` (else
                ``DATASETS.TRAIN[0]``).
            instance_mode (ColorMode): Visualizer colour mode.
            onnx (str): an exported model (``tools/export_onnx.py``), run with onnxruntime
                (:class:`sgr_d2.export.OnnxSemanticPredictor`) instead of ``DefaultPredictor``.
        """
        names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
        self.metadata = drawing_metadata(MetadataCatalog.get(names[0] if names else "__unused"))
        self.cpu_device = torch.device("cpu")
        self.instance_mode = instance_mode
        if onnx:
            from sgr_d2.export import OnnxSemanticPredictor

            self.predictor = OnnxSemanticPredictor(cfg, onnx)
        else:
            self.predictor = build_predictor(cfg)  # DefaultPredictor, weights loaded through the fit check

    def run_on_image(self, image: np.ndarray) -> Tuple[Dict, object, Optional[torch.Tensor]]:
        """
        Args:
            image (np.ndarray): an image of shape (H, W, C) in BGR order (OpenCV's).

        Returns:
            predictions (dict): the model's output for the image;
            vis_output (VisImage): the panoptic segmentation, else the semantic one (argmax class)
                and the instances, drawn over the image;
            regions (Tensor or None): the (K, h, w) concept-region maps, for a model with SGR.
        """
        predictions = self.predictor(image)
        rgb = image[:, :, ::-1]
        visualizer = Visualizer(rgb, self.metadata, instance_mode=self.instance_mode)
        vis_output = None
        if "panoptic_seg" in predictions:
            seg, segments_info = predictions["panoptic_seg"]
            vis_output = visualizer.draw_panoptic_seg(seg.to(self.cpu_device), segments_info)
        else:
            if "sem_seg" in predictions:
                vis_output = visualizer.draw_sem_seg(predictions["sem_seg"].argmax(dim=0).to(self.cpu_device))
            if "instances" in predictions:
                vis_output = visualizer.draw_instance_predictions(predictions["instances"].to(self.cpu_device))
        if vis_output is None:
            raise KeyError(f"the model returned {sorted(predictions)}; the demo draws 'panoptic_seg', 'sem_seg' "
                           "or 'instances' outputs")
        regions = predictions.get("sgr_regions")
        if regions is not None:
            regions = regions.to(self.cpu_device)
        return predictions, vis_output, regions

    @staticmethod
    def save_regions(image_bgr: np.ndarray, regions: torch.Tensor, path: str, num_tokens_shown: int = 4) -> str:
        """The concept-region figure (image, argmax-token map, token heatmaps) as a PNG."""
        return concept_region_figure(np.ascontiguousarray(image_bgr[:, :, ::-1]), regions, path,
                                     num_tokens_shown=num_tokens_shown)
