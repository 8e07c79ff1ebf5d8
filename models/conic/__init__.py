"""ConicNet: the HoVerServe default nucleus model (SE-ResNet U-Net, coordinate attention, NP/HV/NC)."""

from models.conic.builder import BUILDERS, build_conic, build_conic_small, build_conic_tiny, build_conic_wide
from models.conic.coord_attention import CoordAttention
from models.conic.se import SEResBlock, SqueezeExcite
from models.conic.unet import ConicNet

__all__ = [
    "BUILDERS",
    "ConicNet",
    "CoordAttention",
    "SEResBlock",
    "SqueezeExcite",
    "build_conic",
    "build_conic_small",
    "build_conic_tiny",
    "build_conic_wide",
]
