"""Score a model on point-annotated images (a dot and a class per cell, no outlines).

``hoverserve model evaluate MODEL ../shared/data/nuclei/brca_m2c --split val`` runs the model
through the same inference path as :mod:`worker.evaluation.model` (its family's post-processing,
the card's options) and pairs each predicted nucleus centre with the annotated points
(:func:`models.metrics.point_scores`: Hungarian pairing within 3 µm, HoVer-Net's rule), then
reports detection F1 and eq. 8's F_c per class. Reading the data and matching its classes to the
model's are :mod:`models.evaluate_points`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from models.evaluate import radius_for_mpp
from models.evaluate_points import class_map, label_centres, point_class_names, read_points
from models.metrics import DetectionResult, point_scores
from worker.evaluation.model import predict_instances
from worker.infer import load_model

__all__ = ["evaluate_points"]


def _centres(labels: NDArray[np.int32], types: dict[int, int]) -> tuple[NDArray, NDArray]:
    ids, xy = label_centres(labels)
    return xy, np.asarray([types.get(int(lab), 0) for lab in ids], dtype=np.int64)


def _num(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def evaluate_points(
    model_path: str | Path,
    data: str | Path,
    *,
    split: str | None = None,
    only: Sequence[str] = (),
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Run a model on a point data set and score detection and classes.

    Parameters
    ----------
    model_path : str or Path
        ONNX model with a HoVerServe card.
    data : str or Path
        A point data set (``points.npz`` beside ``images/``).
    split : str, optional
        Score only this split (e.g. ``"val"``); None scores every image.
    only : sequence of str
        Keep only images whose name starts with one of these prefixes.
    device : str
        ``"cpu"``, ``"cuda"`` or ``"auto"``.
    progress : bool
        Show a progress bar.

    Returns
    -------
    dict
        ``n_images``, ``radius_px``, ``detection`` (``f1_d``, ``precision``, ``recall``,
        ``type_accuracy``), ``classes`` (name → ``f1``: eq. 8's F_c), ``mean_f_c`` over the
        scored classes and ``per_image``; JSON-ready, None where undefined.
    """
    from tqdm import tqdm

    model = load_model(model_path, device=device)  # type: ignore[arg-type]
    names = [c.name for c in model.card.classes]
    mapping = class_map(point_class_names(data), names) if model.typed else {}
    images = [im for im in read_points(data, split=split) if not only or im.name.startswith(tuple(only))]
    if not images:
        raise ValueError(f"{data}: no images in split {split!r}" if split else f"{data}: no images")
    class_ids = sorted(set(mapping.values()))
    typed = bool(class_ids)
    results: list[DetectionResult] = []
    per_image = []
    for im in tqdm(images, disable=not progress, desc=Path(data).name):
        labels, types = predict_instances(model, im.image, im.mpp)
        xy, cls = _centres(labels, types)
        gt_cls = np.asarray([mapping.get(int(c), 0) for c in im.classes], dtype=np.int64)
        result = point_scores(xy, cls if typed else None, im.xy, gt_cls if typed else None,
                              radius=radius_for_mpp(im.mpp), class_ids=class_ids or None)
        results.append(result)
        per_image.append({"name": im.name, "f1_d": _num(result.f1_d), "nuclei": len(xy),
                          "points": len(im.xy)})
    pooled = DetectionResult.pooled(results)
    classes = {names[c]: {"f1": _num(pooled.per_class.get(c, math.nan))} for c in class_ids}
    defined = [v["f1"] for v in classes.values() if v["f1"] is not None]
    return {
        "model": str(model_path),
        "data": str(data),
        "split": split,
        "n_images": len(images),
        "radius_px": radius_for_mpp(images[0].mpp),
        "detection": {"f1_d": _num(pooled.f1_d), "precision": _num(pooled.precision),
                      "recall": _num(pooled.recall), "type_accuracy": _num(pooled.type_accuracy)},
        "classes": classes,
        "mean_f_c": sum(defined) / len(defined) if defined else None,
        "per_image": per_image,
    }
