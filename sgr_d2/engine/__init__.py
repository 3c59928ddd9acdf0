"""Training and evaluation: the trainer, its hooks, checkpoints, resume, the solver, mixed precision."""
from .checkpoint import AtomicCheckpointer, build_checkpointer, load_weights  # noqa: F401
from .solver import build_optimizer, build_poly_lr_scheduler, param_groups  # noqa: F401
from .trainer import Trainer, argument_parser, run  # noqa: F401
