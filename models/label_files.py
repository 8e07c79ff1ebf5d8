"""Label files for ``hoverserve evaluate``: instance (and type) maps read from .npz or images.

:func:`load_label_file` reads a ``.npz`` (``inst``, optionally ``type_map``, ``mpp``, ``names``,
``class_names``) or a single-channel ``.png``/``.tif`` label image into a :class:`LabelFile`;
:func:`class_names_for` decides which classes two such files are scored on.
"""

from __future__ import annotations

import logging
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["LabelFile", "class_names_for", "load_label_file"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelFile:
    """The label stack of one file: instance ids, optional types, and what the file states."""

    inst: NDArray[np.integer]  # (N, H, W)
    type_map: NDArray[np.integer] | None  # (N, H, W)
    mpp: float | None
    names: list[str] | None
    class_names: list[str] | None


def _as_labels(arr: NDArray[Any], *, what: str) -> NDArray[np.integer]:
    """Integer (N, H, W) label stack from a 2-D or 3-D array, or ValueError."""
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{what} must be (H, W) or (N, H, W), got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{what} holds non-integer values (dtype {arr.dtype})")
        arr = arr.astype(np.int64)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.int64)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must hold integer labels, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{what} holds negative labels")
    return arr


def _load_npz(path: Path) -> LabelFile:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: cannot read as .npz ({exc})") from exc
    if "inst" not in arrays:
        raise ValueError(f"{path}: no 'inst' array (has {sorted(arrays)})")
    inst = _as_labels(arrays["inst"], what=f"{path} 'inst'")
    type_map = None
    if "type_map" in arrays:
        type_map = _as_labels(arrays["type_map"], what=f"{path} 'type_map'")
        if type_map.shape != inst.shape:
            raise ValueError(
                f"{path}: 'type_map' shape {type_map.shape} differs from 'inst' {inst.shape}"
            )
    mpp = None
    if "mpp" in arrays:
        mpp = float(np.asarray(arrays["mpp"]).reshape(-1)[0])
        if not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"{path}: 'mpp' must be a positive number, got {mpp}")
    names = [str(n) for n in arrays["names"].reshape(-1)] if "names" in arrays else None
    if names is not None and len(names) != inst.shape[0]:
        raise ValueError(f"{path}: {len(names)} 'names' for {inst.shape[0]} images")
    class_names = (
        [str(n) for n in arrays["class_names"].reshape(-1)] if "class_names" in arrays else None
    )
    return LabelFile(inst, type_map, mpp, names, class_names)


def _load_image(path: Path) -> LabelFile:
    suffix = path.suffix.lower()
    try:
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as img:
                if img.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
                    raise ValueError(
                        f"{path}: {img.mode} image; expected a single-channel label image "
                        "(one instance id per pixel)"
                    )
                arr = np.asarray(img)
        else:
            import tifffile

            arr = tifffile.imread(path)
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"{path}: cannot read label image ({exc})") from exc
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        raise ValueError(
            f"{path}: shape {arr.shape} looks like colour; expected a single-channel label image"
        )
    return LabelFile(_as_labels(arr, what=str(path)), None, None, None, None)


def load_label_file(path: str | Path) -> LabelFile:
    """Read an ``.npz``, ``.png``, ``.tif`` or ``.tiff`` label file; ValueError naming the file
    if it is missing, unreadable or not integer labels."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_npz(path)
    if suffix in (".png", ".tif", ".tiff"):
        return _load_image(path)
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .npz, .png, .tif or .tiff)")


def class_names_for(pred: LabelFile, gt: LabelFile) -> list[str] | None:
    """Class names to score two files on (entry 0 the background), or None when either file
    has no ``type_map``."""
    if pred.type_map is None or gt.type_map is None:
        if (pred.type_map is None) != (gt.type_map is None):
            logger.warning("only one file has a 'type_map'; evaluating without classes")
        return None
    names = gt.class_names or pred.class_names
    top = int(max(pred.type_map.max(initial=0), gt.type_map.max(initial=0)))
    if names is None:
        return ["background", *(f"class_{k}" for k in range(1, top + 1))]
    if top >= len(names):
        raise ValueError(f"type_map holds class {top} but only {len(names)} class_names")
    return names
