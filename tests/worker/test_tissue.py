"""Tissue detection on real tiles and a real slide, the tissue mask value object, user masks."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from worker.errors import SlideTooLarge, TissueMaskError
from worker.plan import Box
from worker.slide import open_slide
from worker.tissue import TissueMask, detect_tissue, load_tissue_mask, pen_mask, tissue_mask_for

SLIDES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "slides"
TILES = SLIDES / "tiles"


def _tile(name: str) -> NDArray[np.uint8]:
    with Image.open(TILES / name) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def cmu_thumbnail() -> NDArray[np.uint8]:
    with open_slide(SLIDES / "CMU-1-Small-Region.svs") as slide:
        thumbnail, _ = slide.thumbnail(max_side=1024)
    return thumbnail


# --- detect_tissue on real images --------------------------------------------------------------


def test_a_tile_without_tissue_gives_a_nearly_empty_mask() -> None:
    mask = detect_tissue(_tile("no-tissue.png"))
    assert mask.shape == (512, 512)
    assert mask.dtype == np.bool_
    assert mask.mean() < 0.01


def test_red_pen_is_not_tissue() -> None:
    tile = _tile("no-tissue-red-pen.png")
    ink = pen_mask(cv2.cvtColor(tile, cv2.COLOR_RGB2HSV_FULL))
    assert ink.mean() > 0.3  # the tile is mostly ink…
    mask = detect_tissue(tile)
    assert mask.mean() < 0.02  # …and none of it, nor its blurred edges, is tissue
    assert not (mask & ink).any()


def test_a_tile_full_of_nuclei_is_mostly_tissue() -> None:
    assert detect_tissue(_tile("high-nuclei-score-level0.png")).mean() > 0.9


def test_the_cmu_slide_has_a_plausible_tissue_fraction(cmu_thumbnail: NDArray[np.uint8]) -> None:
    # The skin section covers about a third of the region; the rest is glass.
    fraction = detect_tissue(cmu_thumbnail).mean()
    assert 0.25 < fraction < 0.5


def test_the_thumbnail_size_hardly_changes_the_tissue_fraction(
    cmu_thumbnail: NDArray[np.uint8],
) -> None:
    small = cv2.resize(cmu_thumbnail, (192, 256), interpolation=cv2.INTER_AREA)
    assert detect_tissue(small).mean() == pytest.approx(detect_tissue(cmu_thumbnail).mean(), abs=0.05)


@pytest.mark.parametrize(
    "colour", [(200, 20, 30), (20, 160, 40), (30, 60, 200)], ids=["red", "green", "blue"]
)
def test_pen_strokes_across_tissue_are_excluded_and_the_tissue_kept(
    cmu_thumbnail: NDArray[np.uint8], colour: tuple[int, int, int]
) -> None:
    before = detect_tissue(cmu_thumbnail)
    marked = cmu_thumbnail.copy()
    height, width = marked.shape[:2]
    stroke = np.zeros((height, width), np.uint8)
    cv2.line(stroke, (0, 0), (width - 1, height - 1), 1, 12)
    cv2.circle(stroke, (width // 2, height // 2), height // 3, 1, 10)
    marked[stroke.astype(bool)] = colour
    marked = cv2.GaussianBlur(marked, (5, 5), 0)  # scanned ink has soft edges
    after = detect_tissue(marked)
    core = cv2.erode(stroke, np.ones((5, 5), np.uint8)).astype(bool)
    assert not (after & core).any()
    kept = (after & before & ~cv2.dilate(stroke, np.ones((15, 15), np.uint8)).astype(bool)).sum()
    away_from_pen = (before & ~cv2.dilate(stroke, np.ones((15, 15), np.uint8)).astype(bool)).sum()
    assert kept > 0.95 * away_from_pen


def test_black_borders_and_dust_are_not_tissue(cmu_thumbnail: NDArray[np.uint8]) -> None:
    framed = cmu_thumbnail.copy()
    framed[:40] = framed[-40:] = 0
    framed[:, :25] = (20, 20, 25)
    rng = np.random.default_rng(3)
    for row, col in rng.integers(60, 900, (30, 2)):  # dark specks on the glass
        cv2.circle(framed, (int(col) % 700, int(row)), 2, (40, 40, 40), -1)
    mask = detect_tissue(framed)
    assert not mask[:40].any()
    assert not mask[-40:].any()
    assert not mask[:, :25].any()
    inner = (slice(40, -40), slice(25, None))
    assert mask[inner].mean() == pytest.approx(detect_tissue(cmu_thumbnail)[inner].mean(), abs=0.03)


@pytest.mark.parametrize("level", [255, 245, 230])
def test_blank_images_give_empty_masks_not_the_otsu_of_noise(level: int) -> None:
    rng = np.random.default_rng(level)
    noise = rng.normal(level, 3, (300, 400, 3)).clip(0, 255).astype(np.uint8)
    assert not detect_tissue(noise).any()


def test_small_fragments_are_dropped_by_area() -> None:
    image = np.full((200, 200, 3), 245, np.uint8)
    image[20:80, 20:80] = (200, 120, 180)  # 3,600 px of pink tissue
    image[150:156, 150:156] = (200, 120, 180)  # 36 px
    mask = detect_tissue(image, min_area_fraction=0.002)  # 80 px
    assert mask[30:70, 30:70].all()
    assert not mask[140:170, 140:170].any()


def test_detect_tissue_checks_its_input() -> None:
    with pytest.raises(TypeError, match="uint8"):
        detect_tissue(np.zeros((8, 8, 3), np.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        detect_tissue(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="min_area_fraction"):
        detect_tissue(np.zeros((8, 8, 3), np.uint8), min_area_fraction=1.5)


# --- TissueMask ----------------------------------------------------------------------------------


def _one_pixel_mask() -> TissueMask:
    mask = np.zeros((4, 4), bool)
    mask[1, 2] = True  # level-0 rows [10, 20), cols [20, 30) at downsample 10
    return TissueMask(mask, 10.0)


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ((10, 20, 20, 30), True),
        ((0, 0, 10, 20), False),  # half-open: ends where the tissue pixel starts
        ((19.5, 29.5, 40, 40), True),
        ((0, 0, 10.5, 20.5), True),
        ((-100, -100, 11, 21), True),
        ((20, 0, 40, 40), False),
        ((500, 500, 600, 600), False),
        ((15, 25, 15, 25), False),  # empty box
    ],
)
def test_any_in_maps_level_0_boxes_onto_the_mask(
    box: tuple[float, float, float, float], expected: bool
) -> None:
    assert _one_pixel_mask().any_in(*box) is expected


def test_tissue_in_asks_any_in_about_a_level_0_box_with_the_masks_origin_and_downsample() -> None:
    rng = np.random.default_rng(5)
    mask = TissueMask(rng.random((30, 40)) < 0.05, downsample=7.3, origin=(100, 250))
    for _ in range(500):
        row0, col0 = (int(v) for v in rng.integers(0, 600, 2))
        row1, col1 = row0 + int(rng.integers(1, 80)), col0 + int(rng.integers(1, 80))
        # The planner's arithmetic, written out: mask cells overlapping the box, clipped.
        r0, c0 = max(0, math.floor((row0 - 100) / 7.3)), max(0, math.floor((col0 - 250) / 7.3))
        r1, c1 = min(30, math.ceil((row1 - 100) / 7.3)), min(40, math.ceil((col1 - 250) / 7.3))
        expected = r1 > r0 and c1 > c0 and bool(mask.mask[r0:r1, c0:c1].any())
        assert mask.tissue_in(Box(row0, col0, row1, col1)) is expected


def test_areas() -> None:
    mask = _one_pixel_mask()
    assert mask.area_fraction == pytest.approx(1 / 16)
    assert mask.area_mm2(0.5) == pytest.approx((10 * 0.5 / 1000) ** 2)
    with pytest.raises(ValueError, match="mpp"):
        mask.area_mm2(0.0)


def test_tissue_mask_validates() -> None:
    with pytest.raises(TypeError, match="bool"):
        TissueMask(np.zeros((4, 4), np.uint8), 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="downsample"):
        TissueMask(np.zeros((4, 4), bool), 0.0)
    with pytest.raises(ValueError, match="empty"):
        TissueMask(np.zeros((0, 4), bool), 1.0)
    assert "TissueMask(shape=(4, 4)" in repr(TissueMask(np.zeros((4, 4), bool), 1.0))


def test_tissue_mask_for_a_slide_covers_the_slide() -> None:
    with open_slide(SLIDES / "CMU-1-Small-Region.svs") as slide:
        tissue = tissue_mask_for(slide, max_side=512)
        height, width = slide.shape
    assert max(tissue.mask.shape) == 512
    assert tissue.downsample == pytest.approx(height / 512)
    assert tissue.mask.shape[1] * tissue.downsample >= width
    assert 0.25 < tissue.area_fraction < 0.5
    # About a third of 1.48 × 1.11 mm (0.499 µm/px).
    assert 0.4 < tissue.area_mm2(0.499) < 0.8
    assert not tissue.any_in(0, 0, 100, 100)  # the glass in the top-left corner



def test_a_mask_with_an_origin_covers_only_its_area() -> None:
    # The one-pixel mask shifted so that its corner sits at level-0 (1000, 2000).
    mask = TissueMask(_one_pixel_mask().mask, 10.0, origin=(1000, 2000))
    assert mask.any_in(1010, 2020, 1020, 2030)
    assert not mask.any_in(10, 20, 20, 30)  # where the mask would be without the origin
    assert not mask.any_in(0, 0, 1000, 2000)  # before the corner: not tissue
    assert not mask.any_in(5000, 5000, 6000, 6000)  # past the mask: not tissue
    assert mask.area_mm2(0.5) == pytest.approx((10 * 0.5 / 1000) ** 2)
    assert "origin=(1000, 2000)" in repr(mask)
    with pytest.raises(ValueError, match="origin"):
        TissueMask(np.zeros((4, 4), bool), 1.0, origin=(1.5, 0))  # type: ignore[arg-type]


def test_within_budget_the_mask_covers_the_whole_slide_even_with_an_roi() -> None:
    with open_slide(SLIDES / "CMU-1-Small-Region.svs") as slide:
        whole = tissue_mask_for(slide, max_side=512)
        with_roi = tissue_mask_for(slide, max_side=512, roi=(500, 800, 300, 400))
    assert with_roi.origin == (0, 0)
    np.testing.assert_array_equal(with_roi.mask, whole.mask)


def test_over_budget_the_mask_covers_the_roi_alone() -> None:
    with open_slide(SLIDES / "CMU-1-Small-Region.svs") as slide:
        # A budget below the whole slide (6.6 Mpx) but above the roi: the roi alone is read.
        tissue = tissue_mask_for(slide, max_side=512, roi=(500, 800, 1000, 1200), budget=2_000_000)
        roi = slide.read(0, row=800, col=500, height=1200, width=1000)
        with pytest.raises(SlideTooLarge, match="roi"):
            tissue_mask_for(slide, max_side=512, budget=2_000_000)
    assert tissue.origin == (800, 500)
    assert tissue.downsample == pytest.approx(1200 / 512)
    reduced = cv2.resize(roi, tissue.mask.shape[::-1], interpolation=cv2.INTER_AREA)
    expected = detect_tissue(np.asarray(reduced, np.uint8))
    assert np.mean(tissue.mask == expected) > 0.95  # two downsamplers, one detector
    assert not tissue.any_in(0, 0, 800, 500)  # outside the roi nothing is tissue


# --- user masks ----------------------------------------------------------------------------------


def test_a_user_mask_of_any_size_with_the_slide_aspect_ratio_loads(tmp_path: Path) -> None:
    pixels = np.zeros((100, 150), np.uint8)
    pixels[10:20, 30:60] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(pixels).save(path)
    tissue = load_tissue_mask(path, (1000, 1500))
    assert tissue.downsample == pytest.approx(10.0)
    np.testing.assert_array_equal(tissue.mask, pixels > 0)
    assert tissue.any_in(100, 300, 110, 310)
    assert not tissue.any_in(0, 0, 100, 300)


def test_a_user_mask_within_two_percent_is_resampled_to_the_slide(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    Image.fromarray(np.full((101, 150), 7, np.uint8)).save(path)  # aspect off by 1%
    tissue = load_tissue_mask(path, (1000, 1500))
    assert tissue.mask.all()
    assert tissue.mask.shape[0] * tissue.downsample >= 1000
    assert tissue.mask.shape[1] * tissue.downsample >= 1500


def test_rgba_masks_use_colour_not_alpha(tmp_path: Path) -> None:
    pixels = np.zeros((50, 50, 4), np.uint8)
    pixels[..., 3] = 255
    pixels[:10, :10, 1] = 200
    path = tmp_path / "mask.png"
    Image.fromarray(pixels, "RGBA").save(path)
    tissue = load_tissue_mask(path, (500, 500))
    assert tissue.mask.sum() == 100


def test_a_mask_with_the_wrong_aspect_ratio_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    Image.fromarray(np.zeros((150, 100), np.uint8)).save(path)
    with pytest.raises(TissueMaskError, match="aspect"):
        load_tissue_mask(path, (1000, 1500))


def test_an_unreadable_mask_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    path.write_text("not an image")
    with pytest.raises(TissueMaskError, match=r"mask\.png") as info:
        load_tissue_mask(path, (1000, 1500))
    assert info.value.__cause__ is not None
    with pytest.raises(TissueMaskError):
        load_tissue_mask(tmp_path / "missing.png", (1000, 1500))
