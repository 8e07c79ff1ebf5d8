"""The ``boundary`` post-processing (TSFD-Net) on hand-made maps with exact expected instances."""

from __future__ import annotations

import numpy as np
import pytest

from models.families import BoundaryOptions
from worker.boundary import boundary_instances, boundary_sizes
from worker.postprocess import HoverInstances


def _maps(shape: tuple[int, int], n_classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    sem = np.zeros((n_classes, *shape), np.float32)
    sem[0] = 1.0
    return sem, np.zeros(shape, np.float32)


def _paint(sem: np.ndarray, rows: slice, cols: slice, cls: int) -> None:
    sem[:, rows, cols] = 0.0
    sem[cls, rows, cols] = 0.9
    sem[0, rows, cols] = 0.1


def _ring(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the inner outline)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def test_a_one_pixel_wall_splits_touching_nuclei_exactly() -> None:
    # A (class 2, 8x11) and B (class 3, 8x12) touch; the model marks the union's outline and a
    # one-pixel wall in column 13, the first column of B's side.
    sem, bnd = _maps((12, 28))
    _paint(sem, slice(2, 10), slice(2, 13), 2)
    _paint(sem, slice(2, 10), slice(13, 26), 3)
    union = np.zeros((12, 28), bool)
    union[2:10, 2:26] = True
    bnd[_ring(union)] = 0.9
    bnd[2:10, 13] = 0.9

    result = boundary_instances(sem, bnd, mpp=0.25)

    expected = np.zeros((12, 28), np.int32)
    expected[2:10, 2:14] = 1  # the wall pixel touches both; it joins the lower label
    expected[2:10, 14:26] = 2
    np.testing.assert_array_equal(result.labels, expected)
    assert isinstance(result, HoverInstances)
    assert [n.label for n in result.nuclei] == [1, 2]
    assert [n.area for n in result.nuclei] == [96, 96]
    assert [n.bbox for n in result.nuclei] == [(2, 2, 14, 10), (14, 2, 26, 10)]
    # one semantic nucleus: both take its majority class (3: 104 of 192 pixels)
    assert [n.type for n in result.nuclei] == [3, 3]
    assert result.nuclei[0].type_prob == pytest.approx(8 / 96)
    assert result.nuclei[1].type_prob == pytest.approx(1.0)
    assert result.nuclei[0].np_prob == pytest.approx(0.9)


def test_separate_nuclei_keep_their_own_majority_class() -> None:
    sem, bnd = _maps((20, 20))
    _paint(sem, slice(2, 8), slice(2, 8), 1)
    sem[:, 2, 2] = 0.0
    sem[3, 2, 2], sem[0, 2, 2] = 0.8, 0.2  # one dissenting pixel
    _paint(sem, slice(11, 18), slice(10, 18), 3)

    result = boundary_instances(sem, bnd, mpp=0.25)

    expected = np.zeros((20, 20), np.int32)
    expected[2:8, 2:8] = 1
    expected[11:18, 10:18] = 2
    np.testing.assert_array_equal(result.labels, expected)
    assert [(n.type, n.area) for n in result.nuclei] == [(1, 36), (3, 56)]
    assert result.nuclei[0].type_prob == pytest.approx(35 / 36)


def test_noise_is_removed_and_small_holes_filled() -> None:
    sem, bnd = _maps((20, 20))
    _paint(sem, slice(2, 10), slice(2, 10), 2)
    sem[:, 5, 5] = 0.0
    sem[0, 5, 5] = 1.0  # a one-pixel hole inside the nucleus
    _paint(sem, slice(15, 18), slice(15, 18), 2)  # 9 px < 22: noise at 40x

    result = boundary_instances(sem, bnd, mpp=0.25)

    expected = np.zeros((20, 20), np.int32)
    expected[2:10, 2:10] = 1
    np.testing.assert_array_equal(result.labels, expected)


def test_a_nucleus_covered_by_boundary_is_kept_whole() -> None:
    sem, bnd = _maps((10, 10))
    _paint(sem, slice(2, 7), slice(2, 7), 1)
    bnd[:] = 0.9  # a thinned boundary cannot cover it, but all of it is boundary evidence

    result = boundary_instances(sem, bnd, mpp=0.25, min_size=4)

    assert len(result) == 1
    assert result.nuclei[0].area == 25
    assert (result.labels > 0).sum() == 25


def test_a_thick_wall_is_thinned_and_still_splits_the_pair() -> None:
    # two-pixel wall, as the targets draw between touching nuclei (each nucleus' own outline)
    sem, bnd = _maps((14, 30))
    _paint(sem, slice(2, 12), slice(2, 14), 1)
    _paint(sem, slice(2, 12), slice(14, 26), 1)
    left = np.zeros((14, 30), bool)
    left[2:12, 2:14] = True
    right = np.zeros((14, 30), bool)
    right[2:12, 14:26] = True
    bnd[_ring(left) | _ring(right)] = 0.8

    result = boundary_instances(sem, bnd, mpp=0.25)

    assert len(result) == 2
    assert (result.labels > 0).sum() == 240  # every foreground pixel is in a nucleus
    assert (result.labels[3:11, 3:13] == 1).all() and (result.labels[3:11, 15:25] == 2).all()
    assert abs(result.nuclei[0].area - result.nuclei[1].area) <= 10


def test_untyped_models_report_type_zero() -> None:
    sem, bnd = _maps((12, 12), n_classes=2)
    _paint(sem, slice(2, 10), slice(2, 10), 1)
    result = boundary_instances(sem, bnd, typed=False)
    assert [(n.type, n.type_prob) for n in result.nuclei] == [(0, 1.0)]


def test_an_empty_map_has_no_nuclei() -> None:
    sem, bnd = _maps((16, 16))
    result = boundary_instances(sem, bnd)
    assert len(result) == 0 and not result.labels.any()


def test_sizes_scale_with_resolution() -> None:
    assert boundary_sizes(0.25) == (22, 6)
    assert boundary_sizes(0.5) == (6, 2)


@pytest.mark.parametrize(
    ("sem_shape", "bnd_shape", "message"),
    [((1, 8, 8), (8, 8), "C >= 2"), ((3, 8, 8), (8, 9), "boundary_prob"), ((8, 8), (8, 8), "sem_prob")],
)
def test_bad_shapes_are_refused(sem_shape: tuple[int, ...], bnd_shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        boundary_instances(np.zeros(sem_shape, np.float32), np.zeros(bnd_shape, np.float32))


def test_bad_values_and_options_are_refused() -> None:
    sem, bnd = _maps((8, 8))
    bad = bnd.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        boundary_instances(sem, bad)
    with pytest.raises(ValueError, match="fg_threshold"):
        boundary_instances(sem, bnd, fg_threshold=1.5)
    with pytest.raises(ValueError, match="mpp"):
        boundary_instances(sem, bnd, mpp=0)
    with pytest.raises(ValueError, match="boundary_threshold"):
        BoundaryOptions.from_mapping({"boundary_threshold": True})
    assert BoundaryOptions.from_mapping({"fg_threshold": 0.4, "other": 1}).fg_threshold == 0.4
