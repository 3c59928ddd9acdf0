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
``ade20k_panoptic_seg``    mIoU with SEMANTIC_ON; PQ with PANOPTIC_ON; mask AP
                           (:class:`~.instance.InstanceSegEvaluator`) with INSTANCE_ON
``cityscapes_panoptic_seg`` PQ with PANOPTIC_ON; mIoU and cityscapesscripts' IoU with SEMANTIC_ON;
                           cityscapesscripts' mask AP (:class:`CityscapesScriptsInstanceEvaluator`)
                           with INSTANCE_ON
``cityscapes_instance``    cityscapesscripts' mask AP
=========================  ==============================================================

An mIoU needs the semantic output: a MaskFormer with ``SEMANTIC_ON`` False gets none (the
official code would fail on the missing ``sem_seg``). With ``TEST.TOKEN_SEMANTICS`` the token
metrics (:class:`~.token_semantics.TokenSemanticsEvaluator`) are added. PQ needs the module
``panopticapi`` (detectron2 imports it when it evaluates; see datasets/README.md for the package).

Test-time augmentation (``TEST.AUG.ENABLED``) averages the semantic output only, as the official
Mask2Former's ``SemanticSegmentorWithTTA``: its evaluation is the mIoU evaluators alone
(``semantic_only=True``), and :func:`check_test_time_augmentation` refuses it up front where there
is no semantic output or ground truth to evaluate.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

from detectron2.data import Metadata, MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
)
from detectron2.utils import comm

from .. import compat
from ..data.datasets.layout import refresh_paths
from .instance import InstanceSegEvaluator
from .sem_seg import SGRSemSegEvaluator

__all__ = ["build_evaluators", "check_test_time_augmentation", "CityscapesScriptsInstanceEvaluator",
           "CityscapesScriptsSemSegEvaluator", "PANOPTIC_EVALUATOR_TYPES"]

PANOPTIC_EVALUATOR_TYPES = ("coco_panoptic_seg", "ade20k_panoptic_seg", "cityscapes_panoptic_seg")


class CityscapesScriptsSemSegEvaluator(CityscapesSemSegEvaluator):
    """detectron2's ``CityscapesSemSegEvaluator`` (cityscapesscripts' IoU, iIoU and their
    category averages) reporting under ``sem_seg_cityscapes``, beside sgr_d2's mIoU under
    ``sem_seg`` (``DatasetEvaluators`` refuses two results under one key)."""

    def evaluate(self):
        ret = super().evaluate()
        return None if ret is None else {"sem_seg_cityscapes": ret["sem_seg"]}


class CityscapesScriptsInstanceEvaluator(CityscapesInstanceEvaluator):
    """detectron2's ``CityscapesInstanceEvaluator`` (cityscapesscripts' mask AP), evaluating from
    inside its own temporary folder: cityscapesscripts writes a ``matches.json`` into the current
    directory, which would be left in (or overwrite one of) the directory ``train_net.py`` runs
    from."""

    def evaluate(self):
        if comm.get_rank() > 0:
            return super().evaluate()
        # the ground-truth folder as an absolute path: it may be relative to the directory left
        self._metadata = Metadata(**dict(self._metadata.as_dict(), gt_dir=os.path.abspath(self._metadata.gt_dir)))
        with contextlib.chdir(self._temp_dir):
            return super().evaluate()


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


def _evaluates_semantic(cfg, meta) -> bool:
    """Whether :func:`build_evaluators` gives the dataset of ``meta`` an mIoU: the model returns
    ``sem_seg`` (a MaskFormer: ``SEMANTIC_ON``) and the dataset has semantic ground truth."""
    if cfg.MODEL.META_ARCHITECTURE == "MaskFormer" and not cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON:
        return False
    kind = meta.get("evaluator_type", None)
    if kind == "coco_panoptic_seg":
        return bool(meta.get("sem_seg_root", None))
    return kind in ("sem_seg", "cityscapes_sem_seg", "ade20k_panoptic_seg", "cityscapes_panoptic_seg")


def check_test_time_augmentation(cfg) -> None:
    """With ``TEST.AUG.ENABLED`` on a MaskFormer, a ValueError naming the keys unless every test
    dataset can evaluate the augmented semantic output (the only one test-time augmentation
    returns): ``MODEL.MASK_FORMER.TEST.SEMANTIC_ON`` must be True and each ``DATASETS.TEST``
    dataset must have semantic ground truth. ``train_net.py`` checks before it writes anything."""
    if not cfg.TEST.AUG.ENABLED or cfg.MODEL.META_ARCHITECTURE != "MaskFormer":
        return
    why = ("test-time augmentation (TEST.AUG.ENABLED True: multi-scale + flip, as the official Mask2Former's "
           "SemanticSegmentorWithTTA) averages the semantic output only and is evaluated by mIoU; PQ and mask AP "
           "come from the single-scale evaluation")
    if not cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON:
        raise ValueError(f"{why}, but MODEL.MASK_FORMER.TEST.SEMANTIC_ON is False: the model returns no semantic "
                         "output. Set TEST.AUG.ENABLED False, or MODEL.MASK_FORMER.TEST.SEMANTIC_ON True")
    for name in cfg.DATASETS.TEST:
        refresh_paths(name)
        meta = MetadataCatalog.get(name)
        if not _evaluates_semantic(cfg, meta):
            raise ValueError(
                f"{why}, but dataset {name!r} (DATASETS.TEST, evaluator_type {meta.get('evaluator_type', None)!r}) "
                "has no semantic ground truth to evaluate it on. Set TEST.AUG.ENABLED False")


def build_evaluators(cfg, dataset_name: str, output_folder: str = None, semantic_only: bool = False):
    """The evaluator of ``dataset_name`` (a ``DatasetEvaluators`` when there are several);
    ``output_folder`` defaults to ``<OUTPUT_DIR>/inference``; ``semantic_only``: the evaluators of
    the semantic output alone (test-time augmentation). See the module docstring."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    refresh_paths(dataset_name)  # json_file, panoptic_json, ... under $DETECTRON2_DATASETS as it is now
    meta = MetadataCatalog.get(dataset_name)
    kind = meta.get("evaluator_type", None)
    test = cfg.MODEL.MASK_FORMER.TEST
    semantic = _evaluates_semantic(cfg, meta)
    other = not semantic_only
    miou = lambda: SGRSemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)  # noqa: E731
    evaluators = []
    if semantic and kind in ("sem_seg", "cityscapes_sem_seg", "ade20k_panoptic_seg"):
        evaluators.append(miou())
    if semantic and kind == "cityscapes_sem_seg":
        evaluators.append(CityscapesScriptsSemSegEvaluator(dataset_name))
    if other and kind == "coco":
        evaluators.append(_coco(dataset_name, output_folder))
    if other and kind in PANOPTIC_EVALUATOR_TYPES and test.PANOPTIC_ON:
        evaluators.append(_panoptic(dataset_name, output_folder))
    if other and kind == "coco_panoptic_seg" and test.INSTANCE_ON:
        evaluators.append(_coco(dataset_name, output_folder))
    if semantic and kind == "coco_panoptic_seg":
        evaluators.append(miou())
    if other and kind == "ade20k_panoptic_seg" and test.INSTANCE_ON:
        evaluators.append(_coco(dataset_name, output_folder, InstanceSegEvaluator))
    if semantic and kind == "cityscapes_panoptic_seg":
        evaluators += [miou(), CityscapesScriptsSemSegEvaluator(dataset_name)]
    if other and (kind == "cityscapes_instance" or (kind == "cityscapes_panoptic_seg" and test.INSTANCE_ON)):
        evaluators.append(CityscapesScriptsInstanceEvaluator(dataset_name))
    if not evaluators:
        raise NotImplementedError(
            f"no evaluator for dataset {dataset_name!r} with evaluator_type {kind!r}"
            + (" and MODEL.MASK_FORMER.TEST.{SEMANTIC_ON,INSTANCE_ON,PANOPTIC_ON} = "
               f"{test.SEMANTIC_ON, test.INSTANCE_ON, test.PANOPTIC_ON}"
               if kind in PANOPTIC_EVALUATOR_TYPES or cfg.MODEL.META_ARCHITECTURE == "MaskFormer" else "")
            + (" for the semantic output of test-time augmentation (TEST.AUG.ENABLED)" if semantic_only else "")
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
