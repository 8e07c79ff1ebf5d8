"""Scoring a model file on annotated images, through the same inference path as a slide job.

The oracle model (tests/_synthetic) decodes exact maps from the image colours, so on images
encoding known nuclei it must score (nearly) perfectly; anything less is lost in tiling, padding,
resampling or label bookkeeping.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import worker.evaluation.model as evaluate_module
from models.datasets import read_labelled
from tests._synthetic import CLASSES, build_oracle, draw_ellipses, encode_slide
from worker.evaluation.model import evaluate_model, sweep_postprocess

ROOT = Path(__file__).resolve().parents[3]
CLASS_NAMES = np.array([c.name for c in CLASSES])
SHAPES = [(200, 300), (256, 256), (150, 420)]  # not multiples of the oracle's 256-px tiles


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_oracle(tmp_path_factory.mktemp("oracle") / "oracle.onnx")


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    for seed, shape in enumerate(SHAPES):
        inst, classes = draw_ellipses(shape, 40, seed=seed)
        out.append((encode_slide(inst, classes), inst, classes[inst].astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CoNSeP-patch layout: one .npz holding every image (all of one size)."""
    path = tmp_path_factory.mktemp("stack") / "set.npz"
    scenes = []
    for seed in range(3):
        inst, classes = draw_ellipses((150, 260), 25, seed=10 + seed)
        scenes.append((encode_slide(inst, classes), inst, classes[inst].astype(np.uint8)))
    np.savez(
        path,
        images=np.stack([s[0] for s in scenes]),
        inst=np.stack([s[1] for s in scenes]),
        type_map=np.stack([s[2] for s in scenes]),
        names=np.array(["a_1", "a_2", "b_1"]),
        mpp=np.float32(0.25),
        class_names=CLASS_NAMES,
    )
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, scenes: list) -> Path:
    """MoNuSeg layout: labels.npz plus images/<name>.png (images of different sizes: one each)."""
    root = tmp_path_factory.mktemp("folder")
    (root / "images").mkdir()
    for i, (rgb, _, _) in enumerate(scenes):
        cv2.imwrite(str(root / "images" / f"img{i}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    # labels.npz stacks equal shapes only, so this folder holds the first scene alone
    np.savez(
        root / "labels.npz",
        inst=scenes[0][1][None],
        type_map=scenes[0][2][None],
        names=np.array(["img0"]),
        mpp=np.float32(0.25),
        class_names=CLASS_NAMES,
    )
    return root


def test_perfect_predictions_score_perfectly(oracle: Path, stack: Path) -> None:
    result = evaluate_model(oracle, stack)
    assert result["n_images"] == 3
    assert result["instance"]["per_image_mean"]["pq"] > 0.95
    assert result["detection"]["f1"] == 1.0
    assert all(c["f1"] == 1.0 for c in result["classes"].values())


def test_folder_and_single_image_layouts(oracle: Path, folder: Path, scenes: list, tmp_path: Path) -> None:
    assert [im.name for im in read_labelled(folder)] == ["img0"]
    assert evaluate_model(oracle, folder)["detection"]["f1"] == 1.0
    for i, (rgb, inst, types) in enumerate(scenes):  # CPM-15 layout: a folder of one-image .npz
        np.savez(tmp_path / f"cpm_{i}.npz", image=rgb, inst=inst, type_map=types, mpp=np.float32(0.25))
    result = evaluate_model(oracle, tmp_path)
    assert result["n_images"] == 3 and result["detection"]["f1"] == 1.0


def test_only_keeps_the_named_source_images(oracle: Path, stack: Path) -> None:
    assert evaluate_model(oracle, stack, only=["a_"])["n_images"] == 2
    with pytest.raises(ValueError, match="no images"):
        evaluate_model(oracle, stack, only=["zzz"])


def test_a_model_that_misses_everything_scores_zero(oracle: Path, tmp_path: Path, scenes: list) -> None:
    rgb, inst, types = scenes[0]
    blank = np.full_like(rgb, 255)  # decodes as background everywhere
    np.savez(tmp_path / "blank.npz", image=blank, inst=inst, type_map=types, mpp=np.float32(0.25))
    result = evaluate_model(oracle, tmp_path / "blank.npz")
    assert result["detection"]["f1"] == 0.0 and result["instance"]["per_image_mean"]["pq"] == 0.0


def test_data_without_resolution_needs_mpp(oracle: Path, tmp_path: Path, scenes: list) -> None:
    rgb, inst, _ = scenes[1]
    np.savez(tmp_path / "x.npz", image=rgb, inst=inst)
    with pytest.raises(ValueError, match="--mpp"):
        evaluate_model(oracle, tmp_path / "x.npz")
    assert evaluate_model(oracle, tmp_path / "x.npz", mpp=0.25)["detection"]["f1"] == 1.0


def test_mixed_resolutions_are_refused(oracle: Path, tmp_path: Path, scenes: list) -> None:
    for i, mpp in enumerate((0.25, 0.5)):
        np.savez(tmp_path / f"m{i}.npz", image=scenes[i][0], inst=scenes[i][1], mpp=np.float32(mpp))
    with pytest.raises(ValueError, match="several resolutions"):
        evaluate_model(oracle, tmp_path)


def test_a_threshold_sweep_runs_the_network_once_per_image(
    oracle: Path, stack: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = evaluate_module.predict_image_maps
    monkeypatch.setattr(evaluate_module, "predict_image_maps",
                        lambda *args: calls.append(1) or real(*args))
    settings = [{}, {"np_threshold": 0.95}, {"marker_threshold": 0.05}, {"upsample": 2}]
    card_default, strict_np, loose_marker, upsampled = sweep_postprocess(oracle, stack, settings)
    assert len(calls) == 3  # three images, four settings: one network run per image
    assert card_default["postprocess"] == evaluate_model(oracle, stack)["postprocess"]
    assert card_default["detection"] == evaluate_model(oracle, stack)["detection"]
    assert strict_np["postprocess"]["np_threshold"] == 0.95
    # The oracle's probabilities fall off at nucleus borders: a strict threshold loses nuclei,
    # markers at 0.05 cover everything and leave no seeds to split nuclei.
    assert strict_np["detection"]["f1"] < card_default["detection"]["f1"] == 1.0
    assert loose_marker["instance"]["per_image_mean"]["pq"] < 0.5
    # Segmented on a grid twice as fine, labels still come back at the image's own size.
    assert upsampled["postprocess"]["upsample"] == 2
    assert upsampled["detection"]["f1"] == 1.0
    assert upsampled["instance"]["per_image_mean"]["pq"] > 0.9
    with pytest.raises(ValueError, match="unknown post-processing"):
        sweep_postprocess(oracle, stack, [{"min_size": 3}])


def test_cli_sweeps_thresholds_into_one_table(oracle: Path, stack: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "model", "evaluate", str(oracle), str(stack),
         "--np-threshold", "0.5", "0.95", "--marker-threshold", "0.4", "0.5", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "marker" in run.stdout and "0.95" in run.stdout and "PQ" in run.stdout
    rows = json.loads(out.read_text())[str(stack)]
    assert [(r["postprocess"]["np_threshold"], r["postprocess"]["marker_threshold"]) for r in rows] == [
        (0.5, 0.4), (0.5, 0.5), (0.95, 0.4), (0.95, 0.5)]
    bad = subprocess.run(
        [sys.executable, "-m", "service.cli", "model", "evaluate", str(oracle), str(stack),
         "--np-threshold", "1.5"], capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert bad.returncode != 0 and "between 0 and 1" in bad.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "service.cli", "model", "evaluate", str(oracle), str(stack),
         "--upsample", "8"], capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert bad.returncode != 0 and "from 1 to 4" in bad.stderr


def test_cli_prints_and_writes_the_scores(oracle: Path, stack: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "model",
            "evaluate",
            str(oracle),
            str(stack),
            "--only",
            "a_",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "PQ" in run.stdout and "F_c" in run.stdout
    scores = json.loads(out.read_text())[str(stack)]
    assert scores["n_images"] == 2 and scores["detection"]["f1"] == 1.0


def test_cli_reports_a_bad_data_path(oracle: Path, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "model", "evaluate", str(oracle), str(tmp_path / "none.txt")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert run.returncode != 0
    assert "not a data set" in run.stderr
