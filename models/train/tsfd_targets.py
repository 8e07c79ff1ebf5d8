"""TSFD-Net training targets from instance maps: the semantic class map and instance boundaries.

The boundary of a nucleus is its inner outline — its pixels with a 4-neighbour outside it (another
nucleus or background) — so every nucleus is enclosed by its own ring and two touching nuclei are
parted by a two-pixel wall, one pixel from each ("boundary enclosing"). ``width=2`` adds the next
ring inwards. Nuclei without classes (MoNuSeg, CPM-15, TNBC) get class 1 everywhere: the loss then
uses their foreground only (:class:`models.train.tsfd_losses.TSFDLoss`, ``typed`` false).
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

__all__ = ["boundary_target", "collate_boundary", "semantic_target"]


def _check_inst(inst: object) -> NDArray[np.integer]:
    if not isinstance(inst, np.ndarray) or inst.ndim != 2 or not np.issubdtype(inst.dtype, np.integer):
        raise TypeError(f"inst must be a 2-D integer array, got {getattr(inst, 'shape', type(inst))}")
    if inst.size and inst.min() < 0:
        raise ValueError("inst ids must be >= 0")
    return inst


def _inner_outline(inst: NDArray[np.integer]) -> NDArray[np.bool_]:
    padded = np.pad(inst, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    differs = ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre)
               | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre))
    return (inst > 0) & differs


def boundary_target(inst: NDArray[np.integer], *, width: int = 1) -> NDArray[np.uint8]:
    """Instance boundaries, 1 on the inner ``width`` rings of every nucleus, else 0.

    Parameters
    ----------
    inst : (H, W) integer ndarray
        Instance ids, 0 background.
    width : int
        Rings per nucleus, 1 or 2.

    Returns
    -------
    (H, W) uint8 ndarray
    """
    inst = _check_inst(inst)
    if width not in (1, 2):
        raise ValueError(f"width must be 1 or 2, got {width!r}")
    ring = _inner_outline(inst)
    if width == 2:
        # the second ring: the outline of what is left once the first ring is taken away
        ring |= _inner_outline(np.where(ring, 0, inst))
    return ring.astype(np.uint8)


def semantic_target(
    inst: NDArray[np.integer], types: NDArray[np.integer] | None, *, n_classes: int
) -> NDArray[np.int64]:
    """Per-pixel class: 0 background, the nucleus' class 1..n_classes-1, or 1 for untyped data.

    Parameters
    ----------
    inst : (H, W) integer ndarray
        Instance ids, 0 background.
    types : (H, W) integer ndarray or None
        Per-pixel class map (0 background); None for data without classes.
    n_classes : int
        Semantic channels including background.

    Returns
    -------
    (H, W) int64 ndarray
        Class per pixel; a nucleus pixel whose class in ``types`` is 0 stays 0.
    """
    inst = _check_inst(inst)
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    fg = inst > 0
    if types is None:
        return fg.astype(np.int64)
    t = np.asarray(types)
    if t.shape != inst.shape or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"types must be an integer map of shape {inst.shape}, got {t.dtype} {t.shape}")
    if t.size and (t.min() < 0 or t.max() >= n_classes):
        raise ValueError(f"types must be in 0..{n_classes - 1}, got {t.min()}..{t.max()}")
    return np.where(fg, t, 0).astype(np.int64)


def collate_boundary(
    images: list[NDArray[np.uint8]],
    insts: list[NDArray[np.int32]],
    types: list[NDArray[np.uint8]],
    typed: list[bool],
    *,
    n_classes: int,
) -> dict[str, torch.Tensor]:
    """Stack augmented patches into the tensors :class:`~models.train.tsfd_losses.TSFDLoss` reads.

    Returns
    -------
    dict of str to Tensor
        ``image`` (N, 3, H, W) float 0-255, ``sem`` (N, H, W) int64 (:func:`semantic_target`;
        untyped patches mark their nuclei 1), ``boundary`` (N, H, W) int64 0/1
        (:func:`boundary_target`) and ``typed`` (N,) bool.
    """
    image = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    sem = [semantic_target(inst, tmap if flag else None, n_classes=n_classes)
           for inst, tmap, flag in zip(insts, types, typed, strict=True)]
    return {
        "image": image.contiguous(),
        "sem": torch.from_numpy(np.stack(sem)),
        "boundary": torch.from_numpy(np.stack([boundary_target(i) for i in insts]).astype(np.int64)),
        "typed": torch.tensor(typed, dtype=torch.bool),
    }
