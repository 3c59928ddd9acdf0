"""``VisualizationDemo``: detectron2's ``DefaultPredictor`` plus drawing, for sgr_d2 models.

In the style of detectron2's and Mask2Former's ``demo/predictor.py`` (the weights are loaded by
``sgr_d2.predict.build_predictor``, through the same fit check as training): the segmentation is drawn
by ``Visualizer.draw_sem_seg`` in the dataset's colours; a model with SGR also returns its
concept-region maps, drawn by :func:`sgr_d2.visualization.concept_region_figure`.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

import sgr_d2  # noqa: F401  (before any detectron2 import)
from detectron2.data import MetadataCatalog
from detectron2.utils.visualizer import ColorMode, Visualizer

from sgr_d2.predict import build_predictor
from sgr_d2.visualization import concept_region_figure

__all__ = ["VisualizationDemo"]


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
        self.metadata = MetadataCatalog.get(names[0] if names else "__unused")
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
            vis_output (VisImage): the segmentation (argmax class) drawn over the image;
            regions (Tensor or None): the (K, h, w) concept-region maps, for a model with SGR.
        """
        predictions = self.predictor(image)
        rgb = image[:, :, ::-1]
        visualizer = Visualizer(rgb, self.metadata, instance_mode=self.instance_mode)
        if "sem_seg" not in predictions:
            raise KeyError(f"the model returned {sorted(predictions)}; the demo draws 'sem_seg' outputs")
        sem = predictions["sem_seg"].argmax(dim=0).to(self.cpu_device)
        vis_output = visualizer.draw_sem_seg(sem)
        regions = predictions.get("sgr_regions")
        if regions is not None:
            regions = regions.to(self.cpu_device)
        return predictions, vis_output, regions

    @staticmethod
    def save_regions(image_bgr: np.ndarray, regions: torch.Tensor, path: str, num_tokens_shown: int = 4) -> str:
        """The concept-region figure (image, argmax-token map, token heatmaps) as a PNG."""
        return concept_region_figure(np.ascontiguousarray(image_bgr[:, :, ::-1]), regions, path,
                                     num_tokens_shown=num_tokens_shown)
