"""Networks: definitions, official-checkpoint import, ONNX export, training and evaluation."""

from models.card import CARD_METADATA_KEY, ClassInfo, ModelCard, read_card
from models.errors import CheckpointError, ExportError, ModelCardError, ModelError

__all__ = [
    "CARD_METADATA_KEY",
    "CheckpointError",
    "ClassInfo",
    "ExportError",
    "ModelCard",
    "ModelCardError",
    "ModelError",
    "read_card",
]
