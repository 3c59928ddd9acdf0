from .resnet import DilatedBasicBlock, build_dilated_resnet_backbone  # noqa: F401
