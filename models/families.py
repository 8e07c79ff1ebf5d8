"""Model families: what each family's ONNX file outputs and which post-processing its card carries.

A card names its ``family``; the family fixes the output contract of the graph (the names and
shapes of its outputs) and the type of the card's ``postprocess`` options, checked once when the
card is loaded (:attr:`models.card.ModelCard.options`). How a family's maps become nuclei is the
worker's business (``worker.families``); this module holds only the facts a model file and its
card must agree on, so that training, export and evaluation can check them without the worker.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

import numpy as np

__all__ = [
    "FAMILIES",
    "MAX_UPSAMPLE",
    "PROBABILITY_SLACK",
    "BoundaryOptions",
    "Family",
    "FamilyContract",
    "HoverOptions",
    "InstanceOptions",
    "contract",
]

Family = Literal["hover", "boundary", "instance"]

MAX_UPSAMPLE = 4
"""Largest ``upsample`` factor: 16x the map pixels already; more buys nothing at any model resolution."""

PROBABILITY_SLACK = 1e-6
"""How far outside 0..1 a model's probabilities may stray and still count as probabilities:
ONNX Runtime's vectorised Sigmoid rounds to 1.0000001 (one float32 ulp above 1; seen with
onnxruntime 1.32). Accepted values are clipped to 0..1."""


def _finite_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class HoverOptions:
    """The post-processing a ``hover`` model asks for (its card's ``postprocess``), checked once.

    Attributes
    ----------
    np_threshold : float
        Foreground threshold on the nucleus probability.
    marker_threshold : float
        Edge strength from which pixels are excluded from the markers (official 0.4).
    upsample : int
        Factor (1..4) by which the maps are upsampled, bilinearly, before segmentation; 1 keeps
        the model's grid.
    class_prob_calibration : tuple of (float, float)
        Points ``(vote, probability)`` of a non-decreasing map from a nucleus's raw class score
        (the share of its pixels voting for its class) to the probability that the class is
        right, measured on validation data (linear between points); empty keeps the raw share.
    min_class_prob : float
        Nuclei whose (calibrated) class probability is below this are reported unclassified
        (class 0); 0 classifies every nucleus.
    edge_range : (float, float) or None
        Fixed normalisation of the edge maps: the Sobel responses of the HV maps (taken on
        their fixed range [-1, 1] → [0, 1]), as fractions of the kernel's largest possible
        response, that map to 0 and 1. None is the official algorithm's min-max over each map,
        which depends on the map's extent: a nucleus near a region seam can then be split
        differently for another region size. Measured on training maps
        (``hoverserve model set-postprocess --measure-edge-range``).
    """

    np_threshold: float = 0.5
    marker_threshold: float = 0.4
    upsample: int = 1
    class_prob_calibration: tuple[tuple[float, float], ...] = ()
    min_class_prob: float = 0.0
    edge_range: tuple[float, float] | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("np_threshold", "marker_threshold", "upsample",
                                       "class_prob_calibration", "min_class_prob", "edge_range")

    def __post_init__(self) -> None:
        for name in ("np_threshold", "marker_threshold"):
            value = getattr(self, name)
            if not _finite_number(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if (isinstance(self.upsample, bool) or not isinstance(self.upsample, int | np.integer)
                or not 1 <= self.upsample <= MAX_UPSAMPLE):
            raise ValueError(f"upsample must be an integer in 1..{MAX_UPSAMPLE}, got {self.upsample!r}")
        if not _finite_number(self.min_class_prob) or not 0 <= self.min_class_prob <= 1:
            raise ValueError(f"min_class_prob must be within 0..1, got {self.min_class_prob!r}")
        _check_calibration(self.class_prob_calibration)
        _check_edge_range(self.edge_range)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> HoverOptions:
        """Options from a card's ``postprocess`` (other keys ignored; missing ones default)."""
        found = {k: values[k] for k in cls.KEYS if k in values}
        if "class_prob_calibration" in found:
            try:
                found["class_prob_calibration"] = tuple(
                    (float(x), float(y)) for x, y in found["class_prob_calibration"])
            except (TypeError, ValueError) as exc:
                raise ValueError("class_prob_calibration must be a list of [vote, probability] pairs") \
                    from exc
        if found.get("edge_range") is not None:
            try:
                lo, hi = found["edge_range"]
                found["edge_range"] = (float(lo), float(hi))
            except (TypeError, ValueError) as exc:
                raise ValueError("edge_range must be null or a pair [low, high]") from exc
        return cls(**found)

    @property
    def grid_scale(self) -> int:
        """How many times finer than the model's grid the nuclei are traced."""
        return int(self.upsample)

    def class_probability(self, vote: float) -> float:
        """The calibrated class probability of a nucleus whose class got ``vote`` of its pixels."""
        if not self.class_prob_calibration:
            return float(vote)
        xs, ys = zip(*self.class_prob_calibration, strict=True)
        return float(np.interp(vote, xs, ys))


def _check_calibration(points: tuple[tuple[float, float], ...]) -> None:
    if not points:
        return
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    rising = all(b > a for a, b in itertools.pairwise(xs))
    monotone = all(b >= a for a, b in itertools.pairwise(ys))
    if len(points) < 2 or not all(math.isfinite(v) and 0 <= v <= 1 for v in xs + ys) \
            or not rising or not monotone:
        raise ValueError("class_prob_calibration wants >= 2 points (vote, probability) within 0..1, "
                         "votes increasing and probabilities non-decreasing")


def _check_edge_range(edge_range: tuple[float, float] | None) -> None:
    if edge_range is None:
        return
    lo, hi = edge_range
    if not (_finite_number(lo) and _finite_number(hi) and -1.0 <= lo < hi <= 1.0):
        raise ValueError(f"edge_range must be null or [low, high] with -1 <= low < high <= 1, "
                         f"got {list(edge_range)!r}")


def _check_threshold(name: str, value: object) -> float:
    if not _finite_number(value) or not 0.0 < float(value) < 1.0:  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)  # type: ignore[arg-type]


class _PlainOptions:
    """Options read key by key from a card's ``postprocess``, traced on the model's grid."""

    __slots__ = ()
    KEYS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        """Options from a card's ``postprocess`` (other keys ignored; missing ones default)."""
        return cls(**{k: values[k] for k in cls.KEYS if k in values})

    @property
    def grid_scale(self) -> int:
        return 1


@dataclass(frozen=True, slots=True)
class BoundaryOptions(_PlainOptions):
    """The post-processing a ``boundary`` model asks for (its card's ``postprocess``)."""

    fg_threshold: float = 0.5
    boundary_threshold: float = 0.5

    KEYS: ClassVar[tuple[str, ...]] = ("fg_threshold", "boundary_threshold")

    def __post_init__(self) -> None:
        for name in self.KEYS:
            _check_threshold(name, getattr(self, name))



@dataclass(frozen=True, slots=True)
class InstanceOptions(_PlainOptions):
    """The post-processing an ``instance`` (panoptic, Mask R-CNN) model asks for.

    Attributes
    ----------
    score_threshold : float
        Detections scoring below this are ignored.
    mask_threshold : float
        A pixel is in a detection's mask where the mask probability, sampled at its centre,
        exceeds this.
    min_unclaimed : float
        Detections claim their pixels in descending score; one whose unclaimed share of its
        mask is below this is a duplicate and dropped (0 keeps every detection's remainder).
    """

    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    min_unclaimed: float = 0.5

    KEYS: ClassVar[tuple[str, ...]] = ("score_threshold", "mask_threshold", "min_unclaimed")

    def __post_init__(self) -> None:
        _check_threshold("score_threshold", self.score_threshold)
        _check_threshold("mask_threshold", self.mask_threshold)
        if not _finite_number(self.min_unclaimed) or not 0.0 <= self.min_unclaimed <= 1.0:
            raise ValueError(f"min_unclaimed must be within 0..1, got {self.min_unclaimed!r}")



@dataclass(frozen=True)
class FamilyContract:
    """What a family's ONNX graph must output and what its card's ``postprocess`` holds.

    ``outputs`` are required, ``optional_outputs`` may be absent (an untyped hover model has no
    ``tp_prob``); ``options`` parses and checks the card's ``postprocess`` mapping.
    """

    name: Family
    outputs: tuple[str, ...]
    optional_outputs: tuple[str, ...]
    options: type[HoverOptions] | type[BoundaryOptions] | type[InstanceOptions]


FAMILIES: dict[str, FamilyContract] = {
    "hover": FamilyContract("hover", ("np_prob", "hv"), ("tp_prob",), HoverOptions),
    "boundary": FamilyContract("boundary", ("sem_prob", "boundary_prob"), (), BoundaryOptions),
    # One image per run: (K, 4) xyxy input pixels, (K,) scores, (K,) int64 classes 1..C and
    # (K, 1, M, M) box-relative mask probabilities, in descending score.
    "instance": FamilyContract("instance", ("boxes", "scores", "classes", "masks"), (),
                               InstanceOptions),
}
"""Every family a card may name."""


def contract(family: str) -> FamilyContract:
    """The contract of ``family``; ValueError naming the known ones otherwise."""
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})") from None
