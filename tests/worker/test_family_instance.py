"""The ``instance`` family (panoptic Mask R-CNN contract) through the same stages as the others.

Its outputs are detections, which do not stitch, so a region runs as one patch and its detections
are pasted into the region's maps; seams are then settled by the nucleus centroids like any
family's. The model here is an oracle that detects the disks drawn on a synthetic slide exactly
(:mod:`tests._synthetic_instance`), so every difference from the drawn disks is the plumbing's.
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pytest

from tests._synthetic import write_tiff
from tests._synthetic_instance import build_instance_oracle, draw_disks, encode_disk_slide
from worker.infer import load_model
from worker.options import InferenceOptions
from worker.pipeline import run_slide

SHAPE = (520, 700)
MPP = 0.25


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    root = tmp_path_factory.mktemp("instance")
    disks, classes = draw_disks(SHAPE, 220, seed=5)
    slide = write_tiff(root / "slide.tif", encode_disk_slide(SHAPE, disks, classes), mpp=MPP)
    return build_instance_oracle(root / "oracle.onnx"), slide, disks, classes


def _run(scene, root: Path, **options) -> object:
    model, slide = scene[0], scene[1]
    return run_slide(slide, fs=fsspec.filesystem("file"), root=str(root),
                     options=InferenceOptions(model=model, tissue="none", **options))


def test_the_registry_serves_an_instance_model_one_patch_per_region(scene) -> None:
    model = load_model(scene[0])
    assert model.card.family == "instance" and model.runner.whole_box
    assert model.outputs == ("boxes", "scores", "classes", "masks")
    assert [spec.name for spec in model.map_specs] == ["instances", "classes", "scores"]
    assert model.bound is None  # detections have data-dependent shapes: never IO-bound


@pytest.mark.parametrize("workers", [0, 2])
def test_an_instance_model_finds_every_drawn_nucleus_once_with_its_class_across_seams(
        scene, tmp_path: Path, workers: int) -> None:
    _, _, disks, classes = scene
    result = _run(scene, tmp_path, region_size=128, workers=workers)
    assert len(result.plan.regions) > 9  # many seams are crossed
    # A disk centred on pixel (r, c) has its centroid at the pixel's centre (r + 0.5, c + 0.5).
    drawn = disks[:, :2] + 0.5
    found = result.table.centroid[:, ::-1]  # level-0 (x, y) → (row, col)
    assert len(found) == len(drawn)
    distance = np.linalg.norm(found[:, None, :] - drawn[None, :, :], axis=2)
    nearest = distance.argmin(axis=1)
    assert distance.min(axis=1).max() < 1e-6 and len(set(nearest.tolist())) == len(drawn)
    assert (result.table.type == classes[nearest]).all()
    # The pasted mask is the disk: its area is within one ring of pixels of pi r^2.
    radius = disks[nearest, 2]
    area = result.table.area_um2 / MPP**2
    assert (np.abs(area - np.pi * radius**2) <= 2 * np.pi * radius + 1).all()
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert counts["total"] == len(drawn)
    assert counts["classes"]["Alpha"] == int((classes == 1).sum())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["parameters"]["patches"]["inferred"] >= manifest["parameters"]["patches"][
        "covering_minimum"]


def test_instance_nuclei_do_not_depend_on_the_region_size(scene, tmp_path: Path) -> None:
    tables = {size: _run(scene, tmp_path / str(size), region_size=size).table for size in (64, 128, 256)}
    reference = tables[256]
    order = np.lexsort(reference.centroid.T)
    for size, table in tables.items():
        other = np.lexsort(table.centroid.T)
        assert len(table) == len(reference), size
        assert np.array_equal(table.centroid[other], reference.centroid[order]), size
        assert np.array_equal(table.type[other], reference.type[order]), size


def test_evaluation_pads_images_for_detectors_with_white_not_a_mirror(scene) -> None:
    # Disks cut by the image's bottom and right edges: a reflected border would show the detector
    # their mirror images (scoring higher here, being lower down), and pasting those would report
    # their halves inside the image as nuclei of their own.
    from worker.evaluation.model import predict_image_maps

    disks = np.array([[50, 50, 5], [195, 120, 6], [100, 296, 5]])
    image = encode_disk_slide((200, 300), disks, np.array([1, 2, 1]))
    maps = predict_image_maps(load_model(scene[0]), image, MPP)
    ids = maps.arrays["instances"]
    assert len(np.unique(ids)) - 1 == len(disks)
    assert ids[199, 120] > 0 and ids[100, 299] > 0  # the cut disks reach the edges


def test_a_detector_region_core_has_one_size_whatever_the_job_asks(scene, tmp_path: Path) -> None:
    # Proposals per network input are capped, so every region core of an instance model is
    # WHOLE_BOX_CORE square (whole tiles): a job's region size changes nothing.
    from worker.families import WHOLE_BOX_CORE
    from worker.infer import load_model as load
    from worker.stages import prepare

    blank = write_tiff(tmp_path / "blank.tif", np.full((2000, 2000, 3), 255, np.uint8), mpp=MPP)
    card = load(scene[0]).card
    plan = prepare(blank, card, InferenceOptions(model=scene[0], tissue="none", region_size=4096))
    sides = {max(r.core.height, r.core.width) for r in plan.regions}
    assert max(sides) == WHOLE_BOX_CORE and WHOLE_BOX_CORE % card.output_size == 0  # (less at the edge)
    assert len(plan.regions) == (-(-2000 // WHOLE_BOX_CORE)) ** 2
