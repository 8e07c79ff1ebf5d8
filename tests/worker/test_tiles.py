"""DeepZoom tiles: the pyramid and pixels of openslide's DeepZoomGenerator, for every reader."""

from __future__ import annotations

import io
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import openslide
import pytest
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from worker.slide import ImageSlide, open_slide
from worker.tiles import DZI_NAMESPACE, MAX_DIRECT_PIXELS, DeepZoom, TileOutOfRange

SLIDES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "slides"
CMU1 = SLIDES / "CMU-1-Small-Region.svs"
DICOM = SLIDES / "pathml_small_dicom.dcm"
TILE_PNG = next(iter(sorted((SLIDES / "tiles").glob("*.png"))))


@pytest.fixture(scope="module")
def pair():
    with open_slide(CMU1) as slide:
        reference = openslide.OpenSlide(CMU1)
        try:
            yield DeepZoom(slide), DeepZoomGenerator(reference, tile_size=254, overlap=1,
                                                     limit_bounds=False)
        finally:
            reference.close()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio, dB (JPEG at quality 75 keeps H&E tiles near 27-35 dB)."""
    mse = float(np.mean((a.astype(float) - b.astype(float)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _addresses(zoom: DeepZoom, level: int) -> list[tuple[int, int]]:
    cols, rows = zoom.level_tiles[level]
    return sorted({(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2), (cols - 1, 0)})


def test_the_pyramid_is_openslides(pair) -> None:
    zoom, reference = pair
    assert zoom.level_count == reference.level_count
    assert zoom.level_dimensions == reference.level_dimensions
    assert zoom.level_tiles == reference.level_tiles
    for level in range(zoom.level_count):
        for col, row in _addresses(zoom, level):
            assert zoom.tile_size_of(level, col, row) == reference.get_tile_dimensions(level, (col, row))


def test_the_descriptor_gives_size_tile_size_and_overlap(pair) -> None:
    zoom, reference = pair
    ours, theirs = ET.fromstring(zoom.dzi("jpeg")), ET.fromstring(reference.get_dzi("jpeg"))
    assert ours.tag == theirs.tag == f"{{{DZI_NAMESPACE}}}Image"
    assert ours.attrib == theirs.attrib
    size = ours.find(f"{{{DZI_NAMESPACE}}}Size")
    assert size is not None and size.attrib == {"Width": "2220", "Height": "2967"}


@pytest.mark.parametrize("from_top", [0, 2, 4])
def test_tiles_equal_openslides_at_three_levels(pair, from_top: int) -> None:
    zoom, reference = pair
    level = zoom.level_count - 1 - from_top
    for col, row in _addresses(zoom, level):
        expected = np.asarray(reference.get_tile(level, (col, row)).convert("RGB"))
        np.testing.assert_array_equal(zoom.tile(level, col, row), expected)
        decoded = np.asarray(Image.open(io.BytesIO(zoom.tile_bytes(level, col, row, "jpeg"))))
        assert decoded.shape == expected.shape
        assert _psnr(decoded, expected) > 25.0, (level, col, row)
        png = np.asarray(Image.open(io.BytesIO(zoom.tile_bytes(level, col, row, "png"))))
        np.testing.assert_array_equal(png, expected)


@pytest.mark.parametrize(("level", "col", "row"), [(13, 0, 0), (-1, 0, 0), (12, 9, 0), (12, 0, 12),
                                                   (12, -1, 0), (0, 1, 0)])
def test_addresses_outside_the_pyramid_are_refused(pair, level: int, col: int, row: int) -> None:
    zoom, _ = pair
    with pytest.raises(TileOutOfRange):
        zoom.tile(level, col, row)


def test_an_unknown_format_is_refused(pair) -> None:
    zoom, _ = pair
    with pytest.raises(TileOutOfRange, match="format"):
        zoom.tile_bytes(12, 0, 0, "gif")


def test_tiles_of_a_dicom_slide_are_its_pixels() -> None:
    with open_slide(DICOM, mpp=0.5) as slide:
        zoom = DeepZoom(slide)
        top = zoom.level_count - 1
        assert zoom.level_dimensions[top] == (slide.shape[1], slide.shape[0])
        tile = zoom.tile(top, 1, 2)
        expected = slide.read(0, row=2 * 254 - 1, col=254 - 1, height=256, width=256)
        np.testing.assert_array_equal(tile, expected)
        assert zoom.tile(0, 0, 0).shape == (1, 1, 3)


def test_tiles_of_a_plain_image_are_its_pixels_reduced_by_pillow() -> None:
    with ImageSlide(TILE_PNG, mpp=0.25) as slide:
        height0, width0 = slide.shape
        zoom = DeepZoom(slide, tile_size=4096, overlap=2)  # one tile per level
        whole = slide.read(0, row=0, col=0, height=height0, width=width0)
        np.testing.assert_array_equal(zoom.tile(zoom.level_count - 1, 0, 0), whole)
        level = zoom.level_count - 2
        expected = Image.fromarray(whole)
        expected.thumbnail(zoom.level_dimensions[level], Image.Resampling.LANCZOS)
        np.testing.assert_array_equal(zoom.tile(level, 0, 0), np.asarray(expected))


def test_a_huge_source_region_is_reduced_block_by_block(monkeypatch: pytest.MonkeyPatch, pair) -> None:
    zoom, reference = pair
    monkeypatch.setattr("worker.tiles.MAX_DIRECT_PIXELS", 64 * 64)
    assert MAX_DIRECT_PIXELS > 64 * 64
    level = zoom.level_count - 5  # 1/16: one tile reads the whole slide
    expected = np.asarray(reference.get_tile(level, (0, 0)).convert("RGB")).astype(int)
    blocked = zoom.tile(level, 0, 0)
    assert blocked.shape == expected.shape
    assert np.abs(blocked - expected).mean() < 4.0
