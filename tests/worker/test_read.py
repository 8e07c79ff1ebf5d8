"""Reading at the model's resolution: one global mapping, whatever box is asked for."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from worker.plan import Box
from worker.read import model_grid, read_model_box


class ArraySlide:
    """An in-memory pyramid with the reader interface the pipeline uses."""

    def __init__(self, image: np.ndarray, mpp: float, levels: int = 3) -> None:
        self.mpp = mpp
        self.levels = [image]
        for _ in range(levels - 1):
            prev = self.levels[-1]
            self.levels.append(cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2),
                                          interpolation=cv2.INTER_AREA))
        self.level_shapes = tuple(level.shape[:2] for level in self.levels)
        self.level_downsamples = tuple(float(2**i) for i in range(levels))

    @property
    def shape(self) -> tuple[int, int]:
        return self.level_shapes[0]

    def best_level(self, downsample: float) -> int:
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample]
        return max(ok) if ok else 0

    def read(self, level: int, *, row: int, col: int, height: int, width: int) -> np.ndarray:
        out = np.full((height, width, 3), 255, np.uint8)
        src = self.levels[level]
        r0, c0 = max(row, 0), max(col, 0)
        r1, c1 = min(row + height, src.shape[0]), min(col + width, src.shape[1])
        if r1 > r0 and c1 > c0:
            out[r0 - row : r1 - row, c0 - col : c1 - col] = src[r0:r1, c0:c1]
        return out


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return cv2.GaussianBlur(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8), (5, 5), 2)


@pytest.mark.parametrize(
    ("slide_mpp", "model_mpp", "level", "scale"),
    [(0.25, 0.25, 0, 1.0), (0.499, 0.5, 0, 1.0), (0.5, 0.25, 0, 0.5), (0.25, 0.5, 1, 1.0),
     (0.25, 0.7, 1, 1.4)],
)
def test_model_grid_picks_the_finest_sufficient_level(
    image: np.ndarray, slide_mpp: float, model_mpp: float, level: int, scale: float
) -> None:
    grid = model_grid(ArraySlide(image, slide_mpp), model_mpp)
    assert grid.level == level
    assert grid.scale == pytest.approx(scale)
    assert grid.mpp == pytest.approx(slide_mpp * grid.level0_per_model)


@pytest.mark.parametrize(("slide_mpp", "model_mpp"), [(0.25, 0.25), (0.5, 0.25), (0.25, 0.6)])
def test_overlapping_boxes_read_identical_pixels(
    image: np.ndarray, slide_mpp: float, model_mpp: float
) -> None:
    slide = ArraySlide(image, slide_mpp)
    grid = model_grid(slide, model_mpp)
    a = read_model_box(slide, grid, Box(10, 20, 210, 330))
    b = read_model_box(slide, grid, Box(110, 120, 400, 420))
    # Same global mapping; OpenCV's fixed-point interpolation may round a rare tie differently.
    diff = np.abs(a[100:, 100:].astype(int) - b[:100, :210].astype(int))
    assert diff.max() <= (0 if grid.scale == 1.0 else 1)
    assert (diff > 0).mean() < 0.01


def test_upsampled_read_matches_a_plain_resize(image: np.ndarray) -> None:
    slide = ArraySlide(image, 0.5)
    grid = model_grid(slide, 0.25)
    got = read_model_box(slide, grid, Box(0, 0, 1200, 1600)).astype(int)
    want = cv2.resize(image, (1600, 1200), interpolation=cv2.INTER_LINEAR).astype(int)
    assert np.abs(got[4:-4, 4:-4] - want[4:-4, 4:-4]).max() <= 2


def test_outside_the_slide_is_white(image: np.ndarray) -> None:
    slide = ArraySlide(image, 0.25)
    grid = model_grid(slide, 0.25)
    tile = read_model_box(slide, grid, Box(-50, -50, 50, 50))
    assert (tile[:50] == 255).all() and (tile[:, :50] == 255).all()
    np.testing.assert_array_equal(tile[50:, 50:], image[:50, :50])
