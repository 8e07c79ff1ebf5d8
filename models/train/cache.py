"""A resampled copy of the training data, in the layout :func:`models.train.data.load_items` reads.

Training at 0.5 µm/px from the shared sets (most of them at 0.25 µm/px) reads and resizes every
image at start-up. Writing the resized items once gives a copy a quarter of the size, which is what
travels to a GPU machine that cannot see ``../shared``: point ``data.root`` (or a ``../shared/data/
nuclei`` link) at the copy and train with the same ``mpp``; nothing is resampled twice.

``hoverserve model cache-data OUT [--data-root DIR] [--mpp 0.5]``
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from models.train.data import Item, source_location

__all__ = ["write_cache"]


def write_cache(items: Iterable[Item], out: str | Path) -> int:
    """Write the items under ``out`` where :func:`~models.train.data.load_items` looks for them.

    A source kept as one stacked ``.npz`` (CoNSeP patches) is written the same way, in the same
    order; a folder source gets one ``<item name>.npz`` per image. Returns the number written.
    """
    out = Path(out)
    by_source: dict[str, list[Item]] = {}
    for item in items:
        by_source.setdefault(item.source, []).append(item)
    for source, group in by_source.items():
        location = out / source_location(source)
        if location.suffix == ".npz":
            _write_stacked(group, location)
            continue
        location.mkdir(parents=True, exist_ok=True)
        for item in group:
            arrays: dict[str, Any] = {"image": item.image, "inst": item.inst, "mpp": np.float64(item.mpp)}
            if item.types is not None:
                arrays["type_map"] = item.types
            np.savez_compressed(location / f"{item.name}.npz", **arrays)
    return sum(len(group) for group in by_source.values())


def _write_stacked(items: list[Item], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {
        "images": np.stack([item.image for item in items]),
        "inst": np.stack([item.inst for item in items]),
        "names": np.array([item.name for item in items]),
        "mpp": np.float64(items[0].mpp),
    }
    if all(item.types is not None for item in items):
        arrays["type_map"] = np.stack([item.types for item in items if item.types is not None])
    np.savez_compressed(path, **arrays)
