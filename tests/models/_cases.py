"""Hand-made label maps and data paths shared by the metric and evaluation specifications."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CONSEP = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "nuclei" / "consep_patches_train.npz"
)
"""Real CoNSeP patches (40×) with instance and type maps."""

CLASSES = ["background", "a", "b"]
"""Class names of the typed maps in :func:`images`."""


def shifted_case() -> tuple[np.ndarray, np.ndarray]:
    """GT 5 (rows 0-2 × cols 0-3, 12 px) and GT 9 (rows 4-5 × cols 4-5, 4 px).

    Prediction 2 is GT 5 moved one column right (12 px, 9 shared, union 15, IoU 0.6);
    GT 9 is missed; prediction 7 (row 5 × cols 0-1, 2 px) touches nothing.
    """
    gt = np.zeros((6, 6), dtype=np.int32)
    gt[0:3, 0:4] = 5
    gt[4:6, 4:6] = 9
    pred = np.zeros((6, 6), dtype=np.int32)
    pred[0:3, 1:5] = 2
    pred[5, 0:2] = 7
    return pred, gt


def images() -> list[tuple[np.ndarray, dict[int, int], np.ndarray, dict[int, int]]]:
    """Image 0: one nucleus found exactly. Image 1: three nuclei, none found.
    Image 2: nothing in either map (every score undefined)."""
    one = np.zeros((8, 8), dtype=np.int32)
    one[1:4, 1:4] = 3
    three = np.zeros((8, 8), dtype=np.int32)
    three[0:2, 0:2], three[4:6, 0:2], three[4:6, 4:6] = 1, 2, 4
    empty = np.zeros((8, 8), dtype=np.int32)
    return [
        (one, {3: 1}, one, {3: 1}),
        (empty, {}, three, {1: 2, 2: 2, 4: 2}),
        (empty, {}, empty, {}),
    ]
