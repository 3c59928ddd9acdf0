"""Mask AP of a panoptic dataset's things (Mask2Former's ``InstanceSegEvaluator``).

detectron2's ``COCOEvaluator`` maps predicted classes back to dataset ids through
``thing_dataset_id_to_contiguous_id`` and asserts that the things' contiguous ids are
0..N-1. On a panoptic dataset they are not: ADE20K's 100 things are scattered among its 150
classes (``ade20k_panoptic_*``: thing class 7 is "bed"). Mask2Former evaluates the instance
output of a panoptic model there with a ``COCOEvaluator`` that skips that assertion; this one
does the same by mapping the classes itself before detectron2's evaluation runs.
"""
from __future__ import annotations

from detectron2.data import Metadata
from detectron2.evaluation import COCOEvaluator

__all__ = ["InstanceSegEvaluator"]


class InstanceSegEvaluator(COCOEvaluator):
    """``COCOEvaluator`` for datasets whose things have any contiguous ids (a subset of all the
    classes): a predicted ``pred_classes`` value c is reported as the dataset id whose
    ``thing_dataset_id_to_contiguous_id`` entry is c; a class that is not a thing is a
    ValueError naming it. The ground truth is the metadata's ``json_file`` (for
    ``ade20k_panoptic_*``: ``ade20k_instance_<split>.json``)."""

    def __init__(self, dataset_name, *args, **kwargs):
        super().__init__(dataset_name, *args, **kwargs)
        meta = self._metadata.as_dict()
        self._to_dataset_id = {v: k for k, v in meta.pop("thing_dataset_id_to_contiguous_id").items()}
        # the metadata COCOEvaluator reads on: the same entries without the id map, so that its
        # own (asserting) mapping is skipped
        self._metadata = Metadata(**meta)
        self._dataset_name = dataset_name

    def _eval_predictions(self, predictions, img_ids=None):
        for prediction in predictions:
            for result in prediction.get("instances", ()):
                c = result["category_id"]
                if c not in self._to_dataset_id:
                    raise ValueError(
                        f"a prediction has class {c}, which is not a thing class of dataset "
                        f"{self._dataset_name!r} (its thing classes: {sorted(self._to_dataset_id)})")
                result["category_id"] = self._to_dataset_id[c]
        super()._eval_predictions(predictions, img_ids=img_ids)
