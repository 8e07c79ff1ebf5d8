"""Installed models: the bundled ones (default first) plus every ``*.onnx`` in the models folder, by
file stem."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from models.card import ModelCard, read_card
from models.errors import ModelError
from service.errors import UnknownModel

__all__ = ["DEFAULT_ALIAS", "Catalog"]

logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "default"
"""Name that always means the bundled default model (when the build has one)."""


@lru_cache(maxsize=64)
def _card(path: str, mtime: float) -> ModelCard:
    return read_card(Path(path))


class Catalog:
    """Looks models up by name for the API (listing, validation) and the workers (paths)."""

    def __init__(self, models_dir: Path | None) -> None:
        self.models_dir = models_dir

    def __repr__(self) -> str:
        return f"Catalog(models_dir={self.models_dir})"

    def paths(self) -> dict[str, Path]:
        """Model name → file, the bundled default first."""
        from models.zoo import default_model, list_models

        found: dict[str, Path] = {}
        default = default_model()
        if default is not None:
            found[default.stem] = default
        for path in list_models():  # the other bundled models (earlier versions, TTA variants)
            found.setdefault(path.stem, path)
        if self.models_dir is not None and self.models_dir.is_dir():
            for path in sorted(self.models_dir.glob("*.onnx")):
                found.setdefault(path.stem, path)
        return found

    def default_name(self) -> str | None:
        from models.zoo import default_model

        default = default_model()
        return default.stem if default is not None else None

    def resolve(self, name: str | None) -> tuple[str, Path]:
        """(canonical name, file) of a model; ``None`` or ``"default"`` is the bundled model."""
        paths = self.paths()
        if name is None or name == DEFAULT_ALIAS:
            default = self.default_name()
            if default is None:
                raise UnknownModel(
                    "this server has no default model; name one of: " + (", ".join(paths) or "(none)"))
            return default, paths[default]
        if name not in paths:
            raise UnknownModel(f"unknown model {name!r}; installed: {', '.join(paths) or '(none)'}")
        return name, paths[name]

    def card(self, name: str | None) -> ModelCard:
        canonical, path = self.resolve(name)
        try:
            return _card(str(path), path.stat().st_mtime)
        except (ModelError, OSError) as exc:
            raise UnknownModel(f"model {canonical!r} cannot be read: {exc}") from exc

    def cards(self) -> dict[str, ModelCard]:
        """Every readable model's card (unreadable files are logged and left out)."""
        cards: dict[str, ModelCard] = {}
        for name, path in self.paths().items():
            try:
                cards[name] = _card(str(path), path.stat().st_mtime)
            except (ModelError, OSError) as exc:
                logger.warning("model %s (%s) skipped: %s", name, path, exc)
        return cards
