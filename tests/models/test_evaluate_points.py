"""Point-labelled evaluation (``model evaluate`` on a points.npz folder): the oracle model on
synthetic scenes whose points sit at the true nucleus centres scores perfectly; wrong classes,
missing and displaced points cost exactly what eq. 8 and the 3 µm pairing say."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage

from models.evaluate_points import class_map, evaluate_points, is_point_dataset, read_points
from models.metrics import point_scores
from tests._synthetic import build_oracle, draw_ellipses, encode_slide


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_oracle(tmp_path_factory.mktemp("oracle") / "oracle.onnx")


def _write_points(folder: Path, *, flip_classes: bool = False, drop: int = 0) -> int:
    """Three scenes (two 'train', one 'val') with a point per nucleus; returns the val points."""
    (folder / "images").mkdir(parents=True)
    arrays: dict[str, np.ndarray] = {}
    names, splits, val_points = [], [], 0
    for k, split in enumerate(["train", "val", "train"]):
        inst, classes = draw_ellipses((240, 260), 14, seed=k)
        name = f"scene_{k}"
        cv2.imwrite(str(folder / "images" / f"{name}.png"), encode_slide(inst, classes)[..., ::-1])
        ids = np.arange(1, inst.max() + 1)
        rc = np.asarray(ndimage.center_of_mass(inst > 0, inst, ids))
        cls = classes[ids].astype(np.int8)
        if flip_classes:
            cls = (3 - cls).astype(np.int8)
        keep = slice(drop, None)
        arrays[f"{name}_xy"] = rc[keep, ::-1].astype(np.float32)
        arrays[f"{name}_cls"] = cls[keep]
        names.append(name)
        splits.append(split)
        val_points += len(ids) - drop if split == "val" else 0
    np.savez(folder / "points.npz", names=np.array(names), split=np.array(splits), mpp=np.float32(0.25),
             class_names=np.array(["background", "alpha", "beta"]), **arrays)
    return val_points


def test_points_at_true_centres_score_perfectly(oracle: Path, tmp_path: Path) -> None:
    n = _write_points(tmp_path)
    assert is_point_dataset(tmp_path)
    result = evaluate_points(oracle, tmp_path, split="val")
    assert result["n_images"] == 1 and result["per_image"][0]["points"] == n
    assert result["detection"]["f1_d"] == 1.0
    assert result["classes"] == {"Alpha": {"f1": 1.0}, "Beta": {"f1": 1.0}}
    assert result["mean_f_c"] == 1.0
    assert evaluate_points(oracle, tmp_path)["n_images"] == 3  # no split: every image


def test_wrong_classes_score_zero_classification_not_detection(oracle: Path, tmp_path: Path) -> None:
    _write_points(tmp_path, flip_classes=True)
    result = evaluate_points(oracle, tmp_path, split="val")
    assert result["detection"]["f1_d"] == 1.0
    assert result["detection"]["type_accuracy"] == 0.0
    assert result["mean_f_c"] == 0.0


def test_nuclei_without_points_count_as_false_positives(oracle: Path, tmp_path: Path) -> None:
    n = _write_points(tmp_path, drop=3)
    det = evaluate_points(oracle, tmp_path, split="val")["detection"]
    assert det["recall"] == 1.0
    assert det["precision"] == pytest.approx(n / (n + 3))


def test_split_must_exist(oracle: Path, tmp_path: Path) -> None:
    _write_points(tmp_path)
    with pytest.raises(ValueError, match="no images"):
        evaluate_points(oracle, tmp_path, split="test")
    assert [im.split for im in read_points(tmp_path)] == ["train", "val", "train"]


def test_point_classes_map_to_model_classes_by_name_and_alias() -> None:
    consep = ["background", "other", "inflammatory", "epithelial", "spindle"]
    assert class_map(["background", "lymphocyte", "tumour", "stromal"], consep) == {1: 2, 2: 3, 3: 4}
    assert class_map(["background", "Alpha", "mystery"], ["Background", "alpha"]) == {1: 1}


def test_point_pairing_keeps_pairs_within_the_radius() -> None:
    pred = np.array([[10.0, 10.0], [50.0, 50.0], [90.0, 10.0]])
    gt = np.array([[12.0, 10.0], [50.0, 57.0]])  # 2 px and 7 px away
    result = point_scores(pred, np.array([1, 2, 1]), gt, np.array([1, 1]), radius=6.0)
    assert (result.tp, result.fp, result.fn) == (1, 2, 1)
    assert result.type_accuracy == 1.0
    # class 1: TP 1; unpaired predictions of class 1: 1 (FP_d); unpaired GT of class 1: 1 (FN_d)
    assert result.per_class[1] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    with pytest.raises(ValueError, match="both given"):
        point_scores(pred, None, gt, np.array([1, 1]), radius=6.0)
