"""Point-labelled data sets (a points.npz folder): reading their images, points and splits, and
matching their classes to a model's by name; :func:`_write_points` writes the synthetic scenes
the inference-path tests (tests/worker/evaluation/test_points.py) score."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage

from models.evaluate_points import class_map, is_point_dataset, read_points
from models.metrics import point_scores
from tests._synthetic import draw_ellipses, encode_slide


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


def test_a_point_data_set_reads_its_splits_in_file_order(tmp_path: Path) -> None:
    assert not is_point_dataset(tmp_path)
    n = _write_points(tmp_path, drop=2)
    assert is_point_dataset(tmp_path)
    images = list(read_points(tmp_path))
    assert [im.split for im in images] == ["train", "val", "train"]
    assert [im.name for im in read_points(tmp_path, split="val")] == ["scene_1"]
    val = images[1]
    assert val.image.shape == (240, 260, 3) and val.image.dtype == np.uint8 and val.mpp == 0.25
    assert val.xy.shape == (n, 2) and val.classes.shape == (n,)
    assert list(read_points(tmp_path, split="test")) == []


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
