"""Errors raised by :mod:`models`.

Tree::

    ModelError
    ├── CheckpointError   a checkpoint cannot be read or does not match a known network
    ├── ModelCardError    an ONNX file carries no card, or an invalid one
    └── ExportError       the exported file failed its check run in ONNX Runtime
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ExportError", "ModelCardError", "ModelError"]


class ModelError(Exception):
    """Base class of every error raised by :mod:`models`."""


class CheckpointError(ModelError):
    """A checkpoint cannot be loaded: unreadable, or its keys/shapes match no known network."""


class ModelCardError(ModelError):
    """An ONNX model file has no HoVerServe model card, or the card is invalid."""


class ExportError(ModelError):
    """An exported ONNX file could not be loaded or run by ONNX Runtime."""
