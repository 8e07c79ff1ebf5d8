"""Specification of models.evaluate: per-image and data-set aggregation, and label files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from models.evaluate import (
    evaluate_dataset,
    evaluate_files,
    evaluate_pair,
    radius_for_mpp,
)
from tests.models._cases import CLASSES, CONSEP, images, shifted_case


def test_radius_is_three_micrometres() -> None:
    assert radius_for_mpp(0.25) == 12.0
    assert radius_for_mpp(0.5) == 6.0
    with pytest.raises(ValueError, match="mpp"):
        radius_for_mpp(0.0)


def test_evaluate_pair_reports_every_metric() -> None:
    pred, gt = shifted_case()
    res = evaluate_pair(pred, gt, radius=12)
    assert res["dice"] == pytest.approx(0.6)
    assert res["aji"] == pytest.approx(9 / 21)
    assert res["aji_plus"] == pytest.approx(9 / 21)
    assert (res["dq"], res["sq"], res["pq"]) == pytest.approx((0.5, 0.6, 0.3))
    assert res["pq_counts"] == {"tp": 1, "fp": 1, "fn": 1, "iou_sum": pytest.approx(0.6)}
    assert (res["n_pred"], res["n_gt"]) == (2, 2)
    # Centroids: pred 2 (1, 2.5) vs GT 5 (1, 1.5): 1 px. Pred 7 (5, 0.5) vs GT 9 (4.5, 4.5):
    # 4.03 px, so the 12 px radius pairs both, a 3 px radius only the first.
    assert res["detection"]["tp"] == 2
    near = evaluate_pair(pred, gt, radius=3)["detection"]
    assert (near["tp"], near["fp"], near["fn"]) == (1, 1, 1)
    assert near["f1"] == pytest.approx(0.5)
    assert "type_accuracy" not in near


def test_evaluate_pair_with_classes() -> None:
    pred, gt = shifted_case()
    res = evaluate_pair(
        pred, gt, radius=3, pred_types={2: 1, 7: 2}, gt_types={5: 1, 9: 2}, class_names=CLASSES
    )
    det = res["detection"]
    assert det["type_accuracy"] == 1.0
    # a: TP 1 -> 1. b: FP_d 1 (pred 7), FN_d 1 (GT 9) -> 0 / 2 = 0.
    assert det["f1_per_class"] == {"a": 1.0, "b": 0.0}


def test_dataset_reports_per_image_mean_and_pooled() -> None:
    res = evaluate_dataset(images(), radius=12)
    inst = res["instance"]
    # Per image: PQ 1 and 0 (image 2 undefined, left out) -> 0.5.
    assert inst["per_image_mean"]["pq"] == pytest.approx(0.5)
    assert inst["per_image_mean"]["aji"] == pytest.approx(0.5)
    assert inst["n_undefined"] == 1
    # Pooled: TP 1, FN 3 -> DQ = 1 / (1 + 1.5) = 0.4, SQ 1. AJI: 9 / (9 + 3 · 4) = 9 / 21.
    assert (inst["pooled"]["tp"], inst["pooled"]["fp"], inst["pooled"]["fn"]) == (1, 0, 3)
    assert inst["pooled"]["pq"] == pytest.approx(0.4)
    assert inst["pooled"]["aji"] == pytest.approx(9 / 21)
    assert inst["pooled"]["dice"] == pytest.approx(18 / 30)
    assert res["detection"]["f1"] == pytest.approx(2 / 5)
    assert res["n_images"] == 3 and res["radius_px"] == 12.0
    assert res["classes"] == {} and res["mpq_plus"] is None
    assert res["per_image"][2]["pq"] is None and res["per_image"][2]["name"] == "2"
    json.dumps(res, allow_nan=False)  # JSON-ready: no NaN anywhere


def test_dataset_with_classes() -> None:
    """a: image 0 TP 1 -> PQ 1. b: image 1 FN 3 -> PQ 0. mPQ+ = 0.5.
    PanNuke: image 0 (a) 1, image 1 (b) 0 -> 0.5. Counts of a: GT [1, 0, 0], pred the same
    -> R² 1; b: GT [0, 3, 0] (mean 1, spread 6), pred 0 (residual 9) -> 1 - 9/6 = -0.5."""
    res = evaluate_dataset(images(), radius=12, class_names=CLASSES, image_names=["x", "y", "z"])
    a, b = res["classes"]["a"], res["classes"]["b"]
    assert (a["pq"], b["pq"]) == (1.0, 0.0)
    assert (a["f1"], b["f1"]) == (1.0, 0.0)
    assert (a["n_gt"], a["n_pred"], b["n_gt"], b["n_pred"]) == (1, 1, 3, 0)
    assert a["r2"] == 1.0 and b["r2"] == pytest.approx(-0.5)
    assert res["mpq_plus"] == pytest.approx(0.5)
    assert res["mpq_image_mean"] == pytest.approx(0.5)
    assert res["r2_mean"] == pytest.approx(0.25)
    assert res["detection"]["type_accuracy"] == 1.0
    assert [p["name"] for p in res["per_image"]] == ["x", "y", "z"]
    json.dumps(res, allow_nan=False)


def test_dataset_errors_name_the_image() -> None:
    pred, gt = shifted_case()
    with pytest.raises(ValueError, match="image 0: class_names given"):
        evaluate_dataset([(pred, None, gt, None)], radius=12, class_names=CLASSES)
    with pytest.raises(ValueError, match=r"image 0: pred shape \(6, 5\)"):
        evaluate_dataset([(pred[:, :5], None, gt, None)], radius=12)
    with pytest.raises(ValueError, match="at least one image"):
        evaluate_dataset([], radius=12)


# --------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def consep() -> dict[str, np.ndarray]:
    with np.load(CONSEP) as data:
        return {k: data[k][:4] if k in ("inst", "type_map", "names") else data[k]
                for k in ("inst", "type_map", "names", "mpp", "class_names")}


def test_files_with_types_scored_against_themselves(
    tmp_path: Path, consep: dict[str, np.ndarray]
) -> None:
    gt_path = tmp_path / "gt.npz"
    np.savez(
        gt_path,
        inst=consep["inst"],
        type_map=consep["type_map"],
        names=consep["names"],
        mpp=consep["mpp"],
        class_names=consep["class_names"],
    )
    pred_path = tmp_path / "pred.npz"
    np.savez(pred_path, inst=consep["inst"], type_map=consep["type_map"])
    res = evaluate_files(pred_path, gt_path)
    assert res["radius_px"] == 12.0 and res["radius_source"] == "gt file"
    assert res["instance"]["pooled"]["pq"] == 1.0
    assert list(res["classes"]) == ["other", "inflammatory", "epithelial", "spindle"]
    assert res["mpq_plus"] == 1.0
    assert res["per_image"][0]["name"] == "consep_test_1_000"
    assert res["pred_path"] == str(pred_path)


def test_files_resolution_sources(tmp_path: Path) -> None:
    pred, gt = shifted_case()
    np.savez(tmp_path / "gt.npz", inst=gt, mpp=0.5)
    np.savez(tmp_path / "pred.npz", inst=pred)
    res = evaluate_files(tmp_path / "pred.npz", tmp_path / "gt.npz")
    assert (res["radius_px"], res["mpp"], res["n_images"]) == (6.0, 0.5, 1)
    res = evaluate_files(tmp_path / "pred.npz", tmp_path / "gt.npz", mpp=1.0)
    assert (res["radius_px"], res["radius_source"]) == (3.0, "mpp")
    res = evaluate_files(tmp_path / "pred.npz", tmp_path / "gt.npz", radius=2.5, mpp=1.0)
    assert (res["radius_px"], res["radius_source"]) == (2.5, "radius")
    np.savez(tmp_path / "other.npz", inst=pred, mpp=0.25)
    with pytest.raises(ValueError, match="mpp"):
        evaluate_files(tmp_path / "other.npz", tmp_path / "gt.npz")


def test_files_png_and_tiff_label_images(tmp_path: Path) -> None:
    pred, gt = shifted_case()
    Image.fromarray(gt.astype(np.uint16)).save(tmp_path / "gt.png")
    tifffile.imwrite(tmp_path / "pred.tif", pred.astype(np.uint16))
    res = evaluate_files(tmp_path / "pred.tif", tmp_path / "gt.png")
    assert res["radius_source"] == "default" and res["radius_px"] == 12.0
    assert res["instance"]["pooled"]["pq"] == pytest.approx(0.3)
    tifffile.imwrite(tmp_path / "pred_f.tif", pred.astype(np.float32))  # integral floats pass
    res = evaluate_files(tmp_path / "pred_f.tif", tmp_path / "gt.png")
    assert res["instance"]["pooled"]["pq"] == pytest.approx(0.3)


def test_files_one_sided_types_are_evaluated_untyped(tmp_path: Path) -> None:
    pred, gt = shifted_case()
    np.savez(tmp_path / "gt.npz", inst=gt, type_map=(gt > 0).astype(np.uint8))
    np.savez(tmp_path / "pred.npz", inst=pred)
    res = evaluate_files(tmp_path / "pred.npz", tmp_path / "gt.npz", radius=12)
    assert res["classes"] == {} and "type_accuracy" not in res["detection"]


def test_files_without_class_names_get_numbered_classes(tmp_path: Path) -> None:
    pred, gt = shifted_case()
    types = np.where(gt == 9, 2, np.where(gt > 0, 1, 0)).astype(np.uint8)
    np.savez(tmp_path / "gt.npz", inst=gt, type_map=types)
    np.savez(tmp_path / "pred.npz", inst=pred, type_map=(pred > 0).astype(np.uint8))
    res = evaluate_files(tmp_path / "pred.npz", tmp_path / "gt.npz", radius=12)
    assert list(res["classes"]) == ["class_1", "class_2"]


@pytest.mark.parametrize(
    ("writer", "message"),
    [
        (lambda p: p.write_bytes(b"not a zip"), "cannot read as .npz"),
        (lambda p: np.savez(p, labels=np.zeros((4, 4), dtype=int)), "no 'inst' array"),
        (lambda p: np.savez(p, inst=np.zeros(4, dtype=int)), r"\(H, W\) or \(N, H, W\)"),
        (lambda p: np.savez(p, inst=np.full((4, 4), 0.5)), "non-integer"),
        (lambda p: np.savez(p, inst=np.zeros((4, 4), int), type_map=np.zeros((3, 3), int)),
         "'type_map' shape"),
        (lambda p: np.savez(p, inst=np.zeros((4, 4), int), mpp=-1.0), "'mpp' must be a positive"),
    ],
    ids=["not-zip", "no-inst", "1-d", "fractional", "type-map-shape", "negative-mpp"],
)
def test_bad_npz_files(tmp_path: Path, writer, message: str) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.npz"
    writer(bad)
    good = tmp_path / "good.npz"
    np.savez(good, inst=np.zeros((4, 4), dtype=np.int32))
    with pytest.raises(ValueError, match=message):
        evaluate_files(bad, good)


def test_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, inst=np.zeros((4, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="no such file"):
        evaluate_files(tmp_path / "missing.npz", good)
    (tmp_path / "labels.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        evaluate_files(tmp_path / "labels.csv", good)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="single-channel"):
        evaluate_files(tmp_path / "rgb.png", good)
    np.savez(tmp_path / "small.npz", inst=np.zeros((3, 4), dtype=np.int32))
    with pytest.raises(ValueError, match=r"\(1, 3, 4\).*\(1, 4, 4\)"):
        evaluate_files(tmp_path / "small.npz", good)
    with pytest.raises(ValueError, match="radius"):
        evaluate_files(good, good, radius=-1.0)
