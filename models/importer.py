"""Import official HoVer-Net PyTorch checkpoints and turn them into ONNX files with a model card.

Mode and number of types are read from the checkpoint's shapes, never asked of the user:
``decoder.np.u3.conva.weight`` is 5×5 in ``original`` mode and 3×3 in ``fast`` mode, and
``decoder.tp.u0.conv.weight`` (absent in segmentation-only checkpoints) has one row per type,
background included.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from pydantic import ValidationError

from models.card import ClassInfo, ModelCard
from models.errors import CheckpointError
from models.export import export_onnx
from models.hovernet import MODES, HoVerNet, Mode

__all__ = [
    "HOVER_MPP",
    "HOVER_POSTPROCESS",
    "PRESETS",
    "default_preset",
    "detect_variant",
    "import_to_onnx",
    "load_official_checkpoint",
    "load_preset",
    "resolve_classes",
]

logger = logging.getLogger(__name__)

HOVER_MPP = 0.25
"""Resolution the official checkpoints were trained at, µm per pixel (40×)."""

HOVER_POSTPROCESS: dict[str, Any] = {
    "np_threshold": 0.5,
    "min_object_size": 10,
    "sobel_ksize": 21,
    "marker_threshold": 0.4,
    "blur_ksize": 3,
    "opening_ksize": 5,
    "min_marker_size": 10,
}
"""Post-processing constants of the official HoVer-Net (valid at :data:`HOVER_MPP`).

Foreground threshold on ``np_prob``; smallest component kept (px); Sobel kernel side; threshold
of the combined edge map that separates markers; Gaussian blur side of the energy map; side of
the elliptic opening of the markers; smallest marker kept (px).
"""

PRESETS = ("pannuke", "consep", "monusac")
"""Names of the bundled class presets (``models/presets/<name>.json``)."""

MODE_KEY = "decoder.np.u3.conva.weight"
"""Key whose kernel side tells the mode: 5 → original, 3 → fast."""

TYPES_KEY = "decoder.tp.u0.conv.weight"
"""Key whose first dimension is the number of types (absent: untyped)."""

_KERNEL_TO_MODE: dict[int, Mode] = {
    spec.kernel_size: cast(Mode, name) for name, spec in MODES.items()
}
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128),
)
_MAX_LISTED = 5


# --------------------------------------------------------------------------- checkpoints


def load_official_checkpoint(
    path: str | Path, *, trusted: bool = False
) -> tuple[HoVerNet, Mode, int | None]:
    """Load an official HoVer-Net checkpoint (``.tar``) into a network in eval mode.

    Accepts the official layout (a dict whose ``"desc"`` entry is the state dict) or a bare
    state dict; keys may carry DataParallel's ``module.`` prefix; ``num_batches_tracked``
    entries may be present (PyTorch-trained) or absent (converted from TensorFlow).

    Parameters
    ----------
    path : str or Path
        Checkpoint file.
    trusted : bool
        Allow arbitrary pickled Python objects in the file. By default the file is read with
        ``torch.load(weights_only=True)``, which refuses to run code from the file.

    Returns
    -------
    model : HoVerNet
        Network with the checkpoint's weights, in eval mode, on the CPU.
    mode : {"fast", "original"}
        Mode inferred from the decoder's kernel size.
    nr_types : int or None
        Type-head channels (background included), or ``None`` for a segmentation-only model.

    Raises
    ------
    CheckpointError
        The file cannot be read, or its keys or shapes match no HoVer-Net variant.
    """
    path = Path(path)
    state = _normalise_keys(_state_dict_of(_read(path, trusted=trusted), path))
    mode, nr_types = detect_variant(state)
    model = HoVerNet(mode, nr_types)
    _load_strict(model, state, path)
    model.eval()
    logger.info("loaded %s: mode %s, nr_types %s", path.name, mode, nr_types)
    return model, mode, nr_types


def detect_variant(state_dict: Mapping[str, Any]) -> tuple[Mode, int | None]:
    """Mode and number of types of a HoVer-Net state dict, from its shapes.

    Parameters
    ----------
    state_dict : Mapping of str to Tensor
        State dict with the official key names (no ``module.`` prefix).

    Returns
    -------
    mode : {"fast", "original"}
    nr_types : int or None

    Raises
    ------
    CheckpointError
        The marker keys are missing or have unexpected shapes.
    """
    if MODE_KEY not in state_dict:
        raise CheckpointError(
            f"not a HoVer-Net checkpoint: no {MODE_KEY!r}; "
            f"first keys: {_listing(list(state_dict))}"
        )
    shape = _shape(state_dict[MODE_KEY])
    mode = _KERNEL_TO_MODE.get(shape[-1]) if isinstance(shape, tuple) and len(shape) == 4 else None
    if mode is None:
        raise CheckpointError(
            f"{MODE_KEY} has shape {shape}; expected (256, 1024, 5, 5) for 'original' "
            "or (256, 1024, 3, 3) for 'fast'"
        )
    if TYPES_KEY not in state_dict:
        return mode, None
    types_shape = _shape(state_dict[TYPES_KEY])
    if not isinstance(types_shape, tuple) or len(types_shape) != 4 or types_shape[0] < 2:
        raise CheckpointError(f"{TYPES_KEY} has shape {types_shape}; expected (nr_types, 64, 1, 1)")
    return mode, int(types_shape[0])


def _read(path: Path, *, trusted: bool) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as exc:  # pickle, zip and torch errors alike
        hint = (
            "" if trusted else
            "; if it holds Python objects besides tensors and you trust its source, "
            "load it with trusted=True"
        )
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}{hint}") from exc


def _state_dict_of(raw: Any, path: Path) -> dict[str, Any]:
    if isinstance(raw, Mapping) and isinstance(raw.get("desc"), Mapping):
        return dict(raw["desc"])
    if isinstance(raw, Mapping) and raw and all(
        isinstance(v, torch.Tensor | np.ndarray) for v in raw.values()
    ):
        return dict(raw)
    keys = list(raw) if isinstance(raw, Mapping) else []
    raise CheckpointError(
        f"{path} holds no HoVer-Net state dict (expected a dict with a 'desc' entry); "
        f"found {type(raw).__name__} with keys {_listing(keys)}"
    )


def _normalise_keys(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Drop DataParallel's ``module.`` prefix; turn NumPy arrays into tensors."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        out[name] = torch.as_tensor(value) if isinstance(value, np.ndarray) else value
    return out


def _load_strict(model: HoVerNet, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    # converted-from-TensorFlow checkpoints have no batch counters; they do not affect inference
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {_shape(state[k])} (expected {tuple(expected[k].shape)})"
        for k in expected
        if k in state and _shape(state[k]) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} keys with wrong shapes: {_listing(wrong)}")
    if problems:
        raise CheckpointError(
            f"{path} does not match HoVer-Net {model.mode} (nr_types {model.nr_types}): "
            + "; ".join(problems)
        )
    complete = {k: state.get(k, expected[k]) for k in expected}
    model.load_state_dict(complete, strict=True)


def _shape(value: Any) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown}, ... ({more} more)" if more > 0 else shown or "(none)"


# --------------------------------------------------------------------------- classes


def load_preset(name: str) -> tuple[tuple[ClassInfo, ...], str]:
    """Classes (background first) and training-data note of a bundled preset.

    Parameters
    ----------
    name : {"pannuke", "consep", "monusac"}

    Returns
    -------
    classes : tuple of ClassInfo
    training_data : str
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")
    text = resources.files("models").joinpath("presets", f"{name}.json").read_text("utf-8")
    return _parse_classes(json.loads(text), f"preset {name!r}")


def default_preset(mode: str, nr_types: int) -> str | None:
    """Preset assumed for an official checkpoint when the user names none.

    6 types → ``pannuke``; 5 types → ``consep`` in ``original`` mode, ``monusac`` in ``fast``
    mode (the official checkpoints of those datasets); any other count → ``None``.
    """
    if nr_types == 6:
        return "pannuke"
    if nr_types == 5:
        return "consep" if mode == "original" else "monusac"
    return None


def resolve_classes(
    types: str | Path | None, *, nr_types: int | None, mode: str
) -> tuple[tuple[ClassInfo, ...], str]:
    """Classes for a checkpoint: a preset name, a JSON file, or the default for its variant.

    Parameters
    ----------
    types : str, Path or None
        A preset name (:data:`PRESETS`), a JSON file ``{"classes": [{"name": ..., "colour":
        [r, g, b]}, ...]}`` (background first; optional ``"training_data"``), or ``None`` for
        :func:`default_preset` (generic names ``Type 1``.. when there is none).
    nr_types : int or None
        Type channels of the checkpoint (``None``: untyped, then ``types`` must be ``None``).
    mode : {"fast", "original"}

    Returns
    -------
    classes : tuple of ClassInfo
        Empty for an untyped checkpoint.
    training_data : str

    Raises
    ------
    CheckpointError
        The class count differs from the checkpoint's, or classes were given for an untyped one.
    ValueError
        ``types`` is neither a preset nor a readable, valid JSON file.
    """
    if nr_types is None:
        if types is not None:
            raise CheckpointError(
                f"the checkpoint has no type head (segmentation only, 0 types) but --types "
                f"{str(types)!r} was given"
            )
        return (), ""
    if types is None:
        preset = default_preset(mode, nr_types)
        if preset is None:
            logger.warning(
                "no preset for %d types in %s mode; naming them Type 1..%d", nr_types, mode,
                nr_types - 1,
            )
            return _generic_classes(nr_types), ""
        classes, training_data = load_preset(preset)
        source = f"preset {preset!r}"
    elif isinstance(types, str) and types in PRESETS:
        classes, training_data = load_preset(types)
        source = f"preset {types!r}"
    else:
        classes, training_data = _read_types_file(Path(types))
        source = str(types)
    if len(classes) != nr_types:
        raise CheckpointError(
            f"the checkpoint has {nr_types} types (background included) but {source} lists "
            f"{len(classes)} classes"
        )
    return classes, training_data


def _read_types_file(path: Path) -> tuple[tuple[ClassInfo, ...], str]:
    if not path.is_file():
        raise ValueError(
            f"types must be one of the presets {list(PRESETS)} or a JSON file, got {str(path)!r}"
        )
    try:
        document = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read types file {path}: {exc}") from exc
    return _parse_classes(document, str(path))


def _parse_classes(document: Any, source: str) -> tuple[tuple[ClassInfo, ...], str]:
    if not isinstance(document, dict) or not isinstance(document.get("classes"), list):
        raise ValueError(f"{source}: expected an object with a 'classes' list")
    try:
        classes = tuple(ClassInfo.model_validate(item) for item in document["classes"])
    except ValidationError as exc:
        raise ValueError(f"{source}: invalid class entry: {exc}") from exc
    if len(classes) < 2:
        raise ValueError(f"{source}: needs background plus at least one class, got {len(classes)}")
    return classes, str(document.get("training_data", ""))


def _generic_classes(nr_types: int) -> tuple[ClassInfo, ...]:
    named = [ClassInfo(name="Background", colour=(0, 0, 0))]
    named += [
        ClassInfo(name=f"Type {i}", colour=_PALETTE[(i - 1) % len(_PALETTE)])
        for i in range(1, nr_types)
    ]
    return tuple(named)


# --------------------------------------------------------------------------- import


def import_to_onnx(
    checkpoint: str | Path,
    output: str | Path,
    *,
    types: str | Path | None = None,
    name: str | None = None,
    check: bool = True,
    trusted: bool = False,
) -> ModelCard:
    """Turn an official HoVer-Net checkpoint into a HoVerServe ONNX file with its model card.

    Parameters
    ----------
    checkpoint : str or Path
        Official ``.tar`` checkpoint (see :func:`load_official_checkpoint`).
    output : str or Path
        ONNX file to write.
    types : str, Path or None
        Class names and colours: a preset (``"pannuke"``, ``"consep"``, ``"monusac"``), a JSON
        file, or ``None`` for the default of the checkpoint's variant (see
        :func:`resolve_classes`). Must be ``None`` for an untyped checkpoint.
    name : str or None
        Model name for the card; default: the checkpoint's file stem.
    check : bool
        Run the written file once in ONNX Runtime before returning.
    trusted : bool
        Passed to :func:`load_official_checkpoint`.

    Returns
    -------
    ModelCard
        The card embedded in ``output``.

    Raises
    ------
    CheckpointError
        Unreadable or unknown checkpoint, or ``types`` disagrees with its type count.
    ValueError
        Bad ``types`` argument or output folder.
    ExportError
        The exported file failed its ONNX Runtime check.
    """
    checkpoint = Path(checkpoint)
    model, mode, nr_types = load_official_checkpoint(checkpoint, trusted=trusted)
    classes, training_data = resolve_classes(types, nr_types=nr_types, mode=mode)
    card = _card(checkpoint, mode, classes, training_data, name=name)
    export_onnx(model, card, output, check=check)
    return card


def _card(
    checkpoint: Path, mode: str, classes: tuple[ClassInfo, ...], training_data: str,
    *, name: str | None,
) -> ModelCard:
    spec = MODES[mode]
    typed = f"{len(classes)} types" if classes else "segmentation only"
    return ModelCard(
        name=name or checkpoint.stem,
        family="hover",
        architecture=f"hovernet-{mode}",
        input_size=spec.input_size,
        output_size=spec.output_size,
        mpp=HOVER_MPP,
        classes=classes,
        postprocess=dict(HOVER_POSTPROCESS),
        training_data=training_data,
        licence=(
            f"Network code: HoVer-Net architecture (MIT). Weights imported from the user's "
            f"checkpoint {checkpoint.name}: they keep that checkpoint's licence (the official "
            "PanNuke weights are CC BY-NC-SA 4.0, non-commercial) and are not distributed "
            "with HoVerServe."
        ),
        description=f"Official HoVer-Net, {mode} mode, {typed}, imported from {checkpoint.name}.",
    )
