"""Calibration of class probabilities: the reliability table bins scores and measures the gap to
the share of right classes; the fitted map is non-decreasing and follows the true curve (the
outcomes from the inference path: tests/worker/evaluation/test_calibration.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from models.calibration import fit_calibration, reliability_table
from models.families import HoverOptions


def test_a_calibrated_model_has_a_small_gap_and_an_overconfident_one_a_large_gap() -> None:
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, 50_000)
    honest = rng.uniform(0, 1, scores.size) < scores
    table = reliability_table(scores, honest, bins=10)
    assert table["n"] == scores.size and len(table["bins"]) == 10
    assert table["ece"] < 0.02
    for row in table["bins"]:
        assert row["from"] <= row["mean_probability"] <= row["to"]
    overconfident = rng.uniform(0, 1, scores.size) < scores ** 3
    assert reliability_table(scores, overconfident)["ece"] > 0.15
    with pytest.raises(ValueError, match="one outcome per score"):
        reliability_table(scores, honest[:-1])


def test_the_fitted_map_is_monotone_and_follows_the_true_curve() -> None:
    rng = np.random.default_rng(1)
    scores = rng.uniform(0.2, 1, 40_000)
    correct = rng.uniform(0, 1, scores.size) < scores ** 2
    points = fit_calibration(scores, correct, bins=12)
    xs, ys = zip(*points, strict=True)
    assert all(b > a for a, b in itertools.pairwise(xs))
    assert all(b >= a for a, b in itertools.pairwise(ys))
    for x, y in points:
        assert y == pytest.approx(x ** 2, abs=0.04)
    options = HoverOptions(class_prob_calibration=points)  # a valid card option
    after = np.array([options.class_probability(s) for s in scores])
    assert reliability_table(after, correct)["ece"] < reliability_table(scores, correct)["ece"] / 3
    with pytest.raises(ValueError, match="at least"):
        fit_calibration(scores[:5], correct[:5], bins=12)


def test_violations_are_pooled_into_a_non_decreasing_map() -> None:
    scores = np.repeat([0.1, 0.3, 0.5, 0.7], 10)
    correct = np.concatenate([np.zeros(10), np.ones(10), np.zeros(10), np.ones(10)]).astype(bool)
    points = fit_calibration(scores, correct, bins=4)
    assert points == ((0.1, 0.0), (0.4, 0.5), (0.7, 1.0))
