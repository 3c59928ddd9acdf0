"""Evaluation: mIoU with a fixed definition (sem_seg.py), the token-semantics metrics
(docs/method.md#token-semantics-metrics-s_c-d_c-s_i-d_i), mask AP of a panoptic dataset's things
(instance.py), and which evaluators a dataset gets (build.py: :func:`build_evaluators`)."""
from .build import build_evaluators, check_test_time_augmentation  # noqa: F401
from .instance import InstanceSegEvaluator  # noqa: F401
from .sem_seg import SGRSemSegEvaluator, sem_seg_metrics  # noqa: F401
from .token_semantics import (  # noqa: F401
    DEFAULT_MIN_MASS_FRACTION,
    METRIC_KEYS,
    TokenSemanticsEvaluator,
    class_segments,
    image_token_semantics,
    instance_segments,
    read_instance_map,
    read_label_map,
    segment_masses,
    semantics_from_masses,
    summarize,
)

__all__ = [
    "build_evaluators",
    "check_test_time_augmentation",
    "InstanceSegEvaluator",
    "SGRSemSegEvaluator",
    "sem_seg_metrics",
    "DEFAULT_MIN_MASS_FRACTION",
    "METRIC_KEYS",
    "TokenSemanticsEvaluator",
    "class_segments",
    "image_token_semantics",
    "instance_segments",
    "read_instance_map",
    "read_label_map",
    "segment_masses",
    "semantics_from_masses",
    "summarize",
]
