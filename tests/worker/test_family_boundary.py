"""A second model family through the same stages: a ``boundary`` (TSFD-Net contract) model runs on
a slide exactly like a hover one, through the family registry, with no pipeline change.

The model is an oracle that decodes the slide's pixels into exact semantic and boundary maps of
known ellipses, so every nucleus found can be checked against the one drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
from scipy import ndimage

from tests._synthetic import (
    build_boundary_oracle,
    draw_ellipses,
    encode_boundary_slide,
    write_tiff,
)
from worker.infer import load_model
from worker.options import InferenceOptions
from worker.pipeline import run_slide

SHAPE = (700, 900)
MPP = 0.25


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    root = tmp_path_factory.mktemp("boundary")
    inst, classes = draw_ellipses(SHAPE, 300, seed=11)
    slide = write_tiff(root / "slide.tif", encode_boundary_slide(inst, classes), mpp=MPP)
    return build_boundary_oracle(root / "oracle.onnx"), slide, inst, classes


def test_the_registry_serves_a_boundary_model(scene) -> None:
    model = load_model(scene[0])
    assert model.card.family == "boundary" and model.outputs == ("sem_prob", "boundary_prob")
    assert [spec.name for spec in model.map_specs] == ["sem_prob", "boundary_prob"]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_boundary_model_finds_every_drawn_nucleus_with_its_class_across_seams(
        scene, tmp_path: Path, workers: int) -> None:
    model, slide, inst, classes = scene
    options = InferenceOptions(model=model, region_size=256, workers=workers, tissue="none")
    result = run_slide(slide, fs=fsspec.filesystem("file"), root=str(tmp_path), options=options)
    assert len(result.plan.regions) > 4  # seams between regions are crossed
    # Level-0 coordinates put pixel (r, c)'s centre at (r + 0.5, c + 0.5).
    drawn = np.array(ndimage.center_of_mass(inst > 0, inst, range(1, int(inst.max()) + 1))) + 0.5
    found = result.table.centroid[:, ::-1]  # level-0 (x, y) → (row, col)
    assert len(found) == len(drawn)
    distance = np.linalg.norm(found[:, None, :] - drawn[None, :, :], axis=2)
    nearest = distance.argmin(axis=1)
    assert distance.min(axis=1).max() < 0.25  # the same nuclei, each found once
    assert len(set(nearest.tolist())) == len(drawn)
    # TSFD-Net gives a whole semantic nucleus (8-connected foreground piece) its majority class,
    # so touching nuclei of two classes share one: only lone nuclei keep their own for certain.
    pieces, _ = ndimage.label(inst > 0, structure=np.ones((3, 3)))
    labels_per_piece = np.bincount(np.unique(np.stack([pieces[inst > 0], inst[inst > 0]]), axis=1)[0])
    lone = labels_per_piece[pieces[tuple(np.round(drawn[nearest] - 0.5).astype(int).T)]] == 1
    assert lone.sum() > 0.8 * len(drawn)
    assert (result.table.type[lone] == classes[nearest + 1][lone]).all()
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert counts["total"] == len(drawn) and sum(counts["classes"].values()) == len(drawn)
    assert counts["classes"]["Alpha"] == int((result.table.type == 1).sum())
    assert (tmp_path / "nuclei.geojson.gz").is_file()
