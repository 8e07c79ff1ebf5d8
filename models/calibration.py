"""Class probabilities that mean what they say: reliability tables and a calibration map.

A nucleus's raw class score is the share of its pixels that vote for its class. On validation
data, each predicted nucleus paired with an annotated one (centroids within 3 µm) is *right* when
the two classes agree. :func:`reliability_table` bins nuclei by score and compares the mean score
with the share that is right (expected calibration error, ECE: their weighted mean gap);
:func:`fit_calibration` turns the same outcomes into a non-decreasing map (pool-adjacent-violators
over equal-count bins), which a card stores as ``postprocess.class_prob_calibration`` and the
post-processing applies (:meth:`models.families.HoverOptions.class_probability`).

``hoverserve model calibrate MODEL DATA... -o OUT`` collects the outcomes through the inference
path (:func:`class_outcomes`), prints the table before and after, and writes a carded copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["Outcomes", "class_outcomes", "fit_calibration", "reliability_table"]


@dataclass(frozen=True)
class Outcomes:
    """Raw class scores (n,) of paired, classified nuclei and whether each class was right (n,)."""

    scores: NDArray[np.float64]
    correct: NDArray[np.bool_]

    @staticmethod
    def concat(parts: Sequence[Outcomes]) -> Outcomes:
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


def _predicted(model: Any, image: NDArray[np.uint8], mpp: float, postprocess: dict[str, Any]
               ) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.float64]]:
    from models.evaluate_model import nuclei_from_maps, predict_image_maps
    from models.evaluate_points import label_centres

    labels, nuclei = nuclei_from_maps(predict_image_maps(model, image, mpp), model.card.mpp, postprocess)
    ids, xy = label_centres(labels)
    kinds = np.asarray([nuclei.get(int(lab), (0, 0.0))[0] for lab in ids], np.int64)
    probs = np.asarray([nuclei.get(int(lab), (0, 0.0))[1] for lab in ids], np.float64)
    return xy, kinds, probs


def _outcomes(xy: NDArray, kinds: NDArray, probs: NDArray, gt_xy: NDArray, gt_kinds: NDArray,
              radius: float) -> Outcomes:
    from models.metrics import pair_centroids

    pairs, _, _ = pair_centroids(xy, gt_xy, radius=radius)
    pred, gt = pairs[:, 0], pairs[:, 1]
    keep = (kinds[pred] > 0) & (gt_kinds[gt] > 0)
    return Outcomes(probs[pred][keep], kinds[pred][keep] == gt_kinds[gt][keep])


def class_outcomes(model_path: str | Path, data: str | Path, *, split: str | None = None,
                   only: Sequence[str] = (), raw: bool = True) -> Outcomes:
    """Class outcomes of a model on a point data set (``points.npz``) or a classified outline
    data set, through the inference path. ``raw`` scores without the card's calibration."""
    from models.evaluate import radius_for_mpp
    from models.evaluate_model import card_postprocess
    from models.evaluate_points import class_map, is_point_dataset, point_class_names, read_points
    from worker.infer import load_model

    model = load_model(model_path, device="cpu")
    postprocess = card_postprocess(model.card)
    if raw:
        postprocess = {k: v for k, v in postprocess.items()
                       if k not in ("class_prob_calibration", "min_class_prob")}
    parts = []
    if is_point_dataset(data):
        mapping = class_map(point_class_names(data), [c.name for c in model.card.classes])
        for im in read_points(data, split=split):
            if only and not im.name.startswith(tuple(only)):
                continue
            xy, kinds, probs = _predicted(model, im.image, im.mpp, postprocess)
            gt = np.asarray([mapping.get(int(c), 0) for c in im.classes], np.int64)
            parts.append(_outcomes(xy, kinds, probs, im.xy, gt, radius_for_mpp(im.mpp)))
    else:
        from scipy import ndimage

        from models.datasets import read_labelled

        for lab in read_labelled(data):
            if (only and not lab.name.startswith(tuple(only))) or lab.types is None:
                continue
            xy, kinds, probs = _predicted(model, lab.image, lab.mpp, postprocess)
            ids = np.unique(lab.inst[lab.inst > 0])
            rc = np.asarray(ndimage.center_of_mass(lab.inst > 0, lab.inst, ids)).reshape(-1, 2)
            gt = np.asarray([np.bincount(lab.types[lab.inst == i]).argmax() for i in ids], np.int64)
            parts.append(_outcomes(xy, kinds, probs, rc[:, ::-1], gt, radius_for_mpp(lab.mpp)))
    return Outcomes.concat(parts)
