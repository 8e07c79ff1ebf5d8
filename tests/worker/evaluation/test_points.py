"""Point-labelled evaluation (``model evaluate`` on a points.npz folder) through the inference
path: the oracle model on synthetic scenes whose points sit at the true nucleus centres scores
perfectly; wrong classes, missing and displaced points cost exactly what eq. 8 and the 3 µm
pairing say."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.evaluate_points import is_point_dataset, read_points
from tests._synthetic import build_oracle
from tests.models.test_evaluate_points import _write_points
from worker.evaluation.points import evaluate_points


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_oracle(tmp_path_factory.mktemp("oracle") / "oracle.onnx")


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
