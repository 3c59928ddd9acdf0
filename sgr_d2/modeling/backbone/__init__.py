from .resnet import DilatedBasicBlock, build_dilated_resnet_backbone, build_dilated_resnet_fpn_backbone  # noqa: F401
from .swin import SwinBackbone, build_swin_backbone  # noqa: F401
from .stage_hook import StageHookBackbone, stage_channels  # noqa: F401
from .sgr_backbone import SGR_OUTPUTS, SGRBackbone, build_sgr_backbone, find_sgr_backbone  # noqa: F401
from .glore import GloReBackbone, GloReUnit, build_glore_backbone  # noqa: F401
