"""Installed models: the bundled ones (default first) plus every ``*.onnx`` in the models folder, by
file stem. Names are looked up by :func:`models.zoo.resolve_model`, as on the command line."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from models.card import ModelCard, read_card
from models.errors import ModelError
from models.zoo import DEFAULT_ALIAS, ModelNotFound, default_model, installed_models, resolve_model
from service.errors import UnknownModel

__all__ = ["DEFAULT_ALIAS", "Catalog"]

logger = logging.getLogger(__name__)


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
        return installed_models(self.models_dir)

    def default_name(self) -> str | None:
        default = default_model()
        return default.stem if default is not None else None

    def resolve(self, name: str | None) -> tuple[str, Path]:
        """(canonical name, file) of a model; ``None`` or ``"default"`` is the bundled model.

        Only installed models' names are accepted, never a path (:func:`models.zoo.resolve_model`
        with ``files=False``); an unknown name is :class:`UnknownModel` naming the installed ones.
        """
        try:
            path = resolve_model(name, self.models_dir, files=False)
        except ModelNotFound as exc:
            raise UnknownModel(str(exc)) from exc
        return path.stem, path  # installed models are named by their file's stem

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
