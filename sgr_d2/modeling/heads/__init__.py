from .fcn_head import DilatedFCNHead, per_pixel_loss  # noqa: F401
