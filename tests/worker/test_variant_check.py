"""An fp16 variant is written only if it finds the nuclei its fp32 original finds, on a real image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.card import read_card
from worker.infer import load_model
from worker.variant_check import (
    VariantRejected,
    check_variant,
    compare_nuclei,
    reference_batch,
    write_fp16_variant,
)

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "models" / "zoo"
DEFAULT = ZOO / "hoverserve-conic-wide.onnx"
TNBC = ROOT / ".." / "shared" / "data" / "nuclei" / "tnbc"
TNBC_MPP = 0.25  # TNBC is scanned at 40× (its labels.npz says so too)


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    """A real 512² H&E tile with ~90 nuclei."""
    return np.asarray(Image.open(TNBC / "images" / "tnbc_01_1.png").convert("RGB"))


def _blobs(centres: list[tuple[int, int]], radius: int = 5, shape: tuple[int, int] = (64, 64),
           shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    for i, (r, c) in enumerate(centres, start=1):
        labels[(rows - r - shift[0]) ** 2 + (cols - c - shift[1]) ** 2 <= radius**2] = i
    return labels


def test_identical_label_maps_are_the_same_nuclei_whatever_their_ids() -> None:
    a = _blobs([(10, 10), (30, 40), (50, 20)])
    b = np.where(a > 0, a * 7 + 100, 0)  # other ids, same nuclei
    result = compare_nuclei(a, b, {1: 1, 2: 2, 3: 1}, {107: 1, 114: 2, 121: 2})
    assert (result.reference, result.candidate, result.matched, result.min_iou) == (3, 3, 3, 1.0)
    assert result.same()
    assert result.same_class == pytest.approx(2 / 3)


def test_a_shifted_nucleus_passes_or_fails_by_its_iou() -> None:
    a = _blobs([(20, 20)], radius=8)
    b = _blobs([(20, 20)], radius=8, shift=(0, 1))
    iou = ((a > 0) & (b > 0)).sum() / ((a > 0) | (b > 0)).sum()
    result = compare_nuclei(a, b)
    assert result.min_iou == pytest.approx(iou) and iou > 0.5
    assert result.same(iou_threshold=iou - 1e-6) and not result.same(iou_threshold=iou)
    assert result.same_class is None


def test_a_split_a_missing_and_an_extra_nucleus_are_not_the_same() -> None:
    a = _blobs([(20, 20), (40, 40)], radius=8)
    split = a.copy()
    split[(split == 1) & (np.arange(64)[None, :] >= 20)] = 3  # nucleus 1 cut in halves
    assert not compare_nuclei(a, split).same(0.0)
    missing = np.where(a == 2, 0, a)
    result = compare_nuclei(a, missing)
    assert (result.candidate, result.matched, result.min_iou) == (1, 1, 0.0)
    assert not result.same(0.0)
    extra = a.copy()
    extra[55:60, 5:10] = 9
    assert not compare_nuclei(a, extra).same(0.0)
    assert compare_nuclei(np.zeros((8, 8), np.int32), np.zeros((8, 8), np.int32)).same()


def test_the_reference_batch_is_the_patches_a_region_would_run(tissue: np.ndarray) -> None:
    model = load_model(DEFAULT, device="cpu")
    card = model.card
    batch = reference_batch(model, tissue, TNBC_MPP)
    # 512 px at 0.25 µm/px are 256 px at the model's 0.5: 2 × 2 tiles of 224 px.
    assert batch.shape == (4, 3, card.input_size, card.input_size)
    assert batch.dtype == np.float32 and batch.min() >= 0 and batch.max() <= 255
    assert len(reference_batch(model, tissue, TNBC_MPP, count=3)) == 3
    with pytest.raises(ValueError, match="uint8 RGB"):
        reference_batch(model, tissue[..., 0], TNBC_MPP)


@pytest.mark.slow
def test_the_fp16_default_model_finds_the_fp32_nuclei_and_is_written(tissue: np.ndarray,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "wide-fp16.onnx"
    check = write_fp16_variant(DEFAULT, out, tissue, TNBC_MPP)
    assert check.passed, check.summary()
    assert set(check.probabilities) == {"np_prob", "tp_prob"}
    assert max(check.differences[p] for p in check.probabilities) <= 1e-2
    assert check.nuclei.reference > 50 and check.nuclei.same(0.9)
    assert read_card(out).precision == "fp16"
    assert load_model(out, device="cpu").card.precision == "fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no partial file left


@pytest.mark.slow
def test_a_variant_that_fails_the_check_is_not_written(tissue: np.ndarray, tmp_path: Path) -> None:
    out = tmp_path / "wide-fp16.onnx"
    with pytest.raises(VariantRejected, match="not written: FAILED") as failure:
        write_fp16_variant(DEFAULT, out, tissue, TNBC_MPP, prob_tolerance=1e-6)
    assert "within 1e-06: no" in str(failure.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="overwrite"):
        write_fp16_variant(DEFAULT, DEFAULT, tissue, TNBC_MPP)


def test_an_image_without_nuclei_checks_nothing_and_is_refused(tmp_path: Path) -> None:
    blank = np.full((200, 200, 3), 245, np.uint8)  # bare glass
    with pytest.raises(VariantRejected, match="no nuclei on the check image"):
        write_fp16_variant(DEFAULT, tmp_path / "x.onnx", blank)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_another_model_is_not_the_same_nuclei(tissue: np.ndarray) -> None:
    wide = load_model(DEFAULT, device="cpu")
    other = load_model(ZOO / "hoverserve-conic-v2.onnx", device="cpu")
    check = check_variant(wide, other, tissue, TNBC_MPP)
    assert not check.passed
    assert not check.nuclei.same(0.9)
    assert "FAILED" in check.summary()
