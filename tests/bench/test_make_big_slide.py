"""bench/make_big_slide.py: a pyramidal 40× TIFF of real tissue that our reader and OpenSlide
open at 0.25 µm/px with its reduced levels (built small here; the benchmark builds 20,000²)."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import make_big_slide  # noqa: E402

from worker.slide import TiffSlide, open_slide  # noqa: E402


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("big") / "small.tiff"
    return make_big_slide.build_slide(out, size=2048)


def test_our_reader_opens_it_at_40x_with_its_pyramid(small_slide: Path) -> None:
    with open_slide(small_slide) as slide:
        assert slide.mpp == pytest.approx(0.25, abs=1e-6)
        assert slide.properties["mpp_source"] == "metadata"
        assert slide.level_shapes == ((2048, 2048), (512, 512), (128, 128))
        assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))


def test_it_holds_tissue_not_blank_pixels(small_slide: Path) -> None:
    with open_slide(small_slide) as slide:
        region = slide.read(0, row=512, col=512, height=1024, width=1024)
    dark = (region.mean(axis=2) < 200).mean()  # stained tissue, not the white background
    assert region.std() > 20
    assert dark > 0.2


def test_levels_show_the_same_tissue(small_slide: Path) -> None:
    with open_slide(small_slide) as slide:
        level0 = slide.read(0, row=0, col=0, height=2048, width=2048)
        level1 = slide.read(1, row=0, col=0, height=512, width=512)
        level2 = slide.read(2, row=0, col=0, height=128, width=128)
    shrunk = cv2.resize(level0, (512, 512), interpolation=cv2.INTER_AREA)
    assert np.abs(shrunk.astype(int) - level1).mean() < 8
    shrunk = cv2.resize(level1, (128, 128), interpolation=cv2.INTER_AREA)
    assert np.abs(shrunk.astype(int) - level2).mean() < 8


def test_openslide_and_tifffile_readers_agree(small_slide: Path) -> None:
    with openslide.OpenSlide(str(small_slide)) as osr:
        assert osr.level_count == 3
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        ours = np.asarray(osr.read_region((700, 300), 0, (256, 256)))[..., :3]
    with TiffSlide(small_slide) as slide:
        assert slide.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(slide.read(0, row=300, col=700, height=256, width=256), ours)


def test_deflate_is_lossless_and_matches_jpeg_closely(tmp_path: Path, small_slide: Path) -> None:
    lossless = make_big_slide.build_slide(tmp_path / "deflate.tiff", size=512, compression="deflate")
    with open_slide(lossless) as a, open_slide(small_slide) as b:
        assert a.properties["vendor"] == "generic-tiff" and a.shape == (512, 512)
        exact = a.read(0, row=0, col=0, height=512, width=512)
        lossy = b.read(0, row=0, col=0, height=512, width=512)
    assert np.abs(exact.astype(int) - lossy).mean() < 4


def test_mirror_indices_repeat_the_source_without_jumps() -> None:
    np.testing.assert_array_equal(make_big_slide.mirror_indices(0, 8, 3), [0, 1, 2, 2, 1, 0, 0, 1])
    np.testing.assert_array_equal(make_big_slide.mirror_indices(4, 7, 3), [1, 0, 0])
    with pytest.raises(ValueError, match="period"):
        make_big_slide.mirror_indices(0, 3, 0)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        make_big_slide.build_slide(tmp_path / "x.tiff", size=100)
    with pytest.raises(ValueError, match="tile"):
        make_big_slide.build_slide(tmp_path / "x.tiff", tile=500)
    with pytest.raises(ValueError, match="compression"):
        make_big_slide.build_slide(tmp_path / "x.tiff", compression="lzw")
    assert not (tmp_path / "x.tiff").exists()


def test_command_line_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.tiff"
    assert make_big_slide.main(["--size", "512", "--out", str(out), "--tile", "256"]) == 0
    assert "512×512 px at 0.25 µm/px" in capsys.readouterr().out
    with open_slide(out) as slide:
        assert slide.level_shapes == ((512, 512), (128, 128), (32, 32))
