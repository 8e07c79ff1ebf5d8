"""Planning within a pixel budget: the whole slide from a low level, else its ROI alone, else a
clear refusal; never a slide-sized read."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from tests._synthetic import oracle_card
from tests.worker._huge_tiff import write_repeated_tile_tiff
from worker.errors import SlideTooLarge
from worker.options import InferenceOptions
from worker.slide import Slide, check_planning_budget, open_slide, planning_overviews
from worker.slide.overview import roi_box
from worker.stages import prepare

SLIDES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "slides"
CMU = SLIDES / "CMU-1-Small-Region.svs"
PINK = (230, 150, 200)


class _CountingSlide(Slide):
    """A uniform pink slide of any size that counts the pixels it is asked for."""

    def __init__(self, level_shapes: tuple[tuple[int, int], ...]) -> None:
        height0, width0 = level_shapes[0]
        super().__init__(
            Path("big.tiff"), format="fake", mpp=0.25, level_shapes=level_shapes,
            level_downsamples=tuple((height0 / h + width0 / w) / 2 for h, w in level_shapes),
            properties={},
        )
        self.pixels_read = 0

    def _read_inside(
        self, level: int, row: int, col: int, height: int, width: int
    ) -> NDArray[np.uint8]:
        self.pixels_read += height * width
        return np.full((height, width, 3), PINK, dtype=np.uint8)


def _single_level() -> _CountingSlide:
    return _CountingSlide(((100_000, 100_000),))


def test_a_slide_with_a_low_level_is_seen_whole() -> None:
    slide = _CountingSlide(((100_000, 80_000), (25_000, 20_000), (6_250, 5_000), (1_562, 1_250)))
    overview, detail = planning_overviews(slide, (10, 10, 300, 300))
    assert detail is overview and overview.origin == (0, 0)
    assert overview.image.shape == (2048, 1639, 3)
    assert 0 < slide.pixels_read <= 6_250 * 5_000 * 1.01


def test_without_a_low_level_the_roi_alone_is_read() -> None:
    slide = _single_level()
    overview, detail = planning_overviews(slide, (30_000, 50_000, 300, 200))  # x, y, w, h
    assert slide.pixels_read == 300 * 200
    assert detail.origin == (50_000, 30_000) and detail.downsample == 1.0
    assert detail.image.shape == (200, 300, 3)
    # The overview is the whole slide's geometry, white except where the roi lies.
    assert overview.origin == (0, 0) and overview.downsample == pytest.approx(100_000 / 2048)
    assert overview.image.shape == (2048, 2048, 3)
    painted = np.argwhere((overview.image != 255).any(axis=2))
    d = overview.downsample
    assert painted[:, 0].min() == int(50_000 / d) and painted[:, 0].max() == int(50_200 / d)
    assert painted[:, 1].min() == int(30_000 / d) and painted[:, 1].max() == int(30_300 / d)
    assert (overview.image[tuple(painted[0])] == PINK).all()


def test_a_large_roi_is_read_downsampled_within_the_budget() -> None:
    slide = _single_level()
    _, detail = planning_overviews(slide, (0, 0, 8_000, 4_000))
    assert detail.image.shape == (1024, 2048, 3)
    assert detail.downsample == pytest.approx(8_000 / 2048)
    assert slide.pixels_read <= 8_000 * 4_000 * 1.01


def test_without_a_low_level_or_an_roi_the_slide_is_refused_unread() -> None:
    slide = _single_level()
    with pytest.raises(SlideTooLarge) as refused:
        planning_overviews(slide)
    message = str(refused.value)
    for words in ("big.tiff", "100,000×100,000 px", "10,000,000,000 px", "268,435,456 px",
                  "region of interest (roi)", "pyramidal TIFF"):
        assert words in message
    assert slide.pixels_read == 0


def test_an_roi_too_large_for_the_budget_is_refused_unread() -> None:
    slide = _single_level()
    with pytest.raises(SlideTooLarge, match=r"40,000×10,000 px roi .* smaller roi \(about 16,384×16,384"):
        planning_overviews(slide, (0, 0, 40_000, 10_000))
    assert slide.pixels_read == 0


def test_the_budget_check_decodes_nothing_and_agrees_with_planning() -> None:
    slide = _single_level()
    check_planning_budget(slide, (0, 0, 300, 300))
    with pytest.raises(SlideTooLarge):
        check_planning_budget(slide)
    with pytest.raises(SlideTooLarge):
        check_planning_budget(slide, (0, 0, 20_000, 20_000))
    check_planning_budget(slide, budget=10**10)
    assert slide.pixels_read == 0


def test_roi_boxes_are_clipped_to_the_slide_and_checked() -> None:
    assert roi_box(None, (100, 200)) is None
    assert roi_box((150, 50, 100, 100), (100, 200)) == (50, 150, 50, 50)
    with pytest.raises(ValueError, match="outside"):
        roi_box((200, 0, 10, 10), (100, 200))
    with pytest.raises(ValueError, match="w,h > 0"):
        roi_box((0, 0, 0, 10), (100, 200))


# --- the pipeline's planning ---------------------------------------------------------------------


def _huge_slide(tmp_path: Path) -> Path:
    with open_slide(CMU) as slide:
        tile = slide.read(0, row=2200, col=1400, height=512, width=512)
    return write_repeated_tile_tiff(tmp_path / "huge.tif", tile, height=100_000, width=100_000,
                                    mpp=0.5)


def test_a_huge_single_level_slide_is_planned_from_its_roi_in_moments(tmp_path: Path) -> None:
    path = _huge_slide(tmp_path)
    assert path.stat().st_size < 2_000_000
    options = InferenceOptions(model=Path("unused.onnx"), roi=(50_000, 40_000, 300, 300))
    start = time.monotonic()
    tracemalloc.start()
    try:
        plan = prepare(path, oracle_card(), options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 30  # an unbounded read takes many minutes
    assert peak < 100 * 2**20  # the 2048² overview and the roi; the slide would be 30 GB
    assert plan.tissue is not None and plan.tissue.origin == (40_000, 50_000)
    assert plan.tissue.mask.shape == (300, 300)
    assert plan.tissue.mask.any()
    assert len(plan.regions) >= 1
    assert plan.thumbnail.shape == (2048, 2048, 3)
    assert (plan.thumbnail == 255).mean() > 0.99  # white but for the roi's few pixels
    assert 0 < plan.tissue_area_mm2 <= (300 * 0.5 / 1000) ** 2


def test_a_huge_single_level_slide_without_an_roi_is_refused(tmp_path: Path) -> None:
    path = _huge_slide(tmp_path)
    start = time.monotonic()
    with pytest.raises(SlideTooLarge, match="roi"):
        prepare(path, oracle_card(), InferenceOptions(model=Path("unused.onnx")))
    assert time.monotonic() - start < 30


def test_a_normal_slide_is_planned_from_its_whole_thumbnail_as_before() -> None:
    options = InferenceOptions(model=Path("unused.onnx"), roi=(200, 300, 1000, 1000))
    plan = prepare(CMU, oracle_card(), options)
    with open_slide(CMU) as slide:
        thumbnail, downsample = slide.thumbnail(max_side=2048)
    np.testing.assert_array_equal(plan.thumbnail, thumbnail)
    assert plan.thumbnail_downsample == downsample
    assert plan.tissue is not None and plan.tissue.origin == (0, 0)
    assert plan.tissue.mask.shape == thumbnail.shape[:2]
