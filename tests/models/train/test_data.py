"""Training data: resampling, grouping by source image, deterministic batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.train.augment import AugmentOptions
from models.train.data import Item, PatchSampler, load_items, resample_labels, split_items

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "nuclei"


def _item(name: str, group: str, *, typed: bool = True, size: int = 64) -> Item:
    inst = np.zeros((size, size), np.int32)
    inst[10:20, 10:22] = 5
    types = (inst > 0).astype(np.uint8) * 2 if typed else None
    image = np.full((size, size, 3), 200, np.uint8)
    return Item(name, group, "test", image, inst, types, 0.5)


def test_resample_labels_halves_with_nearest_neighbour() -> None:
    labels = np.arange(16, dtype=np.int32).reshape(4, 4)
    half = resample_labels(labels, 0.5)
    assert half.shape == (2, 2) and half.dtype == np.int32
    assert set(half.ravel()) <= set(labels.ravel())


def test_split_by_group_keeps_patches_of_one_image_together() -> None:
    items = [_item(f"img_{k}_{p}", f"img_{k}") for k in (1, 2, 3) for p in range(3)]
    train, val = split_items(items, {"img_2"})
    assert {i.group for i in val} == {"img_2"} and len(val) == 3
    assert "img_2" not in {i.group for i in train}
    with pytest.raises(ValueError, match="not found"):
        split_items(items, {"img_9"})


def test_sampler_batches_depend_only_on_seed_and_step() -> None:
    items = [_item("a", "a"), _item("b", "b", typed=False)]
    sampler = PatchSampler(items, patch_size=32, options=AugmentOptions(), seed=7)
    first, again, other = sampler.batch(3, 4), sampler.batch(3, 4), sampler.batch(4, 4)
    assert first["image"].shape == (4, 3, 32, 32) and first["hv"].shape == (4, 2, 32, 32)
    assert first["np"].shape == first["tp"].shape == (4, 32, 32)
    assert all(np.array_equal(first[k].numpy(), again[k].numpy()) for k in first)
    assert not np.array_equal(first["image"].numpy(), other["image"].numpy())


def test_load_items_resamples_shared_data_and_names_groups() -> None:
    items = load_items(SHARED, mpp=0.5, sources=["consep_test", "monuseg"], limit=1)
    consep, monuseg = items
    assert consep.group == "consep_test_1" and consep.typed and consep.inst.shape == (128, 128)
    assert consep.image.shape == (128, 128, 3) and consep.types is not None
    assert not monuseg.typed and monuseg.inst.shape == (500, 500) and monuseg.group == monuseg.name
    with pytest.raises(ValueError, match="unknown data source"):
        load_items(SHARED, sources=["pannuke"])
