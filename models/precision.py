"""Reduced-precision variants of a model file: float16 weights and arithmetic, float32 inputs and outputs.

:func:`fp16_variant` converts a HoVerServe ONNX file with onnxconverter-common's float16 pass
(casts at the graph's edges, so callers feed and read float32 exactly as before) and records the
precision in the card. Whether the variant may be used is decided by comparing it with the
original on real images: :func:`output_differences` here for the network outputs, and
:mod:`worker.variant_check` for the nuclei the post-processing finds (the nuclei need the
worker's post-processing, which this layer may not import).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from models.card import ModelCard, embed_card, read_card

__all__ = [
    "PROBABILITY_TOLERANCE",
    "fp16_variant",
    "output_differences",
    "probability_outputs",
    "save_model",
    "to_fp16",
]

logger = logging.getLogger(__name__)

PROBABILITY_TOLERANCE = 1e-2
"""Largest absolute difference of any probability an fp16 variant may give on the reference batch."""

_FP16_TINY = 1e-7
"""Weights smaller than this in magnitude become ±this (the converter's default): float16's
smallest subnormal is 6e-8, so anything smaller would vanish or lose all its digits."""

_FP16_HUGE = 1e4
"""Weights larger in magnitude are clamped to ±this (the converter's default; float16 ends at 65504)."""


def to_fp16(proto: Any) -> Any:
    """A float16 copy of an ``onnx.ModelProto`` whose inputs and outputs stay float32.

    Parameters
    ----------
    proto : onnx.ModelProto
        A float32 graph (not changed).

    Returns
    -------
    onnx.ModelProto

    Raises
    ------
    ValueError
        The graph is float16 already.
    """
    import onnx
    from onnxconverter_common import float16

    source = onnx.ModelProto()
    source.CopyFrom(proto)
    with warnings.catch_warnings(record=True) as caught:
        # The converter warns once per weight it rounds up to 1e-7 or clamps to 1e4; that is the
        # conversion working as meant, and the check against fp32 decides whether it cost anything.
        warnings.simplefilter("always")
        try:
            converted = float16.convert_float_to_float16(
                source, min_positive_val=_FP16_TINY, max_finite_val=_FP16_HUGE, keep_io_types=True)
        except ValueError as exc:
            raise ValueError(f"cannot convert to float16: {exc}") from exc
    rounded = sum(1 for w in caught if issubclass(w.category, UserWarning))
    if rounded:
        logger.info("float16 conversion rounded %d tiny or huge weights to the float16 range", rounded)
    return converted


def fp16_variant(source: str | Path) -> tuple[Any, ModelCard]:
    """The float16 variant of a HoVerServe model file, with ``precision: fp16`` in its card.

    Nothing is written: check the variant (:func:`worker.variant_check.write_fp16_variant`), then
    :func:`save_model` it.

    Parameters
    ----------
    source : str or Path
        A float32 ONNX model file with a HoVerServe card.

    Returns
    -------
    tuple
        The converted ``onnx.ModelProto`` (card embedded) and its card.

    Raises
    ------
    ModelCardError
        The file is not a HoVerServe model.
    ValueError
        Its card says fp16 already.
    """
    import onnx

    card = read_card(source)
    if card.precision != "fp32":
        raise ValueError(f"{source} is {card.precision} already; convert its fp32 original")
    proto = to_fp16(onnx.load(str(source)))
    variant = card.model_copy(update={"precision": "fp16"})
    embed_card(proto, variant)
    return proto, variant


def save_model(proto: Any, path: str | Path) -> None:
    """Write an ``onnx.ModelProto`` to ``path`` (weights inside the file)."""
    import onnx

    onnx.save(proto, str(path))


def probability_outputs(names: Iterable[str]) -> list[str]:
    """The outputs among ``names`` that hold probabilities (the contract names them ``*_prob``)."""
    return [name for name in names if name.endswith("_prob")]


def output_differences(
    reference: Mapping[str, NDArray[np.floating]], candidate: Mapping[str, NDArray[np.floating]]
) -> dict[str, float]:
    """Largest absolute difference of each output the two runs share.

    Parameters
    ----------
    reference, candidate : mapping of str to ndarray
        Outputs of the same batch through the original and the variant.

    Returns
    -------
    dict of str to float
        Output name → max |reference - candidate| (inf where either holds a NaN or inf).

    Raises
    ------
    ValueError
        The runs have different outputs or shapes.
    """
    if set(reference) != set(candidate):
        raise ValueError(f"the runs have different outputs: {sorted(reference)} and {sorted(candidate)}")
    differences = {}
    for name, expected in reference.items():
        got = candidate[name]
        if np.shape(got) != np.shape(expected):
            raise ValueError(f"output {name} has shape {np.shape(got)}, expected {np.shape(expected)}")
        delta = np.abs(np.asarray(expected, np.float64) - np.asarray(got, np.float64))
        if not np.isfinite(delta).all():
            differences[name] = float("inf")
        else:
            differences[name] = float(delta.max()) if delta.size else 0.0
    return differences
