"""Training data: the shared nucleus data sets, read in place and resampled to the training mpp.

Every item is one source image (a CoNSeP patch, a MoNuSeg, CPM-15 or TNBC image) with a
``group``, the source image it came from: CoNSeP patches ``consep_train_K_NNN`` belong to group
``consep_train_K``; MoNuSeg, CPM-15 and TNBC images are their own groups. Hold-outs are chosen by
group, so overlapping crops of one image never straddle the train/validation split.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from numpy.typing import NDArray

from models.datasets import read_labelled
from models.train.augment import AugmentOptions, augment
from models.train.targets import hv_targets

__all__ = [
    "SOURCES",
    "Item",
    "PatchSampler",
    "load_items",
    "resample_image",
    "resample_labels",
    "source_location",
    "split_items",
]

logger = logging.getLogger(__name__)

_SOURCE_FILES: dict[str, tuple[str, bool]] = {
    "consep_train": ("consep_train", True),
    "consep_test": ("consep_patches_train.npz", True),
    "monuseg": ("monuseg", False),
    "cpm15": ("cpm15", False),
    "tnbc": ("tnbc", False),
}
"""Source -> (its file or folder under the data root, whether its classes are used)."""

SOURCES = tuple(_SOURCE_FILES)
"""Data sets known to :func:`load_items` (folders/files under the shared nuclei root)."""


@dataclass(frozen=True)
class Item:
    """One source image at the training resolution."""

    name: str
    group: str
    source: str
    image: NDArray[np.uint8]
    inst: NDArray[np.int32]
    types: NDArray[np.uint8] | None
    mpp: float

    @property
    def typed(self) -> bool:
        return self.types is not None

    def __repr__(self) -> str:
        return f"Item({self.name!r}, group={self.group!r}, shape={self.inst.shape}, typed={self.typed})"


def source_location(source: str) -> str:
    """The file or folder, under the data root, that holds a source's images."""
    if source not in _SOURCE_FILES:
        raise ValueError(f"unknown data source {source!r}; known: {SOURCES}")
    return _SOURCE_FILES[source][0]


def resample_image(image: NDArray[np.uint8], factor: float) -> NDArray[np.uint8]:
    """Resize an RGB image by ``factor`` (area averaging when shrinking)."""
    if factor == 1.0:
        return image
    height, width = image.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(image, size, interpolation=interp), dtype=np.uint8)


def resample_labels(labels: NDArray[np.integer], factor: float) -> NDArray[np.integer]:
    """Resize a label map by ``factor`` with nearest-neighbour sampling (any integer dtype)."""
    if factor == 1.0:
        return labels
    height, width = labels.shape
    rows = np.minimum(((np.arange(round(height * factor)) + 0.5) / factor).astype(np.intp), height - 1)
    cols = np.minimum(((np.arange(round(width * factor)) + 0.5) / factor).astype(np.intp), width - 1)
    return labels[np.ix_(rows, cols)]


def _make_item(
    name: str,
    group: str,
    source: str,
    image: NDArray,
    inst: NDArray,
    types: NDArray | None,
    src_mpp: float,
    mpp: float,
) -> Item:
    factor = src_mpp / mpp
    return Item(
        name=name,
        group=group,
        source=source,
        image=np.ascontiguousarray(resample_image(image, factor)),
        inst=resample_labels(inst, factor).astype(np.int32),
        types=None if types is None else resample_labels(types, factor).astype(np.uint8),
        mpp=mpp,
    )


def _consep_group(name: str) -> str:
    match = re.fullmatch(r"(consep_(?:train|test)_\d+)_\d+", name)
    if match is None:
        raise ValueError(f"unexpected CoNSeP patch name {name!r}")
    return match.group(1)


def _read_source(root: Path, source: str, mpp: float, limit: int | None) -> Iterable[Item]:
    path, typed = source_location(source), _SOURCE_FILES[source][1]
    for im in itertools.islice(read_labelled(root / path), limit):
        # CoNSeP crops of one source image form a group; the other sets have one image per source.
        group = _consep_group(im.name) if source.startswith("consep") else im.name
        types = im.types if typed else None
        yield _make_item(im.name, group, source, im.image, im.inst, types, im.mpp, mpp)


def load_items(
    root: str | Path, *, mpp: float = 0.5, sources: Iterable[str] = SOURCES, limit: int | None = None
) -> list[Item]:
    """Read the shared nucleus data sets in place, resampled to ``mpp``.

    Parameters
    ----------
    root : str or Path
        The shared ``data/nuclei`` folder.
    mpp : float
        Training resolution, µm per pixel.
    sources : iterable of str
        Which data sets (see :data:`SOURCES`).
    limit : int, optional
        At most this many items per source.

    Returns
    -------
    list of Item
    """
    root = Path(root)
    items: list[Item] = []
    for source in sources:
        loaded = list(_read_source(root, source, mpp, limit))
        logger.info("loaded %d items from %s", len(loaded), source)
        items += loaded
    return items


def split_items(items: Iterable[Item], holdout: Collection[str]) -> tuple[list[Item], list[Item]]:
    """Split items into (train, validation) by source-image group."""
    items = list(items)
    unknown = set(holdout) - {item.group for item in items}
    if unknown:
        raise ValueError(f"hold-out groups not found in the data: {sorted(unknown)}")
    train = [item for item in items if item.group not in holdout]
    val = [item for item in items if item.group in holdout]
    return train, val


class PatchSampler:
    """Draws augmented training batches; batch ``step`` depends only on (seed, step).

    That makes a resumed run draw exactly the batches an uninterrupted one would have.

    Parameters
    ----------
    items : sequence of Item
        Training items; each is picked with probability proportional to its area times the
        weight of its source.
    patch_size : int
        Side of the training patches.
    options : AugmentOptions
        Augmentation strengths.
    seed : int
        Base seed.
    source_weights : mapping of str to float, optional
        Per-source weight multipliers.
    collate_fn : callable, optional
        (images, instance maps, type maps, typed flags) → the batch's tensors, targets included
        (:data:`models.train.families.Collate`); default :func:`collate`, the HoVer targets.
    """

    def __init__(
        self,
        items: Iterable[Item],
        *,
        patch_size: int,
        options: AugmentOptions,
        seed: int,
        source_weights: Mapping[str, float] | None = None,
        collate_fn: Callable[..., dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.items = [item for item in items if min(item.inst.shape) >= patch_size]
        if not self.items:
            raise ValueError(f"no training item is at least {patch_size} px on each side")
        weights = np.array(
            [item.inst.size * (source_weights or {}).get(item.source, 1.0) for item in self.items],
            dtype=np.float64,
        )
        self.probabilities = weights / weights.sum()
        self.patch_size = patch_size
        self.options = options
        self.seed = seed
        self.collate_fn = collate if collate_fn is None else collate_fn

    def batch(self, step: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Batch number ``step``: ``image`` (N,3,H,W) float 0-255 and the targets of the
        sampler's ``collate_fn`` (by default ``np``, ``hv``, ``tp``, ``typed``)."""
        rng = np.random.default_rng([self.seed, step])
        picks = rng.choice(len(self.items), size=batch_size, p=self.probabilities)
        images, insts, types, typed = [], [], [], []
        for index in picks:
            item = self.items[index]
            image, inst, tmap = augment(
                item.image, item.inst, item.types, out_size=self.patch_size, rng=rng, options=self.options
            )
            images.append(image)
            insts.append(inst)
            types.append(tmap)
            typed.append(item.typed)
        return self.collate_fn(images, insts, types, typed)


def collate(
    images: list[NDArray[np.uint8]],
    insts: list[NDArray[np.int32]],
    types: list[NDArray[np.uint8]],
    typed: list[bool],
) -> dict[str, torch.Tensor]:
    """Stack patches into the tensors the loss expects (HV targets computed here)."""
    image = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    inst = np.stack(insts)
    return {
        "image": image.contiguous(),
        "np": torch.from_numpy((inst > 0).astype(np.int64)),
        "hv": torch.from_numpy(np.stack([hv_targets(i) for i in insts])),
        "tp": torch.from_numpy(np.stack(types).astype(np.int64)),
        "typed": torch.tensor(typed, dtype=torch.bool),
    }
