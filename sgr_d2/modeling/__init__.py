"""Backbones, heads and meta-architectures, registered with detectron2's registries on import."""
from .backbone import SGR_OUTPUTS, SGRBackbone, build_dilated_resnet_backbone, build_sgr_backbone, find_sgr_backbone  # noqa: F401
from .heads import DilatedFCNHead  # noqa: F401
from .meta_arch import SGRSemanticSegmentor  # noqa: F401
from . import maskformer  # noqa: F401
from .test_time_augmentation import SemanticSegmentorWithTTA  # noqa: F401
