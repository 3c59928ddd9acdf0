"""Evaluation beyond mIoU: the token-semantics metrics (SGR_SPEC §3)."""
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
