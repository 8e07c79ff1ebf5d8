"""Class probabilities that mean what they say: reliability tables and a calibration map.

A nucleus's raw class score is the share of its pixels that vote for its class. On validation
data, each predicted nucleus paired with an annotated one (centroids within 3 µm) is *right* when
the two classes agree. :func:`reliability_table` bins nuclei by score and compares the mean score
with the share that is right (expected calibration error, ECE: their weighted mean gap);
:func:`fit_calibration` turns the same outcomes into a non-decreasing map (pool-adjacent-violators
over equal-count bins), which a card stores as ``postprocess.class_prob_calibration`` and the
post-processing applies (:meth:`models.families.HoverOptions.class_probability`).

``hoverserve model calibrate MODEL DATA... -o OUT`` collects the outcomes through the inference
path (:func:`worker.evaluation.calibration.class_outcomes`), prints the table before and after,
and writes a carded copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["Outcomes", "fit_calibration", "reliability_table"]


@dataclass(frozen=True)
class Outcomes:
    """Raw class scores (n,) of paired, classified nuclei and whether each class was right (n,)."""

    scores: NDArray[np.float64]
    correct: NDArray[np.bool_]

    @staticmethod
    def concat(parts: Sequence[Outcomes]) -> Outcomes:
        """All ``parts`` as one set of outcomes (empty when there are none)."""
        return Outcomes(np.concatenate([p.scores for p in parts] or [np.zeros(0)]),
                        np.concatenate([p.correct for p in parts] or [np.zeros(0, bool)]))


def reliability_table(scores: NDArray[np.floating], correct: NDArray[np.bool_], *,
                      bins: int = 10) -> dict[str, Any]:
    """Mean score and share right per score bin (equal widths over 0..1), and the ECE."""
    scores, correct = np.asarray(scores, np.float64), np.asarray(correct, bool)
    if scores.shape != correct.shape:
        raise ValueError("one outcome per score is needed")
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    rows, gap = [], 0.0
    for b in range(bins):
        inside = index == b
        n = int(inside.sum())
        if n:
            mean, right = float(scores[inside].mean()), float(correct[inside].mean())
            gap += n * abs(mean - right)
            rows.append({"from": float(edges[b]), "to": float(edges[b + 1]), "n": n,
                         "mean_probability": mean, "share_right": right})
    total = int(scores.size)
    return {"n": total, "bins": rows, "ece": gap / total if total else None}


def fit_calibration(scores: NDArray[np.floating], correct: NDArray[np.bool_], *,
                    bins: int = 10) -> tuple[tuple[float, float], ...]:
    """A non-decreasing map score → probability of being right, as (score, probability) points."""
    scores, correct = np.asarray(scores, np.float64), np.asarray(correct, bool)
    if scores.size < 2 * bins:
        raise ValueError(f"need at least {2 * bins} outcomes to calibrate, got {scores.size}")
    order = np.argsort(scores, kind="stable")
    groups = [g for g in np.array_split(order, bins) if g.size]
    xs = [float(scores[g].mean()) for g in groups]
    ys = [float(correct[g].mean()) for g in groups]
    weights = [float(g.size) for g in groups]
    # Pool adjacent violators: merge neighbouring bins until the share right never decreases.
    blocks = [[x, y, w] for x, y, w in zip(xs, ys, weights, strict=True)]
    merged: list[list[float]] = []
    for block in blocks:
        merged.append(block)
        while len(merged) > 1 and merged[-2][1] > merged[-1][1]:
            (x1, y1, w1), (x2, y2, w2) = merged[-2], merged.pop()
            merged[-1] = [(x1 * w1 + x2 * w2) / (w1 + w2), (y1 * w1 + y2 * w2) / (w1 + w2), w1 + w2]
    points: list[tuple[float, float]] = []
    for x, y, _ in merged:
        if points and x <= points[-1][0]:
            continue
        points.append((round(x, 4), round(y, 4)))
    if len(points) == 1:  # every score alike: a flat map over the whole range
        points = [(0.0, points[0][1]), (1.0, points[0][1])]
    return tuple(points)
