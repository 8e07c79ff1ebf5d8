"""worker.hv_edges: the edge map converted on the foreground alone is the whole-map one, bit for bit.

The whole-map reference is the code it replaced: ``cv2.normalize`` (NORM_MINMAX, float32) of the
whole Sobel response, then ``(1 - min(h, v)) * fg``. Also checked: the foreground-index shortcuts
of the watershed and the measurement give what the whole-map passes give, and the energy blurred
in place is the one blurred into a second map.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from worker.component_watershed import _touching_seeds, component_watershed, label_components
from worker.hv_edges import _fg_minmax32, _fixed_edges, _minmax32, edge_strength
from worker.instances import measure
from worker.watershed import _energy, _markers, foreground_components, instance_labels


def _whole_map(hv: NDArray[np.float32], fg: NDArray[np.bool_], ksize: int,
               edge_range: tuple[float, float] | None) -> NDArray[np.float32]:
    if edge_range is None:
        h = _minmax32(cv2.Sobel(_minmax32(hv[0]), cv2.CV_64F, 1, 0, ksize=ksize))
        v = _minmax32(cv2.Sobel(_minmax32(hv[1]), cv2.CV_64F, 0, 1, ksize=ksize))
    else:
        h = _fixed_edges(hv[0], 1, 0, ksize, edge_range)
        v = _fixed_edges(hv[1], 0, 1, ksize, edge_range)
    return (np.float32(1.0) - np.minimum(h, v)) * fg


def _same_bits(a: NDArray, b: NDArray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(
        np.array_equal(a.view(np.uint8), b.view(np.uint8)))


def _maps(rng: np.random.Generator, h: int, w: int, kind: str) -> NDArray[np.float32]:
    hv = rng.uniform(-1, 1, (2, h, w))
    if kind == "smooth":
        hv = np.stack([cv2.GaussianBlur(c, (0, 0), 3) for c in hv])
    elif kind == "ties":  # few distinct values: many equal responses and repeated extremes
        hv = np.round(hv * 2) / 2
    elif kind == "constant":
        hv[:] = 0.25
    return np.ascontiguousarray(hv, np.float32)


@pytest.mark.parametrize("seed", range(40))
def test_foreground_conversion_is_the_whole_map_conversion(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 90)), int(rng.integers(1, 90)))
    image = rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 6)
    if seed % 4 == 1:
        image = np.round(image)  # ties, the extremes repeated
    if seed % 4 == 2:
        image[:] = image.flat[0]  # constant: all zeros
    chosen = rng.random(shape) < rng.choice([0.0, 0.05, 0.5, 1.0])
    if seed % 4 == 3 and image.size > 2:
        # The extremes in the background: only the map's extremes may set the scale.
        chosen.flat[np.argmin(image)] = chosen.flat[np.argmax(image)] = False
    index = np.flatnonzero(chosen)
    assert _same_bits(_fg_minmax32(image, index), _minmax32(image).ravel()[index])


@pytest.mark.parametrize("kind", ["random", "smooth", "ties", "constant"])
@pytest.mark.parametrize("edge_range", [None, (-0.5, 0.5)])
def test_edge_strength_is_the_whole_map_result(kind: str, edge_range: tuple | None) -> None:
    rng = np.random.default_rng(len(kind))
    for h, w, ksize in ((64, 80, 21), (7, 5, 21), (33, 40, 3), (50, 31, 11), (1, 9, 5)):
        hv = _maps(rng, h, w, kind)
        for fg in (rng.random((h, w)) < 0.3, np.ones((h, w), bool), np.zeros((h, w), bool)):
            if h > 4 and w > 4:
                fg[0, :] = fg[:, -1] = True  # touching the border
                fg[h // 2, w // 2] = False  # the centre in the background
            expected = _whole_map(hv, fg, ksize, edge_range)
            # Off the foreground both are zero (the sign of a zero is never read).
            assert np.array_equal(edge_strength(hv, fg, ksize, edge_range), expected)
            got = edge_strength(hv, fg, ksize, edge_range, np.flatnonzero(fg))
            assert _same_bits(got[fg], expected[fg])
            assert not got[~fg].any()


def _blobs(seed: int, size: int = 160) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Probability and HV maps of random touching discs (so that watersheds split them)."""
    rng = np.random.default_rng(seed)
    prob = np.zeros((size, size), np.float32)
    hv = np.zeros((2, size, size), np.float32)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(40):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 12)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        prob[inside] = 1.0
        hv[0][inside] = ((xx - cx) / r)[inside]
        hv[1][inside] = ((yy - cy) / r)[inside]
    prob += rng.uniform(-0.3, 0.6, prob.shape).astype(np.float32)  # specks: dropped pieces
    return prob, hv


@pytest.mark.parametrize("seed", range(6))
def test_foreground_index_shortcuts_change_nothing(seed: int) -> None:
    prob, hv = _blobs(seed)
    kwargs = dict(np_threshold=0.5, marker_threshold=0.4, sobel_ksize=21, min_size=10, opening=5)
    labels, n, found = instance_labels(prob, hv, **kwargs)
    fg, index, components = foreground_components(prob, 0.5, 10)
    thresholded = prob >= np.float32(0.5)
    whole = label_components(thresholded, np.flatnonzero(thresholded), 10)
    assert _same_bits(fg, whole.kept[whole.ids])  # the dropped pieces looked up over the map
    assert not components.kept[1:].all()  # small pieces were dropped
    assert np.array_equal(found, np.flatnonzero(fg)) and np.array_equal(index, found)
    energy = -cv2.GaussianBlur(np.where(fg, 1.0 - edge_strength(hv, fg, 21), 0.0), (3, 3), 0)
    markers = (labels * (np.arange(labels.size).reshape(labels.shape) % 3 == 0)).astype(np.int32)
    plain, _ = component_watershed(energy, markers, fg, components, consecutive=True)
    fast, _ = component_watershed(energy, markers, fg, components, consecutive=True,
                                  fg_index=found)
    assert _same_bits(plain, fast)
    types = np.random.default_rng(seed).integers(0, 4, prob.shape)
    slow = measure(labels, n, prob, types)
    quick = measure(labels, n, prob, types, within=found)
    assert len(slow) == len(quick) == n > 0
    for a, b in zip(slow, quick, strict=True):
        assert a.contour.dtype == b.contour.dtype and np.array_equal(a.contour, b.contour)
        for field in a.__dataclass_fields__:
            if field != "contour":
                x, y = getattr(a, field), getattr(b, field)
                assert type(x) is type(y) and x == y, field


@pytest.mark.parametrize("seed", range(8))
def test_energy_blurred_in_place_is_the_two_map_result(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 300)), int(rng.integers(1, 300)))
    fg = rng.random(shape) < rng.choice([0.05, 0.5, 1.0])
    overall = (rng.random(shape).astype(np.float32) * fg).astype(np.float32)
    raw = np.zeros(shape, np.float64)
    np.subtract(1.0, overall, out=raw, where=fg, dtype=np.float64)
    expected = np.empty_like(raw)
    cv2.GaussianBlur(raw, (3, 3), 0, dst=expected)
    np.negative(expected, out=expected)
    assert _same_bits(_energy(overall, fg), expected)
    assert _same_bits(_energy(overall, fg, np.flatnonzero(fg)), expected)


@pytest.mark.parametrize("seed", range(12))
def test_markers_and_pushing_seeds_from_the_foreground_index_are_the_whole_map_ones(
        seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(2, 120)), int(rng.integers(2, 120)))
    fg = rng.random(shape) < rng.choice([0.3, 0.7, 1.0])
    fg[0, :] = fg[:, 0] = fg[-1, :] = fg[:, -1] = True  # markers and free pixels on the border
    index = np.flatnonzero(fg)
    overall = (rng.integers(0, 5, shape) / 8).astype(np.float32) * fg  # ties at the threshold
    assert _same_bits(_markers(overall, fg, 0.25, 3, 2, index), _markers(overall, fg, 0.25, 3, 2))
    markers = rng.integers(0, 4, shape).astype(np.int32) * (rng.random(shape) < 0.5)
    # the whole-map reading: marker pixels of the mask with a masked non-marker 4-neighbour
    seeds = fg & (markers > 0)
    free = np.pad(fg & ~seeds, 1)
    touching = free[:-2, 1:-1] | free[2:, 1:-1] | free[1:-1, :-2] | free[1:-1, 2:]
    candidates = np.flatnonzero(seeds)
    assert np.array_equal(candidates[_touching_seeds(markers, fg, candidates)],
                          np.flatnonzero(seeds & touching))
