"""Models that ship with HoVerServe (ONNX files with embedded cards, in this folder), and the one
place a model name or path becomes a model file.

The command line and the service's catalog both look models up through :func:`resolve_model`, so
a name that works in ``hoverserve infer --model NAME`` is the name a job may ask for, and an
unknown name is answered with the same list of known ones everywhere.
"""

from __future__ import annotations

from pathlib import Path

from models.errors import ModelError

__all__ = [
    "DEFAULT_ALIAS",
    "DEFAULT_MODEL_FILE",
    "ZOO_DIR",
    "ModelNotFound",
    "default_model",
    "installed_models",
    "list_models",
    "resolve_model",
]

ZOO_DIR = Path(__file__).resolve().parent
"""Folder holding the bundled model files."""

DEFAULT_MODEL_FILE = "hoverserve-conic-wide.onnx"
"""File name of the default model inside :data:`ZOO_DIR`."""

DEFAULT_ALIAS = "default"
"""Name that always means the bundled default model (when the build has one)."""


class ModelNotFound(ModelError):
    """A model name or path names no model file and no installed model.

    Attributes
    ----------
    known : tuple of str
        The names of the installed models, for callers that phrase their own message.
    """

    def __init__(self, message: str, known: tuple[str, ...]) -> None:
        super().__init__(message)
        self.known = known


def default_model() -> Path | None:
    """Path of the bundled default model, or None when this build ships none."""
    path = ZOO_DIR / DEFAULT_MODEL_FILE
    return path if path.is_file() else None


def list_models() -> list[Path]:
    """Every bundled model file."""
    return sorted(ZOO_DIR.glob("*.onnx"))


def installed_models(models_dir: Path | None = None) -> dict[str, Path]:
    """Model name (file stem) → file: the bundled default first, the other bundled models, then
    every ``*.onnx`` in ``models_dir``.

    Parameters
    ----------
    models_dir : Path, optional
        A folder of further models (the service's ``HOVERSERVE_MODELS_DIR``); a missing folder
        adds nothing. A file whose stem is already a bundled model's name is left out: the
        bundled model keeps its name.

    Returns
    -------
    dict of str to Path
    """
    found: dict[str, Path] = {}
    default = default_model()
    if default is not None:
        found[default.stem] = default
    for path in list_models():  # the other bundled models (earlier versions, TTA variants)
        found.setdefault(path.stem, path)
    if models_dir is not None and models_dir.is_dir():
        for path in sorted(models_dir.glob("*.onnx")):
            found.setdefault(path.stem, path)
    return found


def resolve_model(name_or_path: str | Path | None = None, models_dir: Path | None = None, *,
                  files: bool = True) -> Path:
    """The model file that ``name_or_path`` means.

    Parameters
    ----------
    name_or_path : str or Path, optional
        None or ``"default"``: the bundled default model. Otherwise the name of an installed
        model (see :func:`installed_models`) or, where ``files`` allows, the path of an ONNX
        file or an installed model's file name (``hoverserve-conic-v1.onnx``).
    models_dir : Path, optional
        Folder of further installed models.
    files : bool
        Whether paths are accepted. The service passes False: a job names installed models
        only, never a file on the server.

    Returns
    -------
    Path

    Raises
    ------
    ModelNotFound
        Nothing of that name; the message names the installed models.
    """
    installed = installed_models(models_dir)
    known = tuple(installed)
    names = ", ".join(known) or "(none)"
    if name_or_path is None or str(name_or_path) == DEFAULT_ALIAS:
        default = default_model()
        if default is None:
            raise ModelNotFound("no bundled default model in this build (models/zoo is empty); "
                                f"name one of: {names}", known)
        return default
    name = str(name_or_path)
    if files and Path(name).is_file():
        return Path(name)
    key = name.removesuffix(".onnx") if files else name
    if key in installed:
        return installed[key]
    if files:
        raise ModelNotFound(f"no model file or installed model {name!r}; installed: {names}", known)
    raise ModelNotFound(f"unknown model {name!r}; installed: {names}", known)
