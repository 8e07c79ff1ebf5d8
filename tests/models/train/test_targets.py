"""HV targets from instance maps."""

from __future__ import annotations

import numpy as np
import pytest

from models.train.targets import hv_targets


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: int) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def test_values_span_minus_one_to_one_inside_and_zero_outside() -> None:
    inst = np.zeros((40, 40), np.int32)
    inst[_disc(inst.shape, (12, 12), 6)] = 3
    inst[_disc(inst.shape, (28, 27), 8)] = 9
    hv = hv_targets(inst)
    assert hv.shape == (2, 40, 40) and hv.dtype == np.float32
    assert np.all(hv[:, inst == 0] == 0)
    for label in (3, 9):
        inside = hv[:, inst == label]
        assert inside.min() == pytest.approx(-1.0) and inside.max() == pytest.approx(1.0)
    assert np.all(np.abs(hv) <= 1.0)


def test_signs_follow_left_right_top_bottom() -> None:
    inst = np.zeros((21, 21), np.int32)
    inst[_disc(inst.shape, (10, 10), 7)] = 1
    h, v = hv_targets(inst)
    assert h[10, 4] < 0 < h[10, 16]  # left negative, right positive
    assert v[4, 10] < 0 < v[16, 10]  # top negative, bottom positive
    assert h[10, 10] == pytest.approx(0.0) and v[10, 10] == pytest.approx(0.0)
    assert h[4, 10] == pytest.approx(0.0)  # straight above the centre: no horizontal offset


def test_non_contiguous_ids_and_empty_map() -> None:
    assert not hv_targets(np.zeros((8, 8), np.int64)).any()
    inst = np.zeros((10, 10), np.int32)
    inst[2:5, 2:8] = 1000
    assert hv_targets(inst)[0, 3, 2] == pytest.approx(-1.0)


def test_rejects_non_integer_maps() -> None:
    with pytest.raises(TypeError):
        hv_targets(np.zeros((4, 4), np.float32))
