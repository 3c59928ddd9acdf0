from .resnet import DilatedBasicBlock, build_dilated_resnet_backbone, build_dilated_resnet_fpn_backbone  # noqa: F401
from .swin import SwinBackbone, add_swin_config, build_swin_backbone  # noqa: F401
from .glore import GloReBackbone, GloReUnit, add_glore_config, build_glore_backbone  # noqa: F401
