from .fcn_head import DilatedFCNHead, PerPixelHead, per_pixel_loss  # noqa: F401
from .aspp_head import ASPP, DeepLabV3Head, add_aspp_config  # noqa: F401
from .upernet_head import PyramidPooling, UperNetHead, add_upernet_config  # noqa: F401


def add_head_config(cfg):
    """The keys of the DeepLabV3 and UperNet heads (``MODEL.SEM_SEG_HEAD.*``)."""
    add_aspp_config(cfg)
    add_upernet_config(cfg)
    return cfg
