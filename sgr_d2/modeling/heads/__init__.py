from .fcn_head import DilatedFCNHead, PerPixelHead, per_pixel_loss  # noqa: F401
from .aspp_head import ASPP, DeepLabV3Head  # noqa: F401
from .upernet_head import PyramidPooling, UperNetHead  # noqa: F401
