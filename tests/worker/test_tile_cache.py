"""Tiles shared between regions: stored once, read back bit for bit, forgotten after their last
region; a damaged tile is inferred again instead of changing a result."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest

from tests._synthetic import build_oracle, oracle_card
from worker.infer import load_model, predict_maps
from worker.plan import Box, plan_regions, tile_boxes
from worker.tile_cache import TileCache, TileUsers


@pytest.fixture
def cache(tmp_path: Path) -> TileCache:
    return TileCache(fsspec.filesystem("file"), str(tmp_path / "tiles"))


def test_a_stored_tile_reads_back_bit_identical(cache: TileCache) -> None:
    tile = Box(64, 32, 96, 64)
    rng = np.random.default_rng(0)
    maps = {"np_prob": rng.random((32, 32), np.float32), "hv": rng.random((2, 32, 32), np.float32),
            "types": rng.integers(0, 5, (32, 32)).astype(np.uint8)}
    assert cache.get(tile) is None
    cache.put(tile, maps)
    back = cache.get(tile)
    assert back is not None and set(back) == set(maps)
    for name, array in maps.items():
        assert back[name].dtype == array.dtype and np.array_equal(back[name], array)
    cache.discard([tile, Box(0, 0, 32, 32)])  # a tile never stored is fine to discard
    assert cache.get(tile) is None


def test_a_torn_tile_reads_as_missing(cache: TileCache, tmp_path: Path) -> None:
    tile = Box(0, 0, 32, 32)
    cache.put(tile, {"np_prob": np.ones((32, 32), np.float32)})
    path = tmp_path / "tiles" / "0_0.npz"
    path.write_bytes(path.read_bytes()[:40])
    assert cache.get(tile) is None
    cache.clear()
    assert not (tmp_path / "tiles").exists()


def test_tile_users_name_every_region_holding_a_shared_tile() -> None:
    regions = plan_regions(Box(0, 0, 96, 128), tile=32, region_size=64, halo=10)
    users = TileUsers.of(regions, 32)
    everywhere: dict[tuple[int, int], list[int]] = {}
    for r in regions:
        for t in tile_boxes(r.maps, tile=32):
            everywhere.setdefault((t.row0, t.col0), []).append(r.index)
    assert users.users == {k: tuple(v) for k, v in everywhere.items() if len(v) > 1}
    first = regions[0]
    assert users.neighbours(first) == {0, 1, 2, 3}
    # Only tiles all of whose holders are done may go.
    assert users.finished(first, done={0}) == [
        t for t in tile_boxes(first.maps, tile=32) if users.users.get((t.row0, t.col0)) == (0,)]
    assert len(users.finished(first, done={0, 1, 2, 3})) == sum(
        1 for t in tile_boxes(first.maps, tile=32) if users.shared(t))


def test_maps_from_the_cache_equal_maps_inferred_and_skip_the_network(tmp_path: Path,
                                                                     cache: TileCache) -> None:
    card = oracle_card(input_size=48, output_size=32)
    model = load_model(build_oracle(tmp_path / "o.onnx", card), batch_size=2)
    rng = np.random.default_rng(3)
    maps_box = Box(0, 0, 96, 96)
    image = rng.integers(0, 256, (96 + 2 * card.margin,) * 2 + (3,), dtype=np.uint8)
    plain = predict_maps(model, image, maps_box.grow(card.margin), maps_box)
    left = lambda t: t.col0 == 0  # noqa: E731 - the tiles "another region" needs
    first = predict_maps(model, image, maps_box.grow(card.margin), maps_box, cache=cache,
                         shared=left)
    again = predict_maps(model, image, maps_box.grow(card.margin), maps_box, cache=cache,
                         shared=left)
    assert plain.patches == first.patches == 9 and again.patches == 6
    for name in plain.arrays:
        assert np.array_equal(plain[name], first[name]) and np.array_equal(plain[name], again[name])
    # Cached tiles are used even when the image says otherwise: what was run once is reused.
    blank = np.zeros_like(image)
    mixed = predict_maps(model, blank, maps_box.grow(card.margin), maps_box, cache=cache,
                         shared=left)
    assert np.array_equal(mixed["np_prob"][:, :32], plain["np_prob"][:, :32])
    assert not np.array_equal(mixed["np_prob"][:, 32:], plain["np_prob"][:, 32:])
