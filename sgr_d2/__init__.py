"""sgr_d2: SGR (Semantically-aware Global Reasoning) for segmentation, on detectron2.

Importing the package applies the detectron2 compatibility shims (``sgr_d2.compat``) first,
then registers sgr_d2's backbones, heads, meta-architectures and datasets with detectron2.
"""
from . import compat

compat.apply()

from .config import add_sgr_config  # noqa: E402
from . import data  # noqa: E402,F401  (registers datasets)
from . import modeling  # noqa: E402,F401  (registers backbones, heads, meta-architectures)

__version__ = "0.1.0"
__all__ = ["add_sgr_config", "compat"]
