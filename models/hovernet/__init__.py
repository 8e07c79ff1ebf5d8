"""HoVer-Net (official architecture), state-dict compatible with the official checkpoints."""

from models.hovernet.builder import BUILDERS, build_hovernet, hovernet_fast, hovernet_original
from models.hovernet.net import MODES, HoVerNet, Mode, ModeSpec

__all__ = [
    "BUILDERS",
    "MODES",
    "HoVerNet",
    "Mode",
    "ModeSpec",
    "build_hovernet",
    "hovernet_fast",
    "hovernet_original",
]
