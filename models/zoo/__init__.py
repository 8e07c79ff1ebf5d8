"""Models that ship with HoVerServe (ONNX files with embedded cards, in this folder)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_MODEL_FILE", "ZOO_DIR", "default_model", "list_models"]

ZOO_DIR = Path(__file__).resolve().parent
"""Folder holding the bundled model files."""

DEFAULT_MODEL_FILE = "hoverserve-conic-wide.onnx"
"""File name of the default model inside :data:`ZOO_DIR`."""


def default_model() -> Path | None:
    """Path of the bundled default model, or None when this build ships none."""
    path = ZOO_DIR / DEFAULT_MODEL_FILE
    return path if path.is_file() else None


def list_models() -> list[Path]:
    """Every bundled model file."""
    return sorted(ZOO_DIR.glob("*.onnx"))
