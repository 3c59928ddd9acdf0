"""The detectron2 ``DefaultTrainer`` for sgr_d2 models, and the body of ``train_net.py``."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import weakref
from collections import OrderedDict

from detectron2.data import build_detection_test_loader
from detectron2.engine import DefaultTrainer, create_ddp_model, default_argument_parser, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import verify_results
from detectron2.modeling import GeneralizedRCNNWithTTA
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import is_detection, setup_cfg
from ..data import build_mapper
from ..data.datasets import datasets_root
from ..evaluation import build_evaluators, check_test_time_augmentation
from ..modeling import SemanticSegmentorWithTTA
from .amp import build_step_trainer
from .checkpoint import build_checkpointer
from .hooks import FinalCheckpoint, NonFiniteLossGuard, UnlabelledImagesMonitor
from .output_lock import OutputLock
from .preemption import PreemptionHook
from .resume import (apply_config_hyperparameters, configured_hyperparameters, own_rng_state, restart_data_loader,
                     resumable_train_loader, rng_state, set_rng_state)
from .run_files import DeferredWriters, RunFiles
from .solver import build_optimizer, build_poly_lr_scheduler
from .workers import stop_with_launcher

__all__ = ["Trainer", "argument_parser", "run"]


def argument_parser():
    """detectron2's ``default_argument_parser`` plus sgr_d2's flags."""
    parser = default_argument_parser()
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="with --eval-only: evaluate even though MODEL.WEIGHTS is empty, i.e. a "
                             "randomly initialised model (otherwise an error)")
    return parser


@contextlib.contextmanager
def _clear_dataset_errors(key: str, names):
    """detectron2 asserts ``Dataset 'x' is empty!``; say which config key names it and what is expected."""
    try:
        yield
    except AssertionError as e:
        m = re.match(r"Dataset '(.*)' is empty!", str(e))
        if not m:
            raise
        raise ValueError(
            f"dataset {m.group(1)!r} (in {key} = {tuple(names)}) is empty: its registered loader "
            "returned no images; expected at least one dataset dict. Check the dataset's files "
            f"under $DETECTRON2_DATASETS (now {datasets_root()!r}) and how it is registered."
        ) from e


def _gather_worker_rng_at_saves(t) -> None:
    """With several workers: every worker's random states to the main process at the iterations
    where detectron2's ``PeriodicCheckpointer`` (the main process's only) saves, just before it."""
    if comm.get_world_size() > 1 and ((t.iter + 1) % t.cfg.SOLVER.CHECKPOINT_PERIOD == 0 or t.iter >= t.max_iter - 1):
        t.gather_worker_rng(t.iter)


class Trainer(DefaultTrainer):
    """DefaultTrainer with sgr_d2's mapper, evaluators, optimiser, poly LR, DDP (on the CPU too), step
    trainer (``amp.py``), checked atomic checkpoints and the guards of docs/reliability.md; with
    ``run_files`` (``train_net.py``), nothing is written into ``OUTPUT_DIR`` before the first iteration."""

    def __init__(self, cfg, run_files: RunFiles = None):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        with _clear_dataset_errors("DATASETS.TRAIN", cfg.DATASETS.TRAIN):
            data_loader = self.build_train_loader(cfg)
        model = self.build_ddp_model(cfg, model)
        self._trainer = build_step_trainer(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = build_checkpointer(cfg, model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.run_files = run_files
        # the training sampler's stream position: restored on resume (docs/reliability.md)
        self._data_stream = getattr(data_loader, "resumable_sampler", None)
        self._data_start = 0
        self._worker_rng = None  # (iteration, every worker's random states) on the main process
        self.register_hooks(self.build_hooks())
        self.loss_guard = NonFiniteLossGuard(self)
        self.label_monitor = UnlabelledImagesMonitor(self)

    @classmethod
    def build_ddp_model(cls, cfg, model):
        """detectron2's ``create_ddp_model``, with ``device_ids=None`` for a CPU model (gloo workers)
        where detectron2 passes ``[local_rank]``, which DistributedDataParallel refuses on the CPU."""
        kwargs = {"device_ids": None} if all(p.device.type == "cpu" for p in model.parameters()) else {}
        return create_ddp_model(model, broadcast_buffers=False, **kwargs)

    def build_hooks(self):
        ret = super().build_hooks()
        # the main process's PeriodicCheckpointer (the others do not save), else the first hook after it
        i = next((i for i, h in enumerate(ret) if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook,
                                                                 hooks.PeriodicWriter))), len(ret))
        if i < len(ret) and isinstance(ret[i], hooks.PeriodicCheckpointer):
            ret.insert(i + 1, FinalCheckpoint())
        ret.insert(i, hooks.CallbackHook(after_step=_gather_worker_rng_at_saves))
        ret.append(PreemptionHook())  # last: after the evaluation and the writers of its iteration
        if self.run_files is not None:  # the run's files, once its first iteration has finished
            ret.insert(0, hooks.CallbackHook(after_step=lambda t: t.run_files.commit()))
        return ret

    def build_writers(self):
        writers = super().build_writers
        return writers() if self.run_files is None else [DeferredWriters(writers, self.run_files)]

    def save_checkpoint(self, name: str, iteration: int) -> None:
        """Save ``<name>.pth`` recording ``iteration`` as the one that finished (sgr_d2's hooks'
        saves; detectron2's ``PeriodicCheckpointer`` saves the iteration that just finished)."""
        self.checkpointer.save(name, iteration=iteration, trainer=self.state_dict(iteration))

    def gather_worker_rng(self, iteration: int) -> None:
        """Every worker's random states after ``iteration``, for the main process's next save of
        that iteration: an object gather on detectron2's gloo group, called by every worker."""
        states = comm.gather(rng_state(), dst=0)
        self._worker_rng = (iteration, states) if comm.is_main_process() else None

    def state_dict(self, iteration: int = None):
        """TrainerBase's (iteration, the LR scheduler), the optimizer under upstream main's key (v0.6
        saves none), the data position and the random states (every worker's, once
        :meth:`gather_worker_rng` gathered them); ``iteration``: the one that finished."""
        iteration = self.iter if iteration is None else iteration
        ret = TrainerBase.state_dict(self)
        ret["iteration"] = iteration
        ret["_trainer"] = dict(self._trainer.state_dict(), iteration=iteration)
        if self._data_stream is not None:
            position = self._data_start + (iteration + 1 - self.start_iter) * self.cfg.SOLVER.IMS_PER_BATCH
            ret["data"] = {"seed": self._data_stream.seed, "position": int(position)}
        if comm.get_world_size() == 1:
            ret["rng"] = rng_state()
        elif self._worker_rng is not None and self._worker_rng[0] == iteration:
            ret["rng"] = list(self._worker_rng[1])
        return ret

    def load_state_dict(self, state_dict):
        configured = configured_hyperparameters(self.optimizer, self.scheduler)
        TrainerBase.load_state_dict(self, state_dict)
        self._trainer.load_state_dict(state_dict["_trainer"])
        apply_config_hyperparameters(self.optimizer, self.scheduler, configured, self.iter + 1)
        self._restore_stream(state_dict.get("data"), state_dict.get("rng"))

    def resume_or_load(self, resume=True):
        self.checkpointer.remove_stale_temporaries()
        super().resume_or_load(resume=resume)

    def _restore_stream(self, data, rng):
        """The sampler's seed and position, then this worker's random states: the last thing a
        resume does (nothing draws random numbers after the checkpoint's trainer state is loaded)."""
        stream = self._data_stream
        if stream is not None:
            if data.get("seed") is not None:
                stream.seed = data["seed"]
            stream.start = self._data_start = int(data["position"])
            logging.getLogger("sgr_d2").info("resume: the training images continue at position %d of the "
                                             "sampler's stream (seed %s)", self._data_start, stream.seed)
            restart_data_loader(self._trainer)
        rng = None if rng is None else own_rng_state(rng)
        if rng is not None and stream is not None and self.cfg.DATALOADER.NUM_WORKERS == 0:
            # The data loader draws from torch's generator when its iterator starts (at the first
            # step); the saved run had done that long before. Restore when the stream yields its
            # first index: then the mapper and the model draw exactly what the saved run drew.
            stream.rng_state = rng
        elif rng is not None:
            set_rng_state(rng)

    @classmethod
    def build_train_loader(cls, cfg):
        # detectron2's loader (its DatasetMapper for detection), with a sampler that can resume
        return resumable_train_loader(cfg, None if is_detection(cfg) else build_mapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        with _clear_dataset_errors("DATASETS.TEST", cfg.DATASETS.TEST):
            if is_detection(cfg):
                return super().build_test_loader(cfg, dataset_name)
            # the training mapper's checked reads, with detectron2's test-time resize
            return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, False, dataset_name))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluators(cfg, dataset_name, output_folder)

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
            logger.info(f"Running multi-scale + flip inference, sizes {list(cfg.TEST.AUG.MIN_SIZES)}")
            tta = GeneralizedRCNNWithTTA(cfg, model)
        else:
            check_test_time_augmentation(cfg)
            logger.info(f"Running multi-scale + flip inference, scales {list(cfg.TEST.AUG.SCALES)} (the semantic "
                        "output; its mIoU only)")
            tta = SemanticSegmentorWithTTA.from_config(cfg, model)
        folder, semantic = os.path.join(cfg.OUTPUT_DIR, "inference_TTA"), not is_detection(cfg)
        res = cls.test(cfg, tta, [build_evaluators(cfg, n, folder, semantic_only=semantic) for n in cfg.DATASETS.TEST])
        return OrderedDict((k + "_TTA", v) for k, v in res.items())


def run(args):
    """The body of ``train_net.py`` (one worker)."""
    stop_with_launcher()
    cfg = setup_cfg(args)
    lock = OutputLock(cfg.OUTPUT_DIR)  # one run per output folder (engine/output_lock.py)
    with lock, RunFiles(cfg, args, lock) as run_files:
        lock.check()
        if args.eval_only:
            model = Trainer.build_model(cfg)
            build_checkpointer(cfg, model, cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
            lock.acquire()  # the evaluation writes OUTPUT_DIR/inference
            res = Trainer.test(cfg, model)
            if cfg.TEST.AUG.ENABLED:
                res.update(Trainer.test_with_TTA(cfg, model))
            run_files.commit()
            if comm.is_main_process():
                verify_results(cfg, res)
            return res
        trainer = Trainer(cfg, run_files)
        trainer.resume_or_load(resume=args.resume)
        if cfg.TEST.AUG.ENABLED:
            trainer.register_hooks([hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))])
        return trainer.train()
