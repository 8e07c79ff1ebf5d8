"""bench/gpu.py's fp16 variants and TensorRT cache: made and named the way a GPU run will use them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from models.card import read_card

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import gpu  # noqa: E402

DEFAULT = BENCH.parent / "models" / "zoo" / "hoverserve-conic-wide.onnx"


def test_the_defaults_point_at_real_files_and_the_work_folder() -> None:
    assert gpu.FP16_IMAGE.is_file()
    args = gpu._parser().parse_args(["out", "--fp16"])
    assert args.fp16 and args.trt_cache == gpu.TRT_CACHE and gpu.TRT_CACHE.parent == gpu.WORK
    assert args.fp16_check_device == "cpu" and args.fp16_image_mpp == 0.25


@pytest.mark.slow
def test_fp16_variant_is_made_once_and_a_failed_check_is_a_reason(tmp_path: Path) -> None:
    made = gpu.fp16_variant(DEFAULT, gpu.FP16_IMAGE, gpu.FP16_IMAGE_MPP, "cpu", tmp_path)
    assert made == tmp_path / "hoverserve-conic-wide-fp16.onnx"
    assert isinstance(made, Path) and read_card(made).precision == "fp16"
    stamp = made.stat().st_mtime_ns
    assert gpu.fp16_variant(DEFAULT, gpu.FP16_IMAGE, gpu.FP16_IMAGE_MPP, "cpu", tmp_path) == made
    assert made.stat().st_mtime_ns == stamp  # reused, not made again
    refused = gpu.fp16_variant(made, gpu.FP16_IMAGE, gpu.FP16_IMAGE_MPP, "cpu", tmp_path / "again")
    assert isinstance(refused, str) and "fp16 already" in refused
