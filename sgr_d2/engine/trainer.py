"""The detectron2 ``DefaultTrainer`` for sgr_d2 models, and config set-up with clear errors."""
from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict

import torch

from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import (
    CityscapesSemSegEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
    verify_results,
)
from detectron2.utils.logger import setup_logger

from ..config import add_sgr_config, validate_sgr_config
from ..data import SemSegDatasetMapper
from ..modeling import SemanticSegmentorWithTTA
from .checkpoint import AtomicCheckpointer
from .solver import build_optimizer, build_poly_lr_scheduler

__all__ = ["Trainer", "setup_cfg", "load_config"]


def load_config(config_file: str, opts=()):
    """A detectron2 config with sgr_d2's keys, merged from ``config_file`` and ``opts``.

    An unknown key, a missing file or a bad value is a ``ValueError`` naming the file and key.
    """
    cfg = get_cfg()
    add_sgr_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file {config_file} does not exist")
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            raise ValueError(f"config file {config_file}: {e.args[0] if e.args else e} "
                             "(not a key of detectron2 or sgr_d2; see sgr_d2/config.py)") from e
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise ValueError(f"command-line override: {e.args[0] if e.args else e}") from e
    validate_sgr_config(cfg)
    return cfg


def _sync_norms(cfg, world_size: int):
    """With several workers, BatchNorm becomes detectron2's synchronised BatchNorm."""
    if world_size <= 1:
        return
    sync = "SyncBN" if torch.cuda.is_available() else "naiveSyncBN"  # naiveSyncBN runs on gloo
    for node, key in ((cfg.MODEL.RESNETS, "NORM"), (cfg.MODEL.SEM_SEG_HEAD, "NORM"), (cfg.MODEL.SGR, "NORM")):
        if node[key] == "BN":
            node[key] = sync
    if hasattr(cfg.MODEL, "FPN") and cfg.MODEL.FPN.NORM == "BN":
        cfg.MODEL.FPN.NORM = sync


def _pick_device(cfg):
    """A config asking for CUDA on a machine without it runs on the CPU, with a warning."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("sgr_d2").warning("MODEL.DEVICE is %s but CUDA is not available: using cpu",
                                            cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    _pick_device(cfg)
    _sync_norms(cfg, args.num_gpus * args.num_machines)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=_rank(), name="sgr_d2")
    return cfg


def _rank():
    from detectron2.utils import comm

    return comm.get_rank()


class Trainer(DefaultTrainer):
    """DefaultTrainer with sgr_d2's mapper, evaluators, optimiser, poly LR and atomic checkpoints."""

    def build_hooks(self):
        # Replace DefaultTrainer's checkpointer before the hooks capture it.
        self.checkpointer = AtomicCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        return super().build_hooks()

    @classmethod
    def build_train_loader(cls, cfg):
        if cfg.INPUT.DATASET_MAPPER_NAME == "sgr_sem_seg":
            return build_detection_train_loader(cfg, mapper=SemSegDatasetMapper(cfg, True))
        return super().build_train_loader(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        meta = MetadataCatalog.get(dataset_name)
        kind = meta.get("evaluator_type", None)
        evaluators = []
        if kind in ("sem_seg", "cityscapes_sem_seg", "ade20k_panoptic_seg"):
            evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
        if kind == "cityscapes_sem_seg":
            evaluators.append(CityscapesSemSegEvaluator(dataset_name))
        if not evaluators:
            raise NotImplementedError(
                f"no evaluator for dataset {dataset_name!r} with evaluator_type {kind!r}"
            )
        if cfg.TEST.TOKEN_SEMANTICS:
            # S_C, D_C, S_I, D_I (SGR_SPEC §3) from the outputs' "sgr_regions"; also written to
            # <output_folder>/token_semantics.json.
            if cfg.MODEL.BACKBONE.NAME != "build_sgr_backbone":
                raise ValueError(
                    "TEST.TOKEN_SEMANTICS is True but MODEL.BACKBONE.NAME is "
                    f"{cfg.MODEL.BACKBONE.NAME!r}: the token metrics need a model with SGR "
                    "(MODEL.BACKBONE.NAME 'build_sgr_backbone')"
                )
            from ..evaluation import TokenSemanticsEvaluator

            evaluators.append(TokenSemanticsEvaluator(dataset_name, distributed=True,
                                                      output_dir=output_folder))
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        if cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR":
            return build_poly_lr_scheduler(cfg, optimizer)
        return super().build_lr_scheduler(cfg, optimizer)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        logger = logging.getLogger("sgr_d2")
        logger.info(f"Running multi-scale + flip inference, scales {list(cfg.TEST.AUG.SCALES)}")
        tta = SemanticSegmentorWithTTA.from_config(cfg, model)
        evaluators = [
            cls.build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA"))
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, tta, evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in res.items())


def run(args):
    """The body of ``train_net.py`` (one worker)."""
    cfg = setup_cfg(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS,
                                                                          resume=args.resume)
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        from detectron2.utils import comm

        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:
        from detectron2.engine import hooks

        trainer.register_hooks([hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))])
    return trainer.train()
