"""The resampled data cache reads back as exactly the items it was written from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.train.cache import write_cache
from models.train.data import load_items, source_location

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "nuclei"


def _same(a, b) -> None:
    assert [i.name for i in a] == [i.name for i in b]
    for x, y in zip(a, b, strict=True):
        assert (x.group, x.source, x.mpp) == (y.group, y.source, y.mpp)
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.inst, y.inst)
        if x.types is None:
            assert y.types is None
        else:
            np.testing.assert_array_equal(x.types, y.types)


def test_cache_reads_back_the_same_items_in_the_same_order(tmp_path: Path) -> None:
    sources = ("consep_train", "consep_test", "monuseg")
    items = load_items(SHARED, mpp=0.5, sources=sources, limit=3)
    assert write_cache(items, tmp_path) == 9
    # stacked sources stay one file; folder sources get a file per image
    assert (tmp_path / "consep_patches_train.npz").is_file()
    assert len(list((tmp_path / "monuseg").glob("*.npz"))) == 3
    _same(items, load_items(tmp_path, mpp=0.5, sources=sources))


def test_cache_is_smaller_than_the_source_and_not_resampled_again(tmp_path: Path) -> None:
    write_cache(load_items(SHARED, mpp=0.5, sources=["cpm15"]), tmp_path)
    cached = load_items(tmp_path, mpp=0.5, sources=["cpm15"])
    _same(load_items(SHARED, mpp=0.5, sources=["cpm15"]), cached)
    size = sum(p.stat().st_size for p in (tmp_path / "cpm15").glob("*.npz"))
    original = sum(p.stat().st_size for p in (SHARED / "cpm15").rglob("*") if p.is_file())
    assert size < original


def test_unknown_source_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown data source"):
        source_location("pannuke")
