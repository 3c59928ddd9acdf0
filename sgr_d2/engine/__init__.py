from .checkpoint import AtomicCheckpointer, atomic_torch_save, build_checkpointer, build_predictor, load_weights  # noqa: F401
from .solver import build_optimizer, build_poly_lr_scheduler, param_groups  # noqa: F401
from .trainer import Trainer, load_config, run, setup_cfg  # noqa: F401
