"""Point-annotated images (a dot and a class per cell, no outlines): reading, class matching.

This module reads such data sets and matches their classes to a model's; scoring a model on them
(``hoverserve model evaluate MODEL ../shared/data/nuclei/brca_m2c --split val``) runs it through
the inference path, so it lives with the worker (:func:`worker.evaluation.points.evaluate_points`):
each predicted nucleus centre is paired with the annotated points (Hungarian pairing within 3 µm,
HoVer-Net's rule), then detection F1 and eq. 8's F_c per class are reported.

Layout (``points.npz`` beside ``images/<name>.png``): ``names``, ``split`` ('train'/'val'),
``mpp``, ``class_names`` (entry 0 the background) and per image ``<name>_xy`` (K, 2) (x, y)
pixels and ``<name>_cls`` (K,) class ids. Point classes are matched to the model's classes by
name, through :data:`CLASS_ALIASES` (BRCA-M2C's lymphocyte / tumour / stromal are CoNSeP's
inflammatory / epithelial / spindle).

Not every cell carries a point in such data sets, so precision (and with it F_d and the
unpaired-prediction term of F_c) counts some real nuclei as false positives: compare models on
the same data, not with outline-annotated scores.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "CLASS_ALIASES",
    "PointImage",
    "class_map",
    "is_point_dataset",
    "label_centres",
    "point_class_names",
    "point_table",
    "read_points",
]

POINTS_FILE = "points.npz"

CLASS_ALIASES: dict[str, str] = {
    "lymphocyte": "inflammatory",
    "tumour": "epithelial",
    "tumor": "epithelial",
    "stromal": "spindle",
}
"""Point-annotation class names → the model classes they are scored as."""


@dataclass(frozen=True)
class PointImage:
    """One point-annotated RGB image."""

    name: str
    image: NDArray[np.uint8]
    mpp: float
    xy: NDArray[np.float64]
    classes: NDArray[np.int64]
    split: str


def is_point_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a ``points.npz``."""
    return (Path(path) / POINTS_FILE).is_file()


def read_points(folder: str | Path, *, split: str | None = None) -> Iterator[PointImage]:
    """The images of a point data set (optionally one split), with their points."""
    import cv2

    folder = Path(folder)
    with np.load(folder / POINTS_FILE, allow_pickle=False) as arrays:
        names = [str(n) for n in arrays["names"]]
        splits = [str(s) for s in arrays["split"]] if "split" in arrays else ["all"] * len(names)
        mpp = float(arrays["mpp"])
        points = {n: (arrays[f"{n}_xy"].astype(np.float64), arrays[f"{n}_cls"].astype(np.int64))
                  for n in names}
    for name, part in zip(names, splits, strict=True):
        if split is not None and part != split:
            continue
        bgr = cv2.imread(str(folder / "images" / f"{name}.png"), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{folder}: cannot read images/{name}.png")
        xy, cls = points[name]
        yield PointImage(name, np.ascontiguousarray(bgr[..., ::-1]), mpp, xy, cls, part)


def point_class_names(folder: str | Path) -> tuple[str, ...]:
    """The class names a point data set lists (entry 0 the background)."""
    with np.load(Path(folder) / POINTS_FILE, allow_pickle=False) as arrays:
        return tuple(str(n) for n in arrays["class_names"])


def class_map(point_names: Sequence[str], model_names: Sequence[str]) -> dict[int, int]:
    """Point class id → model class id, by name (aliases applied); unmatched classes are left out."""
    model_ids = {n.lower(): i for i, n in enumerate(model_names)}
    mapping = {}
    for i, name in enumerate(point_names):
        if i == 0:
            continue
        key = CLASS_ALIASES.get(name.lower(), name.lower())
        if key in model_ids:
            mapping[i] = model_ids[key]
    return mapping


def label_centres(labels: NDArray[np.integer]) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Each instance's id (n,) and centre of mass (n, 2) as (x, y) pixels, ids ascending."""
    from skimage.measure import regionprops_table

    props = regionprops_table(labels, properties=("label", "centroid"))
    ids = np.asarray(props["label"], np.int64)
    xy = np.stack([props["centroid-1"], props["centroid-0"]], axis=1) if ids.size else np.zeros((0, 2))
    return ids, xy


def point_table(result: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """A (title, header, rows) table of :func:`worker.evaluation.points.evaluate_points`'s result
    for the terminal."""
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    det = result["detection"]
    rows = [["F_d", fmt(det["f1_d"])], ["precision", fmt(det["precision"])],
            ["recall", fmt(det["recall"])], ["type accuracy", fmt(det["type_accuracy"])]]
    rows += [[f"F_c {name}", fmt(v["f1"])] for name, v in result["classes"].items()]
    rows.append(["mean F_c", fmt(result["mean_f_c"])])
    split = f", split {result['split']}" if result.get("split") else ""
    return (f"points: {result['n_images']} images{split}, radius {result['radius_px']:g} px",
            ["score", "value"], rows)
