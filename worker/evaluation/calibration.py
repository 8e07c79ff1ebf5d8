"""Class outcomes of a model on validation data, through the inference path: the input of
``hoverserve model calibrate``.

Each predicted nucleus paired with an annotated one (centroids within 3 µm) is *right* when the
two classes agree; its raw score is its class vote share (the card's post-processing without its
calibration and class floor, unless asked otherwise). Reliability tables and the fitted map are
:mod:`models.calibration`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from models.calibration import Outcomes
from models.card import ModelCard
from models.evaluate import radius_for_mpp
from models.evaluate_points import (
    class_map,
    is_point_dataset,
    label_centres,
    point_class_names,
    read_points,
)
from models.metrics import pair_centroids
from worker.evaluation.model import nuclei_from_maps, predict_image_maps
from worker.families import job_options
from worker.infer import Model, load_model

__all__ = ["class_outcomes", "outcome_options"]


def outcome_options(card: ModelCard, *, raw: bool = True) -> Any:
    """The card's post-processing options for collecting outcomes; ``raw`` drops the card's
    class-probability calibration and floor (for families that have them), so scores are the
    vote shares a new calibration is fitted to."""
    options = job_options(card)
    if raw and hasattr(options, "class_prob_calibration"):
        options = dataclasses.replace(options, class_prob_calibration=(), min_class_prob=0.0)
    return options


def _predicted(model: Model, image: NDArray[np.uint8], mpp: float, options: Any
               ) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.float64]]:
    maps = predict_image_maps(model, image, mpp)
    labels, nuclei = nuclei_from_maps(maps, model.card, options, typed=model.typed)
    ids, xy = label_centres(labels)
    kinds = np.asarray([nuclei.get(int(lab), (0, 0.0))[0] for lab in ids], np.int64)
    probs = np.asarray([nuclei.get(int(lab), (0, 0.0))[1] for lab in ids], np.float64)
    return xy, kinds, probs


def _outcomes(xy: NDArray, kinds: NDArray, probs: NDArray, gt_xy: NDArray, gt_kinds: NDArray,
              radius: float) -> Outcomes:
    pairs, _, _ = pair_centroids(xy, gt_xy, radius=radius)
    pred, gt = pairs[:, 0], pairs[:, 1]
    keep = (kinds[pred] > 0) & (gt_kinds[gt] > 0)
    return Outcomes(probs[pred][keep], kinds[pred][keep] == gt_kinds[gt][keep])


def class_outcomes(model_path: str | Path, data: str | Path, *, split: str | None = None,
                   only: Sequence[str] = (), raw: bool = True) -> Outcomes:
    """Class outcomes of a model on a point data set (``points.npz``) or a classified outline
    data set, through the inference path.

    Parameters
    ----------
    model_path : str or Path
        ONNX model with a HoVerServe card.
    data : str or Path
        A point data set, or an outline data set with type maps (images without are skipped).
    split : str, optional
        Point data sets: only this split.
    only : sequence of str
        Keep only images whose name starts with one of these prefixes.
    raw : bool
        Score without the card's calibration and class floor (:func:`outcome_options`).

    Returns
    -------
    Outcomes
        The raw scores of paired, classified nuclei and whether each class was right.
    """
    model = load_model(model_path, device="cpu")
    options = outcome_options(model.card, raw=raw)
    parts = []
    if is_point_dataset(data):
        mapping = class_map(point_class_names(data), [c.name for c in model.card.classes])
        for im in read_points(data, split=split):
            if only and not im.name.startswith(tuple(only)):
                continue
            xy, kinds, probs = _predicted(model, im.image, im.mpp, options)
            gt = np.asarray([mapping.get(int(c), 0) for c in im.classes], np.int64)
            parts.append(_outcomes(xy, kinds, probs, im.xy, gt, radius_for_mpp(im.mpp)))
    else:
        from scipy import ndimage

        from models.datasets import read_labelled

        for lab in read_labelled(data):
            if (only and not lab.name.startswith(tuple(only))) or lab.types is None:
                continue
            xy, kinds, probs = _predicted(model, lab.image, lab.mpp, options)
            ids = np.unique(lab.inst[lab.inst > 0])
            rc = np.asarray(ndimage.center_of_mass(lab.inst > 0, lab.inst, ids)).reshape(-1, 2)
            gt = np.asarray([np.bincount(lab.types[lab.inst == i]).argmax() for i in ids], np.int64)
            parts.append(_outcomes(xy, kinds, probs, rc[:, ::-1], gt, radius_for_mpp(lab.mpp)))
    return Outcomes.concat(parts)
