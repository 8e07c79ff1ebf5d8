"""Mask R-CNN and semantic training targets of the panoptic network from instance maps."""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

__all__ = ["instance_targets", "semantic_classes"]


def _check(inst: NDArray[np.integer], types: NDArray[np.integer] | None) -> None:
    if not isinstance(inst, np.ndarray) or inst.ndim != 2 or not np.issubdtype(inst.dtype, np.integer):
        raise TypeError(f"inst must be a 2-D integer array, got {getattr(inst, 'shape', type(inst))}")
    if inst.size and inst.min() < 0:
        raise ValueError("inst ids must be >= 0")
    if types is not None and (not isinstance(types, np.ndarray) or types.shape != inst.shape
                              or not np.issubdtype(types.dtype, np.integer)):
        raise ValueError(f"types must be an integer map of shape {inst.shape}")


def instance_targets(
    inst: NDArray[np.integer], types: NDArray[np.integer] | None = None, *, num_classes: int = 2
) -> dict[str, Tensor]:
    """One image's torchvision detection target: a box, a class and a mask per nucleus.

    Parameters
    ----------
    inst : (H, W) integer ndarray
        Instance ids, 0 background.
    types : (H, W) integer ndarray or None
        Per-pixel class (0 background); None for untyped data, whose nuclei are all class 1.
        A nucleus takes its most frequent non-zero class (1 where it has none).
    num_classes : int
        Box-head classes, background included.

    Returns
    -------
    dict of str to Tensor
        ``boxes`` (n, 4) float32 x0, y0, x1, y1 (pixel edges: a one-pixel nucleus at column c
        spans c..c+1), ``labels`` (n,) int64 in 1..num_classes-1, ``masks`` (n, H, W) uint8.
    """
    _check(inst, types)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    ids = np.unique(inst)
    ids = ids[ids > 0]
    boxes = np.zeros((len(ids), 4), np.float32)
    labels = np.ones(len(ids), np.int64)
    masks = np.zeros((len(ids), *inst.shape), np.uint8)
    for row, nucleus in enumerate(ids):
        mask = inst == nucleus
        ys, xs = np.nonzero(mask)
        boxes[row] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        masks[row] = mask
        if types is not None:
            classes = types[mask]
            classes = classes[(classes > 0) & (classes < num_classes)]
            if classes.size:
                labels[row] = np.bincount(classes).argmax()
    return {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(masks)}


def semantic_classes(target: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
    """The (H, W) int64 class map of a target: each nucleus' label over its mask, 0 elsewhere."""
    out = torch.zeros(shape, dtype=torch.int64)
    for mask, label in zip(target["masks"], target["labels"], strict=True):
        out[mask.bool()] = label
    return out
