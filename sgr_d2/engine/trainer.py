"""The detectron2 ``DefaultTrainer`` for sgr_d2 models, and config set-up with clear errors."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import weakref
from collections import OrderedDict

import torch

from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup
from detectron2.engine.defaults import create_ddp_model as _d2_create_ddp_model
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import (
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    DatasetEvaluators,
    verify_results,
)
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .. import compat
from ..config import add_sgr_config, validate_sgr_config
from ..data import SemSegDatasetMapper
from ..evaluation import SGRSemSegEvaluator
from ..modeling import SemanticSegmentorWithTTA
from .amp import build_amp_trainer
from .checkpoint import build_checkpointer
from .hooks import FinalCheckpoint, NonFiniteLossGuard, UnlabelledImagesMonitor
from .resume import (apply_config_hyperparameters, configured_hyperparameters, restart_data_loader,
                     resumable_train_loader, rng_state, set_rng_state)
from .solver import build_optimizer, build_poly_lr_scheduler
from .workers import stop_with_launcher

__all__ = ["Trainer", "setup_cfg", "load_config", "is_detection", "argument_parser"]

# Meta-architectures trained as detectors (SGR_SPEC §5): detectron2's data path and evaluators.
DETECTION_META_ARCHS = ("GeneralizedRCNN",)


def is_detection(cfg) -> bool:
    """True for Mask R-CNN and the like: the task is picked from MODEL.META_ARCHITECTURE."""
    return cfg.MODEL.META_ARCHITECTURE in DETECTION_META_ARCHS


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
        msg = str(e.args[0] if e.args else e)
        if msg.startswith("Non-existent"):  # yacs: "Non-existent key: A.B"
            msg += " (not a key of detectron2 or sgr_d2; see sgr_d2/config.py)"
        raise ValueError(f"command-line override: {msg}") from e
    validate_sgr_config(cfg)
    return cfg


def _sync_norms(cfg, world_size: int):
    """With several workers, BatchNorm becomes detectron2's synchronised BatchNorm."""
    if world_size <= 1:
        return
    sync = "SyncBN" if torch.cuda.is_available() else "naiveSyncBN"  # naiveSyncBN runs on gloo
    nodes = [(cfg.MODEL.RESNETS, "NORM"), (cfg.MODEL.SEM_SEG_HEAD, "NORM"), (cfg.MODEL.SGR, "NORM")]
    if hasattr(cfg.MODEL, "GLORE"):
        nodes.append((cfg.MODEL.GLORE, "NORM"))
    for node, key in nodes:
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


def argument_parser():
    """detectron2's ``default_argument_parser`` plus sgr_d2's flags."""
    parser = default_argument_parser()
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="with --eval-only: evaluate even though MODEL.WEIGHTS is empty, i.e. a "
                             "randomly initialised model (otherwise an error)")
    return parser


def _check_eval_weights(cfg, args):
    """--eval-only needs weights: MODEL.WEIGHTS, or --resume with a checkpoint in OUTPUT_DIR."""
    if not getattr(args, "eval_only", False) or cfg.MODEL.WEIGHTS or getattr(args, "allow_random_weights", False):
        return
    if getattr(args, "resume", False) and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return
    raise ValueError(
        "--eval-only with an empty MODEL.WEIGHTS would evaluate a randomly initialised model. Give "
        "the weights to evaluate (MODEL.WEIGHTS <file.pth> among the KEY VALUE overrides), or "
        f"--resume to evaluate the checkpoint that {os.path.join(cfg.OUTPUT_DIR, 'last_checkpoint')} "
        "names, or pass --allow-random-weights to evaluate a random model on purpose."
    )


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    _check_eval_weights(cfg, args)
    _pick_device(cfg)
    _sync_norms(cfg, args.num_gpus * args.num_machines)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=_rank(), name="sgr_d2")
    return cfg


def _rank():
    from detectron2.utils import comm

    return comm.get_rank()


def _create_ddp_model(model, **kwargs):
    """detectron2's ``create_ddp_model``, but a CPU model (gloo workers) gets ``device_ids=None``:
    detectron2 always passes ``[local_rank]``, which DistributedDataParallel refuses on the CPU."""
    if "device_ids" not in kwargs and all(p.device.type == "cpu" for p in model.parameters()):
        kwargs["device_ids"] = None
    return _d2_create_ddp_model(model, **kwargs)


@contextlib.contextmanager
def _clear_dataset_errors(key: str, names):
    """detectron2 asserts ``Dataset 'x' is empty!``; say which config key names it and what is expected."""
    try:
        yield
    except AssertionError as e:
        m = re.match(r"Dataset '(.*)' is empty!", str(e))
        if not m:
            raise
        from ..data.datasets import datasets_root

        raise ValueError(
            f"dataset {m.group(1)!r} (in {key} = {tuple(names)}) is empty: its registered loader "
            "returned no images; expected at least one dataset dict. Check the dataset's files "
            f"under $DETECTRON2_DATASETS (now {datasets_root()!r}) and how it is registered."
        ) from e


class Trainer(DefaultTrainer):
    """DefaultTrainer with sgr_d2's mapper, evaluators, optimiser, poly LR and atomic checkpoints.

    Also (docs/reliability.md): a NaN/inf loss stops training before its update, after saving
    ``model_last_good.pth`` (:class:`~sgr_d2.engine.hooks.NonFiniteLossGuard`); an empty
    training dataset is a clear error; several CPU workers (gloo) train with DDP;
    ``SOLVER.AMP.ENABLED`` trains in float16 on CUDA and in bfloat16 on the CPU (``engine/amp.py``).
    """

    def __init__(self, cfg):
        from detectron2.engine import defaults

        # DefaultTrainer.__init__ calls the module-level create_ddp_model of detectron2.engine.defaults,
        # and its AMPTrainer when SOLVER.AMP.ENABLED (CUDA only; build_amp_trainer adds the CPU).
        original = defaults.create_ddp_model, defaults.AMPTrainer
        defaults.create_ddp_model, defaults.AMPTrainer = _create_ddp_model, build_amp_trainer
        try:
            with _clear_dataset_errors("DATASETS.TRAIN", cfg.DATASETS.TRAIN):
                super().__init__(cfg)
        finally:
            defaults.create_ddp_model, defaults.AMPTrainer = original
        self.loss_guard = NonFiniteLossGuard(self)
        self.label_monitor = UnlabelledImagesMonitor(self)
        # the training sampler's stream position: restored on resume (docs/reliability.md §1)
        self._data_stream = getattr(self._trainer.data_loader, "resumable_sampler", None)
        self._data_start = 0
        self._resumed_state = None

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        with _clear_dataset_errors("DATASETS.TEST", cfg.DATASETS.TEST):
            if not is_detection(cfg) and cfg.INPUT.DATASET_MAPPER_NAME == "sgr_sem_seg":
                # the training mapper's checked reads, with detectron2's test-time resize
                return build_detection_test_loader(cfg, dataset_name,
                                                   mapper=SemSegDatasetMapper(cfg, False, dataset_name))
            return super().build_test_loader(cfg, dataset_name)

    def build_hooks(self):
        # Replace DefaultTrainer's checkpointer before the hooks capture it.
        self.checkpointer = build_checkpointer(
            self.cfg, self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        hooks = super().build_hooks()
        from detectron2.engine.hooks import PeriodicCheckpointer

        for i, h in enumerate(hooks):  # the main process's (the others do not save)
            if isinstance(h, PeriodicCheckpointer):
                hooks.insert(i + 1, FinalCheckpoint(self.checkpointer))
                break
        return hooks

    # ------------------------------------------------------------------ resume (resume.py)
    def state_dict(self):
        # TrainerBase's (iteration, hooks: the LR scheduler), then the optimizer under the key
        # upstream main's DefaultTrainer uses; v0.6's DefaultTrainer saves no optimizer.
        ret = TrainerBase.state_dict(self)
        inner = self._trainer.state_dict()
        inner["iteration"] = self.iter
        ret["_trainer"] = inner
        if self._data_stream is not None:
            position = self._data_start + (self.iter + 1 - self.start_iter) * self.cfg.SOLVER.IMS_PER_BATCH
            ret["data"] = {"seed": self._data_stream.seed, "position": int(position)}
        if comm.get_world_size() == 1:
            ret["rng"] = rng_state()
        return ret

    def load_state_dict(self, state_dict):
        configured = configured_hyperparameters(self.optimizer, self.scheduler)
        TrainerBase.load_state_dict(self, state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logging.getLogger("sgr_d2").warning(
                "resume: the checkpoint holds no optimizer state (written by an earlier sgr_d2): the "
                "optimizer starts afresh (no momentum or Adam moments) at iteration %d", self.iter + 1)
        apply_config_hyperparameters(self.optimizer, self.scheduler, configured, self.iter + 1)
        self._resumed_state = {"data": state_dict.get("data"), "rng": state_dict.get("rng")}

    def resume_or_load(self, resume=True):
        self.checkpointer.remove_stale_temporaries()
        self._resumed_state = None
        super().resume_or_load(resume=resume)
        if self._resumed_state is not None:
            self._restore_stream(**self._resumed_state)
            self._resumed_state = None

    def _restore_stream(self, data, rng):
        """The sampler's seed and position, then (one process) the random states."""
        log = logging.getLogger("sgr_d2")
        stream = self._data_stream
        if stream is not None:
            if data:
                if data.get("seed") is not None:
                    stream.seed = data["seed"]
                stream.start = self._data_start = int(data["position"])
                log.info("resume: the training images continue at position %d of the sampler's "
                         "stream (seed %s)", self._data_start, stream.seed)
                restart_data_loader(self._trainer)
            else:
                log.warning("resume: the checkpoint does not record the data stream (written by an "
                            "earlier sgr_d2): the sampler starts again from its first index")
        if rng is None or comm.get_world_size() != 1:
            return
        if stream is not None and data and self.cfg.DATALOADER.NUM_WORKERS == 0:
            # The data loader draws from torch's generator when its iterator starts (at the first
            # step); the saved run had done that long before. Restore when the stream yields its
            # first index: then the mapper and the model draw exactly what the saved run drew.
            stream.rng_state = rng
        else:
            set_rng_state(rng)

    @classmethod
    def build_train_loader(cls, cfg):
        # detectron2's loader (its DatasetMapper for detection), with a sampler that can resume
        mapper = None
        if not is_detection(cfg) and cfg.INPUT.DATASET_MAPPER_NAME == "sgr_sem_seg":
            mapper = SemSegDatasetMapper(cfg, True)
        return resumable_train_loader(cfg, mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        meta = MetadataCatalog.get(dataset_name)
        kind = meta.get("evaluator_type", None)
        evaluators = []
        if kind in ("sem_seg", "cityscapes_sem_seg", "ade20k_panoptic_seg"):
            evaluators.append(SGRSemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
        if kind == "cityscapes_sem_seg":
            evaluators.append(CityscapesSemSegEvaluator(dataset_name))
        if kind == "coco":
            # box (and mask) AP; detectron2's fast COCOeval needs its C++ extension (sgr_d2.compat)
            evaluators.append(COCOEvaluator(dataset_name, output_dir=output_folder,
                                            use_fast_impl=compat.cpp_ops_available()))
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
        if is_detection(cfg):
            from detectron2.modeling import GeneralizedRCNNWithTTA

            logger.info(f"Running multi-scale + flip inference, sizes {list(cfg.TEST.AUG.MIN_SIZES)}")
            tta = GeneralizedRCNNWithTTA(cfg, model)
        else:
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
    stop_with_launcher()
    cfg = setup_cfg(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        build_checkpointer(cfg, model, cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
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
