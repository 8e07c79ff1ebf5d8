"""Stain vectors and colour deconvolution for H&E, as QuPath defines them.

Optical density follows QuPath (``ColorDeconvolutionHelper.makeOD``): per channel
``OD = max(0, -log10(max(v, 1) / background))``. A pixel's OD vector is a non-negative mix of stain
vectors (unit length, RGB order); the stain amounts are ``od @ inv(M)`` with the rows of ``M`` being
hematoxylin, eosin and a residual orthogonal to both (QuPath's ``StainVector.makeResidualStainVector``).

Stain vectors are estimated once per slide on tissue with Macenko's method; when that fails (too
little stained tissue, a degenerate plane) QuPath's own H&E defaults are used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "DEFAULT_BACKGROUND",
    "DEFAULT_EOSIN",
    "DEFAULT_HEMATOXYLIN",
    "StainVectors",
    "deconvolve",
    "estimate_stains",
    "macenko",
    "optical_density",
]

logger = logging.getLogger(__name__)

DEFAULT_HEMATOXYLIN = (0.65, 0.70, 0.29)
"""QuPath's default hematoxylin OD vector (Ruifrok & Johnston), before normalisation."""

DEFAULT_EOSIN = (0.2159, 0.8012, 0.5581)
"""QuPath's default eosin OD vector, before normalisation."""

DEFAULT_BACKGROUND = (255.0, 255.0, 255.0)
"""QuPath's default background (white) RGB values."""

MIN_OD = 0.15
"""Pixels whose OD vector is shorter than this are background, not stain (Macenko's beta)."""

MIN_PIXELS = 500
"""Fewest stained tissue pixels Macenko estimation accepts."""

MAX_PIXELS = 250_000
"""Pixels used at most (an even subsample): the estimate does not improve beyond, the time does."""


def _unit(vector: Any) -> NDArray[np.float64]:
    v = np.asarray(vector, dtype=np.float64).reshape(3)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm <= 0:
        raise ValueError(f"a stain vector needs a positive finite length, got {v.tolist()}")
    return v / norm


@dataclass(frozen=True)
class StainVectors:
    """Unit hematoxylin and eosin OD vectors and the background RGB they are relative to.

    Attributes
    ----------
    hematoxylin, eosin : (3,) float ndarray
        Unit OD vectors (red, green, blue).
    background : (3,) float ndarray
        RGB of unstained glass (OD 0), each in 1..255.
    source : {"macenko", "default"}
        Estimated on the slide, or QuPath's H&E defaults.
    """

    hematoxylin: NDArray[np.float64]
    eosin: NDArray[np.float64]
    background: NDArray[np.float64]
    source: Literal["macenko", "default"] = "default"

    def __post_init__(self) -> None:
        object.__setattr__(self, "hematoxylin", _unit(self.hematoxylin))
        object.__setattr__(self, "eosin", _unit(self.eosin))
        bg = np.asarray(self.background, dtype=np.float64).reshape(3)
        if not np.all(np.isfinite(bg)) or bg.min() < 1 or bg.max() > 255:
            raise ValueError(f"background must be three RGB values in 1..255, got {bg.tolist()}")
        object.__setattr__(self, "background", bg)
        if abs(float(self.hematoxylin @ self.eosin)) > 0.9999:
            raise ValueError("hematoxylin and eosin vectors must not be parallel")

    @classmethod
    def default(cls) -> StainVectors:
        """QuPath's H&E defaults (``ColorDeconvolutionStains`` "H&E default")."""
        return cls(np.array(DEFAULT_HEMATOXYLIN), np.array(DEFAULT_EOSIN),
                   np.array(DEFAULT_BACKGROUND), "default")

    @property
    def residual(self) -> NDArray[np.float64]:
        """Unit vector orthogonal to both stains (QuPath's third, residual stain)."""
        return _unit(np.cross(self.hematoxylin, self.eosin))

    def matrix(self) -> NDArray[np.float64]:
        """(3, 3) rows hematoxylin, eosin, residual."""
        return np.stack([self.hematoxylin, self.eosin, self.residual])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record for the manifest (QuPath's "Values" and "Background" order)."""
        return {
            "name": "H&E estimated" if self.source == "macenko" else "H&E default",
            "source": self.source,
            "hematoxylin": [round(float(v), 5) for v in self.hematoxylin],
            "eosin": [round(float(v), 5) for v in self.eosin],
            "residual": [round(float(v), 5) for v in self.residual],
            "background": [round(float(v), 2) for v in self.background],
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> StainVectors:
        """Inverse of :meth:`to_dict`."""
        source = record.get("source", "default")
        if source not in ("macenko", "default"):
            raise ValueError(f"unknown stain source {source!r}")
        return cls(np.array(record["hematoxylin"]), np.array(record["eosin"]),
                   np.array(record["background"]), source)


def optical_density(
    rgb: NDArray[np.uint8], background: Any = DEFAULT_BACKGROUND
) -> NDArray[np.float32]:
    """Per-channel optical density of an RGB array (..., 3), as QuPath computes it."""
    arr = np.asarray(rgb)
    if arr.shape[-1:] != (3,):
        raise ValueError(f"rgb must have 3 channels last, got shape {arr.shape}")
    bg = np.asarray(background, dtype=np.float64).reshape(3)
    # One lookup table per channel: 256 logs instead of one per pixel.
    levels = np.maximum(np.arange(256, dtype=np.float64), 1.0)
    lut = np.maximum(0.0, -np.log10(levels[None, :] / bg[:, None])).astype(np.float32)
    idx = np.clip(arr, 0, 255).astype(np.intp)
    out = np.empty(arr.shape, np.float32)
    for c in range(3):
        out[..., c] = lut[c][idx[..., c]]
    return out


def deconvolve(rgb: NDArray[np.uint8], stains: StainVectors) -> NDArray[np.float32]:
    """Stain amounts (..., 3): hematoxylin OD, eosin OD and residual, per pixel."""
    od = optical_density(rgb, stains.background)
    inverse = np.linalg.inv(stains.matrix()).astype(np.float32)
    return np.asarray(od @ inverse, dtype=np.float32)


def macenko(
    od: NDArray[np.floating], *, min_od: float = MIN_OD, percentile: float = 1.0
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Hematoxylin and eosin unit vectors from OD pixels (N, 3) by Macenko et al. (2009).

    The OD vectors of stained pixels lie in the plane of the two leading eigenvectors of their
    covariance; the stains are the directions at the ``percentile`` and ``100 - percentile`` of the
    angles within that plane. Hematoxylin is the one with the larger red component (it absorbs red
    more than eosin does).

    Raises
    ------
    ValueError
        Too few stained pixels, or a degenerate (one-stain) plane.
    """
    pixels = np.asarray(od, dtype=np.float64).reshape(-1, 3)
    pixels = pixels[np.linalg.norm(pixels, axis=1) >= min_od]
    pixels = pixels[np.all(np.isfinite(pixels), axis=1)]
    if len(pixels) < MIN_PIXELS:
        raise ValueError(f"only {len(pixels)} stained pixels (need {MIN_PIXELS})")
    _, vectors = np.linalg.eigh(np.cov(pixels, rowvar=False))
    plane = vectors[:, 1:3][:, ::-1]  # leading eigenvector first
    # Orient the plane so that stains (all-positive ODs) project positively.
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
    projected = pixels @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [percentile, 100.0 - percentile])
    if high - low < np.deg2rad(3.0):
        raise ValueError("stained pixels span one direction only: cannot separate two stains")
    first = plane @ np.array([np.cos(low), np.sin(low)])
    second = plane @ np.array([np.cos(high), np.sin(high)])
    if first.min() < -0.05 or second.min() < -0.05:
        raise ValueError("an estimated stain vector has negative optical density")
    first, second = np.clip(first, 0, None), np.clip(second, 0, None)
    h, e = (first, second) if first[0] / np.linalg.norm(first) > second[0] / np.linalg.norm(
        second) else (second, first)
    return _unit(h), _unit(e)


def _subsample(pixels: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """At most :data:`MAX_PIXELS` of ``pixels`` (N, 3), evenly strided (deterministic)."""
    step = -(-len(pixels) // MAX_PIXELS)
    return pixels[::step] if step > 1 else pixels


def _background(rgb: NDArray[np.uint8], tissue: NDArray[np.bool_] | None) -> NDArray[np.float64]:
    """Median RGB of the glass (pixels outside tissue), or white when there is too little."""
    pixels = rgb.reshape(-1, 3)
    glass = _subsample(pixels if tissue is None else pixels[~tissue.reshape(-1)])
    glass = glass[glass.min(axis=1) >= 200]  # glass is near white; dark non-tissue is debris
    if len(glass) < MIN_PIXELS:
        return np.array(DEFAULT_BACKGROUND)
    return np.clip(np.median(glass, axis=0), 1.0, 255.0).astype(np.float64)


def estimate_stains(
    rgb: NDArray[np.uint8], tissue: NDArray[np.bool_] | None = None
) -> StainVectors:
    """Stain vectors of a slide from its thumbnail (H, W, 3) and tissue mask (same H, W).

    Falls back to :meth:`StainVectors.default` (logged) when Macenko estimation fails or yields
    vectors far from H&E (no estimate is better than a wrong one for the OD measurements).
    """
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"rgb must be an (H, W, 3) image, got shape {arr.shape}")
    if tissue is not None and np.shape(tissue) != arr.shape[:2]:
        raise ValueError(f"tissue mask shape {np.shape(tissue)} must match image {arr.shape[:2]}")
    background = _background(arr, tissue)
    pixels = _subsample(arr.reshape(-1, 3) if tissue is None else arr[np.asarray(tissue, bool)])
    try:
        h, e = macenko(optical_density(pixels, background))
        stains = StainVectors(h, e, background, "macenko")
    except ValueError as exc:
        logger.info("stain estimation failed (%s): using QuPath's H&E defaults", exc)
        return StainVectors(np.array(DEFAULT_HEMATOXYLIN), np.array(DEFAULT_EOSIN), background)
    defaults = StainVectors.default()
    # Beyond ~30° from the default, the "estimate" is more likely another stain or an artefact.
    limit = np.cos(np.deg2rad(30.0))
    if stains.hematoxylin @ defaults.hematoxylin < limit or stains.eosin @ defaults.eosin < limit:
        logger.info("estimated stains %s are far from H&E: using QuPath's defaults",
                    stains.to_dict())
        return StainVectors(defaults.hematoxylin, defaults.eosin, background)
    return stains
