"""Annotated nucleus data sets, read in place in the layouts of ``../shared/data/nuclei``:

- an ``.npz`` with ``images`` (N, H, W, 3), ``inst`` (N, H, W), optional ``type_map``, ``names``,
  ``mpp`` and ``class_names`` (CoNSeP patches);
- an ``.npz`` with a single ``image`` (H, W, 3), ``inst`` and ``mpp`` (CPM-15);
- a folder with ``labels.npz`` (``inst``, ``names``, ...) and ``images/<name>.<ext>`` (CoNSeP
  train, MoNuSeg);
- a folder of such single-image ``.npz`` files.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = ["LabelledImage", "read_labelled"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class LabelledImage:
    """One annotated RGB image at ``mpp`` µm/px; ``types`` is a per-pixel class map or None."""

    name: str
    image: NDArray[np.uint8]
    inst: NDArray[np.integer]
    types: NDArray[np.integer] | None
    mpp: float
    class_names: tuple[str, ...] | None = None


def _mpp_of(arrays: Any, path: Path, override: float | None) -> float:
    if override is not None:
        return override
    if "mpp" not in arrays:
        raise ValueError(f"{path} has no 'mpp': give the resolution with --mpp")
    return float(np.asarray(arrays["mpp"]).reshape(-1)[0])


def _read_rgb(path: Path) -> NDArray[np.uint8]:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read image {path}")
    return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)


def _class_names(arrays: Any) -> tuple[str, ...] | None:
    return tuple(str(n) for n in arrays["class_names"]) if "class_names" in arrays else None


def _read_npz(path: Path, mpp: float | None) -> Iterator[LabelledImage]:
    with np.load(path, allow_pickle=False) as data:
        if "inst" not in data.files or not ({"images", "image"} & set(data.files)):
            raise ValueError(f"{path}: expected 'image' or 'images' and 'inst' arrays, has {data.files}")
        res = _mpp_of(data, path, mpp)
        classes = _class_names(data)
        if "image" in data.files:
            types = data["type_map"] if "type_map" in data.files else None
            yield LabelledImage(path.stem, data["image"], data["inst"], types, res, classes)
            return
        images, inst = data["images"], data["inst"]
        types_all = data["type_map"] if "type_map" in data.files else None
        names = [str(n) for n in data["names"]] if "names" in data.files else None
    for i in range(len(images)):
        name = names[i] if names else f"{path.stem}_{i}"
        types = types_all[i] if types_all is not None else None
        yield LabelledImage(name, images[i], inst[i], types, res, classes)


def _read_folder(folder: Path, mpp: float | None) -> Iterator[LabelledImage]:
    labels = folder / "labels.npz"
    if not labels.exists():
        files = sorted(folder.glob("*.npz"))
        if not files:
            raise ValueError(f"{folder}: no labels.npz and no .npz images")
        for path in files:
            yield from _read_npz(path, mpp)
        return
    with np.load(labels, allow_pickle=False) as data:
        names = [str(n) for n in data["names"]]
        inst, res, classes = data["inst"], _mpp_of(data, labels, mpp), _class_names(data)
        types_all = data["type_map"] if "type_map" in data.files else None
    for i, name in enumerate(names):
        found = [folder / "images" / f"{name}{s}" for s in _IMAGE_SUFFIXES]
        image_path = next((p for p in found if p.exists()), None)
        if image_path is None:
            raise ValueError(f"{folder}: no image file for {name!r} in images/")
        types = types_all[i] if types_all is not None else None
        yield LabelledImage(name, _read_rgb(image_path), inst[i], types, res, classes)


def read_labelled(path: str | Path, *, mpp: float | None = None) -> Iterator[LabelledImage]:
    """The annotated images of a data set file or folder (layouts: see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        yield from _read_folder(path, mpp)
    elif path.suffix.lower() == ".npz":
        yield from _read_npz(path, mpp)
    else:
        raise ValueError(f"{path}: not a data set (.npz file or folder)")
