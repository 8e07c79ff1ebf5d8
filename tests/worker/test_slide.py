"""Opening slides: every real file in shared/data/slides, synthetic fixtures for each reader path,
and the ways a file can be refused."""

from __future__ import annotations

import math
import struct
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import openslide
import pydicom
import pytest
import tifffile
from numpy.typing import NDArray
from PIL import Image

from worker.errors import MissingResolution, NotRGBSlide, SlideTooLarge, UnsupportedSlide
from worker.slide import (
    DicomFrameSlide,
    ImageSlide,
    OpenSlideSlide,
    Slide,
    TiffSlide,
    WsiDicomSlide,
    open_slide,
)
from worker.slide.base import MAX_UNTILED_PIXELS, PLANNING_PIXEL_BUDGET, ChunkCache
from worker.slide.dicom_reader import quiet_dicom

SLIDES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "slides"
CMU = SLIDES / "CMU-1-Small-Region.svs"
PATHML_DICOM = SLIDES / "pathml_small_dicom.dcm"
BOXES_TIFF = SLIDES / "synthetic" / "boxes.tiff"

# Every slide-like file in shared/data/slides and what opening it must do.
# (relative path, mpp needed, reader class, format, (height, width), mpp from metadata, levels)
OPENS = [
    ("CMU-1-Small-Region.svs", False, OpenSlideSlide, "aperio", (2967, 2220), 0.499, 1),
    ("synthetic/small.svs", False, OpenSlideSlide, "aperio", (16, 16), 0.499, 1),
    ("synthetic/boxes_0.dcm", False, OpenSlideSlide, "dicom", (16, 16), 0.499, 1),
    ("synthetic/boxes_1.dcm", False, OpenSlideSlide, "dicom", (16, 16), 0.499, 1),
    # 72 dpi (352.8 µm/px) in the TIFF tags is a default, not a measurement.
    ("synthetic/boxes.tiff", True, OpenSlideSlide, "generic-tiff", (250, 300), None, 4),
    # OpenSlide and wsidicom refuse it; read frame by frame with pydicom; no pixel spacing.
    ("pathml_small_dicom.dcm", True, DicomFrameSlide, "dicom", (2638, 3236), None, 1),
    # IHC, but RGB: opening it is fine (refusing stains is not the reader's job); no resolution.
    ("not_he/kidney-48-5.tif", True, TiffSlide, "tiff", (901, 1493), None, 1),
    ("tiles/high-nuclei-score-level0.png", True, ImageSlide, "image", (779, 956), None, 1),
    ("tiles/no-tissue-red-pen.png", True, ImageSlide, "image", (512, 512), None, 1),
    ("tiles/no-tissue.png", True, ImageSlide, "image", (512, 512), None, 1),
]
NOT_RGB = [
    ("not_he/pathml_smalltif.tif", "1 channel of uint16"),
    ("not_he/pathml_small_vectra.qptiff", "3 channels of uint8"),
]
IGNORED_SUFFIXES = {".txt"}  # licences


def _files_in_slides_dir() -> set[str]:
    return {
        str(path.relative_to(SLIDES))
        for path in SLIDES.rglob("*")
        if path.is_file() and path.suffix not in IGNORED_SUFFIXES and "licenses" not in path.parts
    }


def _mean_abs_diff(a: NDArray[np.uint8], b: NDArray[np.uint8]) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --- every real file ----------------------------------------------------------------------------


def test_the_tables_cover_every_file_in_the_slides_directory() -> None:
    covered = {row[0] for row in OPENS} | {row[0] for row in NOT_RGB}
    assert _files_in_slides_dir() == covered


@pytest.mark.parametrize(
    ("name", "needs_mpp", "reader", "fmt", "shape", "metadata_mpp", "levels"),
    OPENS,
    ids=[row[0] for row in OPENS],
)
def test_real_slides_open_with_the_right_reader_shape_and_resolution(
    name: str,
    needs_mpp: bool,
    reader: type[Slide],
    fmt: str,
    shape: tuple[int, int],
    metadata_mpp: float | None,
    levels: int,
) -> None:
    path = SLIDES / name
    if needs_mpp:
        with pytest.raises(MissingResolution, match="--mpp"):
            open_slide(path)
    with open_slide(path, mpp=0.5 if needs_mpp else None) as slide:
        assert isinstance(slide, reader)
        assert slide.format == fmt
        assert slide.shape == shape
        assert slide.level_shapes[0] == shape
        assert len(slide.level_shapes) == len(slide.level_downsamples) == levels
        assert slide.level_downsamples[0] == 1.0
        assert list(slide.level_downsamples) == sorted(slide.level_downsamples)
        assert slide.mpp == pytest.approx(metadata_mpp if metadata_mpp else 0.5)
        assert slide.properties["mpp_source"] == ("user" if needs_mpp else "metadata")
        pixels = slide.read(0, row=3, col=5, height=7, width=11)
        assert pixels.shape == (7, 11, 3)
        assert pixels.dtype == np.uint8


@pytest.mark.parametrize(("name", "found"), NOT_RGB, ids=[row[0] for row in NOT_RGB])
def test_grey_16_bit_and_fluorescence_files_are_refused_naming_what_was_found(
    name: str, found: str
) -> None:
    for mpp in (None, 0.5):  # refused for what it is, not for a missing resolution
        with pytest.raises(NotRGBSlide, match=found) as info:
            open_slide(SLIDES / name, mpp=mpp)
        assert name.split("/")[-1] in str(info.value)


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("CMU-1-Small-Region.svs", 0),
        ("synthetic/boxes.tiff", 0),
        ("synthetic/boxes.tiff", 1),
        ("pathml_small_dicom.dcm", 0),
        ("not_he/kidney-48-5.tif", 0),
        ("tiles/high-nuclei-score-level0.png", 0),
    ],
)
def test_a_region_equals_the_same_crop_of_the_whole_level(name: str, level: int) -> None:
    with open_slide(SLIDES / name, mpp=0.5) as slide:
        height, width = slide.level_shapes[level]
        whole = slide.read(level, row=0, col=0, height=height, width=width)
        for row, col, h, w in [(0, 0, 5, 5), (17, 29, 61, 43), (height - 9, width - 13, 9, 13)]:
            region = slide.read(level, row=row, col=col, height=h, width=w)
            np.testing.assert_array_equal(region, whole[row : row + h, col : col + w])


def test_lower_levels_match_a_downsampled_level_0() -> None:
    with open_slide(BOXES_TIFF, mpp=0.5) as slide:
        level0 = slide.read(0, row=0, col=0, height=250, width=300)
        for level in range(1, len(slide.level_shapes)):
            height, width = slide.level_shapes[level]
            lower = slide.read(level, row=0, col=0, height=height, width=width)
            expected = cv2.resize(level0, (width, height), interpolation=cv2.INTER_AREA)
            # Sharp synthetic edges: allow the resampling differences of two downsamplers.
            assert _mean_abs_diff(lower, expected) < 12, level


def test_thumbnail_matches_a_downsampled_slide_and_reports_its_scale() -> None:
    with open_slide(CMU) as slide:
        thumbnail, downsample = slide.thumbnail(max_side=512)
        whole = slide.read(0, row=0, col=0, height=2967, width=2220)
    assert max(thumbnail.shape[:2]) == 512
    assert downsample == pytest.approx(2967 / 512)
    assert thumbnail.shape[:2] == (512, math.ceil(2220 / downsample))
    # Thumbnail pixel (r, c) covers level-0 [r·d, (r+1)·d): the last column reaches past the slide.
    padded = np.full((2967, math.ceil(384 * downsample), 3), 255, np.uint8)
    padded[:, :2220] = whole
    expected = cv2.resize(padded, (384, 512), interpolation=cv2.INTER_AREA)
    assert _mean_abs_diff(thumbnail, expected) < 2


def test_a_slide_smaller_than_the_thumbnail_is_its_own_thumbnail() -> None:
    with open_slide(SLIDES / "synthetic" / "small.svs") as slide:
        thumbnail, downsample = slide.thumbnail(max_side=2048)
        np.testing.assert_array_equal(thumbnail, slide.read(0, row=0, col=0, height=16, width=16))
    assert downsample == 1.0


@pytest.mark.parametrize("name", [row[0] for row in OPENS])
def test_reading_outside_the_slide_gives_white(name: str) -> None:
    with open_slide(SLIDES / name, mpp=0.5) as slide:
        height, width = slide.shape
        assert (slide.read(0, row=-50, col=-50, height=20, width=30) == 255).all()
        assert (slide.read(0, row=height + 5, col=0, height=4, width=4) == 255).all()
        straddling = slide.read(0, row=height - 4, col=width - 6, height=10, width=10)
        inside = slide.read(0, row=height - 4, col=width - 6, height=4, width=6)
    np.testing.assert_array_equal(straddling[:4, :6], inside)
    assert (straddling[4:] == 255).all()
    assert (straddling[:, 6:] == 255).all()


def test_best_level_picks_the_largest_downsample_not_above_the_request() -> None:
    with open_slide(BOXES_TIFF, mpp=0.5) as slide:
        downsamples = slide.level_downsamples  # 1, 2, 4.016…, 8.086…
        assert slide.best_level(0.5) == 0
        assert slide.best_level(1.0) == 0
        assert slide.best_level(2.0) == 1
        assert slide.best_level(4.0) == 1
        assert slide.best_level(downsamples[2]) == 2
        assert slide.best_level(1000.0) == 3
        with pytest.raises(ValueError, match="downsample"):
            slide.best_level(-1.0)


def test_read_checks_its_arguments() -> None:
    with open_slide(CMU) as slide:
        with pytest.raises(ValueError, match="level"):
            slide.read(1, row=0, col=0, height=4, width=4)
        with pytest.raises(ValueError, match="height and width"):
            slide.read(0, row=0, col=0, height=0, width=4)
        with pytest.raises(TypeError, match="row"):
            slide.read(0, row=1.5, col=0, height=4, width=4)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="limit"):
            slide.read(0, row=0, col=0, height=100_000, width=100_000)


def test_a_closed_slide_cannot_be_read() -> None:
    slide = open_slide(CMU)
    with slide:
        pass
    with pytest.raises(ValueError, match="closed"):
        slide.read(0, row=0, col=0, height=4, width=4)
    slide.close()  # idempotent


# --- resolution ----------------------------------------------------------------------------------


def test_the_mpp_argument_overrides_the_metadata() -> None:
    with open_slide(CMU, mpp=0.25) as slide:
        assert slide.mpp == 0.25
        assert slide.properties["mpp_source"] == "user"
        assert slide.properties["metadata_mpp"] == "0.499"


@pytest.mark.parametrize("mpp", [0.0, -0.5, 250.0, 0.001, float("nan"), float("inf")])
def test_implausible_mpp_arguments_are_refused(mpp: float) -> None:
    with pytest.raises(ValueError, match="mpp"):
        open_slide(CMU, mpp=mpp)


def test_a_non_numeric_mpp_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="mpp"):
        open_slide(CMU, mpp="0.5")  # type: ignore[arg-type]


def test_missing_resolution_tells_the_user_how_to_pass_it() -> None:
    with pytest.raises(MissingResolution) as info:
        open_slide(PATHML_DICOM)
    message = str(info.value)
    assert "pathml_small_dicom.dcm" in message
    assert "--mpp" in message
    assert "0.25" in message


# --- the pydicom fallback -------------------------------------------------------------------------


def _frame(index: int) -> NDArray[np.uint8]:
    with quiet_dicom():
        return pydicom.pixels.pixel_array(str(PATHML_DICOM), index=index)


def test_the_dicom_fallback_decodes_only_the_frames_a_region_overlaps() -> None:
    # 3236 × 2638 px in 500 × 500 frames, row-major: 7 frames per row.
    expected = np.block(
        [[[_frame(0)], [_frame(1)]], [[_frame(7)], [_frame(8)]]]
    )  # (1000, 1000, 3)
    with open_slide(PATHML_DICOM, mpp=0.5) as slide:
        assert isinstance(slide, DicomFrameSlide)
        decoded: list[int] = []
        decode = slide._decode_frame
        slide._decode_frame = lambda index: decoded.append(index) or decode(index)  # type: ignore[method-assign]
        region = slide.read(0, row=430, col=380, height=150, width=260)
    assert sorted(decoded) == [0, 1, 7, 8]
    np.testing.assert_array_equal(region, expected[430:580, 380:640])


def test_overlapping_reads_reuse_decoded_frames() -> None:
    with open_slide(PATHML_DICOM, mpp=0.5) as slide:
        decoded: list[int] = []
        decode = slide._decode_frame
        slide._decode_frame = lambda index: decoded.append(index) or decode(index)  # type: ignore[method-assign]
        first = slide.read(0, row=0, col=0, height=600, width=600)
        again = slide.read(0, row=100, col=100, height=400, width=400)
    assert sorted(decoded) == [0, 1, 7, 8]
    np.testing.assert_array_equal(again, first[100:500, 100:500])


def test_the_chunk_cache_is_bounded_in_bytes_but_keeps_the_newest() -> None:
    cache = ChunkCache(max_bytes=250)
    chunk = np.zeros(100, np.uint8)
    cache.put("a", chunk)
    cache.put("b", chunk)
    assert cache.get("a") is chunk  # now the most recently used
    cache.put("c", chunk)  # 300 bytes > 250: the least recently used ("b") goes
    assert cache.get("b") is None
    assert cache.get("a") is chunk
    assert cache.get("c") is chunk
    cache.put("huge", np.zeros(1000, np.uint8))
    assert len(cache) == 1
    assert cache.get("huge") is not None


def test_the_dicom_fallback_clips_the_last_partial_frames() -> None:
    last = _frame(41)  # bottom-right frame: rows 2500–2637, cols 3000–3235 are inside
    with open_slide(PATHML_DICOM, mpp=0.5) as slide:
        corner = slide.read(0, row=2500, col=3000, height=200, width=300)
    np.testing.assert_array_equal(corner[:138, :236], last[:138, :236])
    assert (corner[138:] == 255).all()
    assert (corner[:, 236:] == 255).all()


def test_the_dicom_fallback_reads_conformant_jpeg_and_uncompressed_files_too() -> None:
    synthetic = SLIDES / "synthetic"
    with OpenSlideSlide(synthetic / "boxes_0.dcm") as reference:
        level0 = reference.read(0, row=0, col=0, height=16, width=16)
    with openslide.OpenSlide(str(synthetic / "boxes_0.dcm")) as osr:
        thumbnail = np.asarray(osr.associated_images["thumbnail"].convert("RGB"))
    with DicomFrameSlide(synthetic / "boxes_0.dcm") as jpeg:  # one 64×64 JPEG frame, 16×16 used
        assert jpeg.mpp == pytest.approx(0.499)  # from the shared functional groups
        assert _mean_abs_diff(jpeg.read(0, row=0, col=0, height=16, width=16), level0) < 0.5
    with DicomFrameSlide(synthetic / "boxes_1.dcm") as native:  # explicit VR, uncompressed
        assert native.properties["transfer_syntax"] == "Explicit VR Little Endian"
        np.testing.assert_array_equal(native.read(0, row=0, col=0, height=16, width=16), thumbnail)


def test_a_truncated_dicom_is_refused(tmp_path: Path) -> None:
    data = PATHML_DICOM.read_bytes()
    broken = tmp_path / "cut.dcm"
    broken.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(UnsupportedSlide, match=r"cut\.dcm"):
        open_slide(broken, mpp=0.5)


def test_wsidicom_reads_the_synthetic_dicom_series_like_openslide() -> None:
    with open_slide(SLIDES / "synthetic" / "boxes_0.dcm") as reference:
        expected = reference.read(0, row=0, col=0, height=16, width=16)
    with WsiDicomSlide(SLIDES / "synthetic") as slide:
        assert slide.shape == (16, 16)
        assert slide.mpp == pytest.approx(0.499)
        pixels = slide.read(0, row=0, col=0, height=16, width=16)
    assert _mean_abs_diff(pixels, expected) < 2


def test_a_dicom_directory_opens() -> None:
    with open_slide(SLIDES / "synthetic") as slide:
        assert slide.format == "dicom"
        assert slide.shape == (16, 16)


# --- refusals -------------------------------------------------------------------------------------


def test_a_text_file_named_svs_is_unsupported(tmp_path: Path) -> None:
    fake = tmp_path / "notes.svs"
    fake.write_text("this is not a slide\n")
    with pytest.raises(UnsupportedSlide, match=r"notes\.svs.*text"):
        open_slide(fake, mpp=0.5)


def test_empty_and_missing_files_are_unsupported(tmp_path: Path) -> None:
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(UnsupportedSlide, match="empty"):
        open_slide(empty)
    with pytest.raises(UnsupportedSlide, match="no such file"):
        open_slide(tmp_path / "missing.svs")


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.9, 0.999])
def test_a_truncated_svs_is_refused_at_open(tmp_path: Path, fraction: float) -> None:
    # Decided: damage is found when opening (cheap structure checks), not halfway through a job.
    data = CMU.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(UnsupportedSlide, match=r"cut\.svs.*(truncated|no readable image)"):
        open_slide(cut, mpp=0.5)


def _write_bare_tiff(path: Path, width: int, height: int, *, tile: int | None = None) -> None:
    """A classic RGB TIFF header claiming width × height pixels, without the pixels."""
    data_offset = 0  # patched below
    entries: list[tuple[int, int, int, int]] = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 3, -1),  # BitsPerSample: offset of three SHORTs, patched below
        (259, 3, 1, 1),
        (262, 3, 1, 2),
        (277, 3, 1, 3),
        (284, 3, 1, 1),
    ]
    if tile is None:
        entries += [(273, 4, 1, data_offset), (278, 4, 1, height), (279, 4, 1, 0xFFFFFFF0)]
    else:
        entries += [(322, 4, 1, tile), (323, 4, 1, tile), (324, 4, 1, 0), (325, 4, 1, 0xFFFFFFF0)]
    entries.sort()
    ifd_size = 2 + 12 * len(entries) + 4
    bits_offset = 8 + ifd_size
    data_offset = bits_offset + 6
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        if tag == 258:
            value = bits_offset
        elif tag in (273, 324):
            value = data_offset
        if kind == 3 and count == 1:
            ifd += struct.pack("<HHIHH", tag, kind, count, value, 0)
        else:
            ifd += struct.pack("<HHII", tag, 3 if tag == 258 else kind, count, value)
    ifd += struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<HHH", 8, 8, 8))


@pytest.mark.parametrize(("tile", "message"), [(None, "untiled 1000000×1000000"), (1_000_000, "tiles")])
def test_a_header_claiming_a_million_squared_pixels_is_refused_without_allocating(
    tmp_path: Path, tile: int | None, message: str
) -> None:
    huge = tmp_path / "huge.tif"
    _write_bare_tiff(huge, 1_000_000, 1_000_000, tile=tile)
    tracemalloc.start()
    try:
        with pytest.raises(UnsupportedSlide, match=message):
            open_slide(huge, mpp=0.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024


def test_untiled_images_just_under_the_limit_are_not_refused_for_size(tmp_path: Path) -> None:
    side = math.isqrt(MAX_UNTILED_PIXELS)
    header_only = tmp_path / "big.tif"
    _write_bare_tiff(header_only, side, side)
    # Refused, but because the pixels are missing, not because of the claimed size.
    with pytest.raises(UnsupportedSlide, match="truncated"):
        open_slide(header_only, mpp=0.5)


def test_unsupported_errors_chain_the_readers_exception(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    data = (SLIDES / "tiles" / "no-tissue.png").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsupportedSlide, match=r"bad\.png") as info:
        open_slide(bad, mpp=0.5)
    assert info.value.__cause__ is not None


def test_other_image_formats_are_unsupported(tmp_path: Path) -> None:
    gif = tmp_path / "tile.gif"
    Image.new("RGB", (8, 8), (200, 100, 150)).save(gif)
    with pytest.raises(UnsupportedSlide, match=r"tile\.gif"):
        open_slide(gif, mpp=0.5)


# --- synthetic fixtures for each reader path -------------------------------------------------------


@pytest.fixture(scope="module")
def rgb() -> NDArray[np.uint8]:
    return np.random.default_rng(7).integers(0, 256, (300, 400, 3), dtype=np.uint8)


def test_ome_tiff_pyramid_reads_levels_and_physical_size(
    tmp_path: Path, rgb: NDArray[np.uint8]
) -> None:
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path) as writer:
        meta = {"PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25, "axes": "YXS"}
        writer.write(rgb, subifds=2, tile=(64, 64), photometric="rgb", metadata=meta)
        writer.write(rgb[::2, ::2], subfiletype=1, tile=(64, 64), photometric="rgb")
        writer.write(rgb[::4, ::4], subfiletype=1, tile=(64, 64), photometric="rgb")
    with open_slide(path) as slide:
        assert isinstance(slide, TiffSlide)
        assert slide.format == "ome-tiff"
        assert slide.mpp == pytest.approx(0.25)
        assert slide.level_shapes == ((300, 400), (150, 200), (75, 100))
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        np.testing.assert_array_equal(
            slide.read(0, row=10, col=70, height=100, width=150), rgb[10:110, 70:220]
        )
        np.testing.assert_array_equal(
            slide.read(2, row=5, col=9, height=40, width=60), rgb[::4, ::4][5:45, 9:69]
        )


@pytest.mark.parametrize("planar", [False, True])
def test_stripped_tiffs_read_strips_and_resolution_tags(
    tmp_path: Path, rgb: NDArray[np.uint8], planar: bool
) -> None:
    path = tmp_path / "strips.tif"
    data = np.moveaxis(rgb, -1, 0) if planar else rgb
    tifffile.imwrite(
        path, data, photometric="rgb", planarconfig="separate" if planar else "contig",
        rowsperstrip=7, resolution=(40_000, 40_000), resolutionunit="CENTIMETER",
    )
    with open_slide(path) as slide:
        assert isinstance(slide, TiffSlide)
        assert slide.mpp == pytest.approx(0.25)  # 40,000 px per cm
        np.testing.assert_array_equal(
            slide.read(0, row=5, col=3, height=290, width=390), rgb[5:295, 3:393]
        )


def test_rgba_tiffs_are_composited_on_white(tmp_path: Path, rgb: NDArray[np.uint8]) -> None:
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:100, :, 3] = 0
    path = tmp_path / "alpha.tif"
    tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=["unassalpha"], rowsperstrip=16)
    with open_slide(path, mpp=0.5) as slide:
        pixels = slide.read(0, row=0, col=0, height=300, width=400)
    assert (pixels[:100] == 255).all()
    np.testing.assert_array_equal(pixels[100:], rgb[100:])


def test_16_bit_rgb_tiffs_are_not_rgb(tmp_path: Path) -> None:
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, np.zeros((32, 32, 3), np.uint16), photometric="rgb")
    with pytest.raises(NotRGBSlide, match="uint16"):
        open_slide(path, mpp=0.5)


def test_png_dpi_is_used_when_it_is_a_microscope_resolution(tmp_path: Path) -> None:
    path = tmp_path / "tile.png"
    Image.new("RGB", (40, 30), (230, 150, 200)).save(path, dpi=(101_600, 101_600))  # 0.25 µm
    with open_slide(path) as slide:
        assert isinstance(slide, ImageSlide)
        assert slide.mpp == pytest.approx(0.25, rel=1e-3)
        assert slide.shape == (30, 40)


def test_grey_pngs_are_not_rgb_and_transparent_pngs_are_white(tmp_path: Path) -> None:
    grey = tmp_path / "grey.png"
    Image.new("L", (8, 8), 120).save(grey)
    with pytest.raises(NotRGBSlide, match="1 channel"):
        open_slide(grey, mpp=0.5)
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(clear)
    with open_slide(clear, mpp=0.5) as slide:
        assert (slide.read(0, row=0, col=0, height=8, width=8) == 255).all()


# --- bounded memory for thumbnails -------------------------------------------------------------


class _FakeSlide(Slide):
    """A uniform pink slide of any size that records every read."""

    def __init__(self, level_shapes: tuple[tuple[int, int], ...]) -> None:
        height0, width0 = level_shapes[0]
        super().__init__(
            Path("fake"),
            format="fake",
            mpp=0.25,
            level_shapes=level_shapes,
            level_downsamples=tuple((height0 / h + width0 / w) / 2 for h, w in level_shapes),
            properties={},
        )
        self.reads: list[tuple[int, int, int]] = []

    def _read_inside(
        self, level: int, row: int, col: int, height: int, width: int
    ) -> NDArray[np.uint8]:
        self.reads.append((level, height, width))
        return np.full((height, width, 3), (230, 150, 200), dtype=np.uint8)


def test_thumbnails_of_single_level_slides_are_read_in_bounded_blocks() -> None:
    slide = _FakeSlide(((12_000, 8_000),))
    # 96 Mpx is over the planning budget; memory stays bounded without one too.
    thumbnail, downsample = slide.thumbnail(max_side=512, budget=None)
    assert thumbnail.shape == (512, math.ceil(8_000 / downsample), 3)
    assert downsample == pytest.approx(12_000 / 512)
    assert len(slide.reads) > 1
    assert max(h * w for _, h, w in slide.reads) <= 4097 * 4097
    # The last column is partly beyond the slide (8,000 / 23.4 = 341.3 px), so partly white.
    assert (thumbnail[:, :-1] == (230, 150, 200)).all()
    assert (thumbnail[:, -1, 1] > 150).all()


def test_thumbnails_use_the_pyramid_level_nearest_the_wanted_scale() -> None:
    slide = _FakeSlide(((100_000, 80_000), (25_000, 20_000), (6_250, 5_000), (1_562, 1_250)))
    thumbnail, _ = slide.thumbnail(max_side=2048)
    assert max(thumbnail.shape[:2]) == 2048
    assert {level for level, _, _ in slide.reads} == {2}  # downsample 16 ≤ 48.8 < 64


# --- the planning pixel budget -----------------------------------------------------------------


def test_thumbnail_cost_is_the_area_read_at_the_chosen_level_and_reads_nothing() -> None:
    pyramid = _FakeSlide(((100_000, 80_000), (25_000, 20_000), (6_250, 5_000), (1_562, 1_250)))
    assert pyramid.thumbnail_cost(max_side=2048) == 6_250 * 5_000
    single = _FakeSlide(((100_000, 100_000),))
    assert single.thumbnail_cost(max_side=2048) == 10**10
    assert single.thumbnail_cost(max_side=2048, box=(40_000, 30_000, 300, 500)) == 300 * 500
    assert pyramid.reads == [] and single.reads == []


def test_a_thumbnail_over_the_budget_is_refused_before_any_read() -> None:
    slide = _FakeSlide(((100_000, 100_000),))
    with pytest.raises(SlideTooLarge, match=r"10,000,000,000 px of level 0 \(budget 268,435,456 px\); "):
        slide.thumbnail(max_side=2048)
    assert PLANNING_PIXEL_BUDGET == 268_435_456
    with pytest.raises(SlideTooLarge, match="budget 1,000 px"):
        _FakeSlide(((100, 100),)).thumbnail(max_side=64, budget=1_000)
    assert slide.reads == []


def test_a_thumbnail_of_a_box_shows_that_area_alone() -> None:
    with open_slide(CMU) as slide:
        region = slide.read(0, row=1000, col=700, height=900, width=600)
        small, downsample = slide.thumbnail(max_side=2048, box=(1000, 700, 900, 600))
        reduced, reduced_downsample = slide.thumbnail(max_side=300, box=(1000, 700, 900, 600))
    np.testing.assert_array_equal(small, region)  # it fits: level 0, pixel for pixel
    assert downsample == 1.0
    assert reduced.shape == (300, 200, 3) and reduced_downsample == 3.0
    expected = np.asarray(cv2.resize(region, (200, 300), interpolation=cv2.INTER_AREA), np.uint8)
    assert _mean_abs_diff(reduced, expected) < 2


def test_the_box_of_the_whole_slide_gives_the_plain_thumbnail() -> None:
    with open_slide(CMU) as slide:
        plain, plain_downsample = slide.thumbnail(max_side=500)
        boxed, boxed_downsample = slide.thumbnail(max_side=500, box=(0, 0, 2967, 2220))
    np.testing.assert_array_equal(boxed, plain)
    assert boxed_downsample == plain_downsample


def test_a_box_reaching_past_the_slide_is_white_there() -> None:
    with open_slide(CMU) as slide:
        image, _ = slide.thumbnail(max_side=2048, box=(2900, 2200, 100, 50))
    assert image.shape == (100, 50, 3)
    assert (image[67:] == 255).all() and (image[:, 20:] == 255).all()
    assert (image[:67, :20] < 250).any()


@pytest.mark.parametrize("box", [(0, 0, 0, 10), (0, 0, 10, -1), (0, 0, 10)])
def test_a_bad_box_is_refused(box: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"box"):
        _FakeSlide(((100, 100),)).thumbnail(box=box)  # type: ignore[arg-type]


def test_images_decoded_at_open_cost_nothing_to_plan_but_tiffs_do(tmp_path: Path) -> None:
    rgb = np.full((300, 200, 3), (200, 120, 180), np.uint8)
    png = tmp_path / "slide.png"
    Image.fromarray(rgb).save(png)
    with open_slide(png, mpp=0.5) as image:
        assert image.thumbnail_cost() == 0
        thumbnail, _ = image.thumbnail(budget=0)  # its pixels are already in memory
    np.testing.assert_array_equal(thumbnail, rgb)
    tiff = tmp_path / "slide.tiff"
    tifffile.imwrite(tiff, rgb, tile=(16, 16), photometric="rgb")
    with TiffSlide(tiff, mpp=0.5) as tiled:
        assert tiled.thumbnail_cost() == 300 * 200
        with pytest.raises(SlideTooLarge):
            tiled.thumbnail(budget=300 * 200 - 1)
