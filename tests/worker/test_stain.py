"""Stain vectors: QuPath's optical density and defaults, colour deconvolution of a synthetic H&E
patch made from known vectors, and Macenko estimation recovering those vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.stain import (
    DEFAULT_EOSIN,
    DEFAULT_HEMATOXYLIN,
    StainVectors,
    deconvolve,
    estimate_stains,
    macenko,
    optical_density,
)

# Known vectors some way from QuPath's defaults, so that recovering them is not a fallback.
TRUE_H = np.array([0.60, 0.75, 0.28]) / np.linalg.norm([0.60, 0.75, 0.28])
TRUE_E = np.array([0.10, 0.85, 0.52]) / np.linalg.norm([0.10, 0.85, 0.52])
BACKGROUND = np.array([242.0, 238.0, 245.0])


def _angle(u: np.ndarray, v: np.ndarray) -> float:
    return math.degrees(math.acos(min(1.0, float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))))


def _he_patch(shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB uint8 of known hematoxylin and eosin amounts (Beer–Lambert), and those amounts."""
    rng = np.random.default_rng(seed)
    # Stroma (eosin only), nuclei (hematoxylin only) and their mixtures, as Macenko assumes.
    h_amount = rng.uniform(0.1, 0.8, shape) * (rng.random(shape) < 0.5)
    e_amount = rng.uniform(0.05, 0.6, shape) * ((h_amount == 0) | (rng.random(shape) < 0.6))
    od = h_amount[..., None] * TRUE_H + e_amount[..., None] * TRUE_E
    rgb = np.clip(np.round(BACKGROUND * 10.0 ** (-od)), 0, 255).astype(np.uint8)
    return rgb, h_amount, e_amount


def test_optical_density_is_qupaths_clipped_log() -> None:
    rgb = np.array([[[255, 0, 128], [1, 255, 255]]], np.uint8)
    od = optical_density(rgb, (255, 255, 255))
    assert od[0, 0, 0] == 0.0
    assert od[0, 0, 1] == pytest.approx(math.log10(255))  # 0 is clipped to 1
    assert od[0, 0, 2] == pytest.approx(-math.log10(128 / 255), rel=1e-6)
    assert od[0, 1, 0] == pytest.approx(math.log10(255))
    # Brighter than the background is no stain, not negative stain.
    assert optical_density(np.array([[250, 250, 250]], np.uint8), (240, 240, 240)).max() == 0.0


def test_defaults_are_qupaths_h_and_e() -> None:
    stains = StainVectors.default()
    assert stains.source == "default"
    np.testing.assert_allclose(stains.hematoxylin, np.array(DEFAULT_HEMATOXYLIN) / np.linalg.norm(
        DEFAULT_HEMATOXYLIN))
    np.testing.assert_allclose(stains.eosin, np.array(DEFAULT_EOSIN) / np.linalg.norm(DEFAULT_EOSIN))
    np.testing.assert_allclose(stains.background, [255, 255, 255])
    assert abs(stains.residual @ stains.hematoxylin) < 1e-12
    assert abs(stains.residual @ stains.eosin) < 1e-12
    record = stains.to_dict()
    assert record["name"] == "H&E default"
    assert StainVectors.from_dict(record).hematoxylin == pytest.approx(stains.hematoxylin, abs=1e-5)


def test_bad_stain_vectors_are_refused() -> None:
    with pytest.raises(ValueError, match="length"):
        StainVectors(np.zeros(3), TRUE_E, BACKGROUND)
    with pytest.raises(ValueError, match="parallel"):
        StainVectors(TRUE_H, TRUE_H * 2, BACKGROUND)
    with pytest.raises(ValueError, match="background"):
        StainVectors(TRUE_H, TRUE_E, np.array([0.0, 255, 255]))


def test_deconvolution_recovers_known_amounts_from_a_synthetic_patch() -> None:
    rgb, h_amount, e_amount = _he_patch((64, 64))
    amounts = deconvolve(rgb, StainVectors(TRUE_H, TRUE_E, BACKGROUND))
    # 8-bit rounding limits the precision: ±0.5 of ~120 grey levels is ~0.004 OD per channel.
    np.testing.assert_allclose(amounts[..., 0], h_amount, atol=0.03)
    np.testing.assert_allclose(amounts[..., 1], e_amount, atol=0.03)
    assert np.abs(amounts[..., 2]).max() < 0.03  # nothing left for the residual
    # With the wrong (default) vectors the same patch reads differently.
    wrong = deconvolve(rgb, StainVectors.default())
    assert np.abs(wrong[..., 0] - h_amount).max() > 0.05


def test_macenko_recovers_known_vectors() -> None:
    rgb, _, _ = _he_patch((200, 200), seed=1)
    h, e = macenko(optical_density(rgb, BACKGROUND))
    assert _angle(h, TRUE_H) < 2.0
    assert _angle(e, TRUE_E) < 2.0


def test_estimate_stains_uses_tissue_and_finds_the_background() -> None:
    rgb, _, _ = _he_patch((160, 160), seed=2)
    image = np.full((200, 200, 3), BACKGROUND.astype(np.uint8), np.uint8)
    image[20:180, 20:180] = rgb
    tissue = np.zeros((200, 200), bool)
    tissue[20:180, 20:180] = True
    stains = estimate_stains(image, tissue)
    assert stains.source == "macenko"
    np.testing.assert_allclose(stains.background, BACKGROUND)
    assert _angle(stains.hematoxylin, TRUE_H) < 2.0
    assert _angle(stains.eosin, TRUE_E) < 2.0
    assert stains.to_dict()["name"] == "H&E estimated"


def test_estimation_falls_back_to_qupaths_defaults() -> None:
    blank = np.full((100, 100, 3), 250, np.uint8)  # no stain at all
    stains = estimate_stains(blank)
    assert stains.source == "default"
    np.testing.assert_allclose(stains.hematoxylin, StainVectors.default().hematoxylin)
    # One stain only (pure eosin): no plane to separate two stains in.
    rng = np.random.default_rng(4)
    od = rng.uniform(0.2, 0.8, (100, 100, 1)) * TRUE_E
    pink = np.round(255 * 10.0 ** (-od)).astype(np.uint8)
    assert estimate_stains(pink).source == "default"
    with pytest.raises(ValueError, match="shape"):
        estimate_stains(blank, np.ones((10, 10), bool))
