"""Score a model on point-annotated images (a dot and a class per cell, no outlines).

``hoverserve model evaluate MODEL ../shared/data/nuclei/brca_m2c --split val`` runs the model
through the same inference path as :mod:`models.evaluate_model` and pairs each predicted
nucleus centre with the annotated points (Hungarian pairing within 3 µm, HoVer-Net's rule), then
reports detection F1 and eq. 8's F_c per class.

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

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from models.evaluate import radius_for_mpp
from models.metrics import DetectionResult, point_scores

__all__ = [
    "CLASS_ALIASES",
    "PointImage",
    "class_map",
    "evaluate_points",
    "is_point_dataset",
    "label_centres",
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

    Returns
    -------
    dict
        ``n_images``, ``radius_px``, ``detection`` (``f1_d``, ``precision``, ``recall``,
        ``type_accuracy``), ``classes`` (name → ``f1``: eq. 8's F_c), ``mean_f_c`` over the
        scored classes and ``per_image``; JSON-ready, None where undefined.
    """
    from tqdm import tqdm

    from models.evaluate_model import predict_instances
    from worker.infer import load_model

    model = load_model(model_path, device=device)  # type: ignore[arg-type]
    names = [c.name for c in model.card.classes]
    mapping = class_map(point_class_names(data), names) if model.typed else {}
    images = [im for im in read_points(data, split=split) if not only or im.name.startswith(tuple(only))]
    if not images:
        raise ValueError(f"{data}: no images in split {split!r}" if split else f"{data}: no images")
    class_ids = sorted(set(mapping.values()))
    results: list[DetectionResult] = []
    per_image = []
    for im in tqdm(images, disable=not progress, desc=Path(data).name):
        labels, types = predict_instances(model, im.image, im.mpp)
        xy, cls = _centres(labels, types)
        gt_cls = np.asarray([mapping.get(int(c), 0) for c in im.classes], dtype=np.int64)
        typed = bool(class_ids)
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


def point_table(result: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """A (title, header, rows) table of :func:`evaluate_points`'s result for the terminal."""
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
