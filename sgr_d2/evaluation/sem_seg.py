"""mIoU as sgr_d2 reports it, whatever the detectron2 version (definition in docs/method.md).

detectron2's ``SemSegEvaluator`` changed its mean between v0.6 and upstream main: v0.6 averages
the IoU over the classes that occur in the ground truth *or* the prediction (a class predicted
but absent from the ground truth counts with IoU 0), upstream main over the classes of the
ground truth only. The paper's numbers follow cityscapesscripts and mmsegmentation, i.e. the
former; :func:`sem_seg_metrics` fixes it here, and :class:`SGRSemSegEvaluator` reports it.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, Sequence

import numpy as np
import torch

from detectron2.evaluation import SemSegEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..data.labels import read_sem_seg_checked

__all__ = ["SGRSemSegEvaluator", "sem_seg_metrics"]

logger = logging.getLogger(__name__)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values) -> float:
    """The mean of ``values`` (an array or any iterable of numbers) without its NaNs; NaN when
    none is left (numpy's ``nanmean`` warns there)."""
    v = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def sem_seg_metrics(conf_matrix: np.ndarray, class_names: Sequence[str]) -> Dict[str, float]:
    """Metrics (in %) from a confusion matrix laid out as detectron2's ``SemSegEvaluator`` keeps it.

    ``conf_matrix[p, g]`` counts the pixels predicted as class ``p`` whose ground truth is ``g``;
    the last row and column (index K) hold the ground truth's ignore label, whose pixels are
    left out of every metric. For each class c, with ``tp`` its pixels predicted right, ``gt`` its
    ground-truth pixels and ``pred`` the pixels predicted as c:

    * ``IoU-c = tp / (gt + pred - tp)``, NaN when that union is 0 (c neither in the ground truth
      nor predicted); ``mIoU`` is the mean over the classes with a union > 0, so a class
      predicted but absent from the ground truth counts with IoU 0 (cityscapesscripts,
      mmsegmentation);
    * ``fwIoU = Σ_c (gt_c / Σ gt) · IoU-c`` over the classes with ``gt_c > 0``;
    * ``ACC-c = tp / gt`` (NaN when ``gt = 0``), ``mACC`` their mean over the classes present,
      ``pACC = Σ tp / Σ gt``.
    """
    conf = np.asarray(conf_matrix, dtype=np.float64)
    k = len(class_names)
    if conf.shape != (k + 1, k + 1):
        raise ValueError(f"confusion matrix of shape {conf.shape} for {k} classes; expected {(k + 1, k + 1)}")
    labelled = conf[:k, :k]  # ground truth not ignored (pixels predicted as the ignore row never occur)
    tp = np.diag(labelled)
    gt = labelled.sum(0)
    pred = labelled.sum(1)
    iou = _ratio(tp, gt + pred - tp)
    acc = _ratio(tp, gt)
    present = gt > 0
    res: Dict[str, float] = OrderedDict()
    res["mIoU"] = 100 * _nanmean(iou)
    res["fwIoU"] = 100 * float(np.sum(iou[present] * gt[present]) / gt.sum()) if gt.sum() else float("nan")
    for name, v in zip(class_names, iou):
        res[f"IoU-{name}"] = 100 * float(v)
    res["mACC"] = 100 * _nanmean(acc)
    res["pACC"] = 100 * float(tp.sum() / gt.sum()) if gt.sum() else float("nan")
    for name, v in zip(class_names, acc):
        res[f"ACC-{name}"] = 100 * float(v)
    return res


class SGRSemSegEvaluator(SemSegEvaluator):
    """detectron2's ``SemSegEvaluator`` with checked ground truth and sgr_d2's metric definitions.

    * ``process``: each ground-truth label map is read as training reads it
      (:func:`~sgr_d2.data.labels.read_sem_seg_checked`): a file that is missing or
      unreadable, of another size than the prediction (the image's size), or with values outside
      ``0..K-1`` and the ignore label is a ``ValueError``/``FileNotFoundError`` naming the file,
      instead of a crash, an ``AssertionError`` or a silently lower mIoU. The confusion matrix
      is then accumulated by detectron2's own ``process``.
    * ``evaluate``: the confusion matrices of all workers are summed and the metrics computed by
      :func:`sem_seg_metrics` — the same keys and values on detectron2 v0.6 and upstream main
      (upstream's boundary IoU is not computed). The predictions are written to
      ``sem_seg_predictions.json`` and the metrics to ``sem_seg_evaluation.pth`` in
      ``output_dir``, as detectron2 does; their category ids are the dataset ids of
      ``stuff_dataset_id_to_contiguous_id`` when it maps every class, else the class indices (a
      panoptic dataset whose map holds only the stuff classes, Cityscapes').
    """

    def __init__(self, dataset_name: str, distributed: bool = True, output_dir=None):
        super().__init__(dataset_name, distributed=distributed, output_dir=output_dir)
        self._compute_boundary_iou = False  # upstream main only; not reported, so not computed
        to_dataset = self._contiguous_id_to_dataset_id
        if to_dataset is not None and set(to_dataset) != set(range(self._num_classes)):
            self._contiguous_id_to_dataset_id = None

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            name = inp["file_name"]
            if name not in self.input_file_to_gt_file:
                raise KeyError(f"image {name!r} is not in dataset {self._dataset_name!r}")
            read_sem_seg_checked(self.input_file_to_gt_file[name], tuple(out["sem_seg"].shape[-2:]),
                                 self._num_classes, self._ignore_label)
        super().process(inputs, outputs)

    def evaluate(self):
        conf, predictions = self._conf_matrix, self._predictions
        if self._distributed:
            comm.synchronize()
            conf = np.sum(comm.all_gather(conf), axis=0)
            predictions = list(itertools.chain(*comm.all_gather(predictions)))
            if not comm.is_main_process():
                return None
        res = sem_seg_metrics(conf, self._class_names)
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            with PathManager.open(os.path.join(self._output_dir, "sem_seg_predictions.json"), "w") as f:
                f.write(json.dumps(predictions))
            with PathManager.open(os.path.join(self._output_dir, "sem_seg_evaluation.pth"), "wb") as f:
                torch.save(res, f)
        results = OrderedDict({"sem_seg": res})
        self._logger.info(results)
        return results
