"""Which evaluators a dataset gets (``Trainer.build_evaluator``: ``--eval-only`` and the periodic
evaluation), chosen by its metadata's ``evaluator_type`` and, for the panoptic datasets, by the
MaskFormer inference switches ``MODEL.MASK_FORMER.TEST.{SEMANTIC_ON,INSTANCE_ON,PANOPTIC_ON}``,
as the official Mask2Former ``train_net.py`` chooses them:

=========================  ==============================================================
``evaluator_type``         evaluators (result keys)
=========================  ==============================================================
``sem_seg``                mIoU (``sem_seg``: :class:`~.sem_seg.SGRSemSegEvaluator`)
``cityscapes_sem_seg``     mIoU, and cityscapesscripts' IoU / iIoU (``sem_seg_cityscapes``:
                           detectron2's ``CityscapesSemSegEvaluator``)
``coco``                   box and mask AP (``bbox``, ``segm``: ``COCOEvaluator``)
``coco_panoptic_seg``      PQ/SQ/RQ (``panoptic_seg``: ``COCOPanopticEvaluator``) with PANOPTIC_ON;
                           mask AP (``COCOEvaluator``) with INSTANCE_ON; mIoU with SEMANTIC_ON
                           on a dataset with semantic maps (the ``_with_sem_seg`` names)
``ade20k_panoptic_seg``    mIoU; PQ with PANOPTIC_ON; mask AP
                           (:class:`~.instance.InstanceSegEvaluator`) with INSTANCE_ON
``cityscapes_panoptic_seg`` PQ with PANOPTIC_ON; mIoU and cityscapesscripts' IoU with SEMANTIC_ON;
                           cityscapesscripts' mask AP (``CityscapesInstanceEvaluator``) with
                           INSTANCE_ON
``cityscapes_instance``    cityscapesscripts' mask AP
=========================  ==============================================================

With ``TEST.TOKEN_SEMANTICS`` the token metrics (:class:`~.token_semantics.TokenSemanticsEvaluator`)
are added. PQ needs the module ``panopticapi`` (detectron2 imports it when it evaluates; see
datasets/README.md for the package).
"""
from __future__ import annotations

import importlib.util
import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
)

from .. import compat
from ..data.datasets.layout import refresh_paths
from .instance import InstanceSegEvaluator
from .sem_seg import SGRSemSegEvaluator

__all__ = ["build_evaluators", "CityscapesScriptsSemSegEvaluator", "PANOPTIC_EVALUATOR_TYPES"]

PANOPTIC_EVALUATOR_TYPES = ("coco_panoptic_seg", "ade20k_panoptic_seg", "cityscapes_panoptic_seg")


class CityscapesScriptsSemSegEvaluator(CityscapesSemSegEvaluator):
    """detectron2's ``CityscapesSemSegEvaluator`` (cityscapesscripts' IoU, iIoU and their
    category averages) reporting under ``sem_seg_cityscapes``, beside sgr_d2's mIoU under
    ``sem_seg`` (``DatasetEvaluators`` refuses two results under one key)."""

    def evaluate(self):
        ret = super().evaluate()
        return None if ret is None else {"sem_seg_cityscapes": ret["sem_seg"]}


def _panoptic(dataset_name: str, output_folder: str):
    if importlib.util.find_spec("panopticapi") is None:
        raise ImportError(
            f"PQ on {dataset_name!r} (MODEL.MASK_FORMER.TEST.PANOPTIC_ON) needs the module panopticapi, "
            "which detectron2's COCOPanopticEvaluator imports: `pip install --no-deps panopticapi-lite` "
            "(the official panopticapi code; see datasets/README.md)")
    return COCOPanopticEvaluator(dataset_name, output_folder)


def _coco(dataset_name: str, output_folder: str, cls=COCOEvaluator):
    # detectron2's fast COCOeval needs its C++ extension (sgr_d2.compat); else pycocotools'
    return cls(dataset_name, output_dir=output_folder, use_fast_impl=compat.cpp_ops_available())


def build_evaluators(cfg, dataset_name: str, output_folder: str = None):
    """The evaluator of ``dataset_name`` (a ``DatasetEvaluators`` when there are several);
    ``output_folder`` defaults to ``<OUTPUT_DIR>/inference``. See the module docstring."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    refresh_paths(dataset_name)  # json_file, panoptic_json, ... under $DETECTRON2_DATASETS as it is now
    meta = MetadataCatalog.get(dataset_name)
    kind = meta.get("evaluator_type", None)
    test = cfg.MODEL.MASK_FORMER.TEST
    miou = lambda: SGRSemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)  # noqa: E731
    evaluators = []
    if kind in ("sem_seg", "cityscapes_sem_seg", "ade20k_panoptic_seg"):
        evaluators.append(miou())
    if kind == "cityscapes_sem_seg":
        evaluators.append(CityscapesScriptsSemSegEvaluator(dataset_name))
    if kind == "coco":
        evaluators.append(_coco(dataset_name, output_folder))
    if kind in PANOPTIC_EVALUATOR_TYPES and test.PANOPTIC_ON:
        evaluators.append(_panoptic(dataset_name, output_folder))
    if kind == "coco_panoptic_seg" and test.INSTANCE_ON:
        evaluators.append(_coco(dataset_name, output_folder))
    if kind == "coco_panoptic_seg" and test.SEMANTIC_ON and meta.get("sem_seg_root", None):
        evaluators.append(miou())
    if kind == "ade20k_panoptic_seg" and test.INSTANCE_ON:
        evaluators.append(_coco(dataset_name, output_folder, InstanceSegEvaluator))
    if kind == "cityscapes_panoptic_seg" and test.SEMANTIC_ON:
        evaluators += [miou(), CityscapesScriptsSemSegEvaluator(dataset_name)]
    if kind == "cityscapes_instance" or (kind == "cityscapes_panoptic_seg" and test.INSTANCE_ON):
        evaluators.append(CityscapesInstanceEvaluator(dataset_name))
    if not evaluators:
        raise NotImplementedError(
            f"no evaluator for dataset {dataset_name!r} with evaluator_type {kind!r}"
            + (" and MODEL.MASK_FORMER.TEST.{SEMANTIC_ON,INSTANCE_ON,PANOPTIC_ON} = "
               f"{test.SEMANTIC_ON, test.INSTANCE_ON, test.PANOPTIC_ON}" if kind in PANOPTIC_EVALUATOR_TYPES else "")
        )
    if cfg.TEST.TOKEN_SEMANTICS:
        # S_C, D_C, S_I, D_I (docs/method.md#token-semantics-metrics-s_c-d_c-s_i-d_i) from the outputs'
        # "sgr_regions"; also written to <output_folder>/token_semantics.json.
        if cfg.MODEL.BACKBONE.NAME != "build_sgr_backbone":
            raise ValueError(
                "TEST.TOKEN_SEMANTICS is True but MODEL.BACKBONE.NAME is "
                f"{cfg.MODEL.BACKBONE.NAME!r}: the token metrics need a model with SGR "
                "(MODEL.BACKBONE.NAME 'build_sgr_backbone')"
            )
        from .token_semantics import TokenSemanticsEvaluator

        evaluators.append(TokenSemanticsEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
