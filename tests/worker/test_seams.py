"""Seams: every known nucleus is found exactly once, whatever the region size.

The slide encodes exact maps of known ellipses and the oracle model decodes them (tests/_synthetic),
so any loss or duplicate comes from the region plan, the halo or the merge.
"""

from __future__ import annotations

import cv2
import fsspec
import numpy as np
import pytest
import shapely

from tests._synthetic import build_oracle, draw_ellipses, encode_slide, write_tiff
from worker.nuclei import NucleusTable
from worker.pipeline import InferenceOptions, run_slide

SHAPE = (1100, 1300)
MPP = 0.25


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("seams")
    inst, classes = draw_ellipses(SHAPE, 450, seed=7)
    slide = write_tiff(root / "scene.tif", encode_slide(inst, classes), mpp=MPP)
    model = build_oracle(root / "oracle.onnx")
    known = []
    for label in range(1, inst.max() + 1):
        mask = (inst == label).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        ring = contours[0][:, 0, :].astype(np.float64) + 0.5
        ys, xs = np.nonzero(mask)
        known.append({"centroid": (xs.mean() + 0.5, ys.mean() + 0.5), "type": classes[label],
                      "polygon": shapely.Polygon(ring).buffer(0.5, join_style="mitre")})
    return {"root": root, "slide": slide, "model": model, "known": known, "inst": inst}


def _run(scene: dict, region_size: int, *, workers: int = 0) -> NucleusTable:
    options = InferenceOptions(model=scene["model"], region_size=region_size, workers=workers,
                               tissue="none", batch_size=4)
    out = scene["root"] / f"out-{region_size}-{workers}"
    result = run_slide(scene["slide"], fs=fsspec.filesystem("file"), root=str(out), options=options)
    return result.table


def _match(table: NucleusTable, known: list[dict]) -> tuple[np.ndarray, list[float]]:
    """For each known nucleus, how many reported nuclei match it (IoU >= 0.5); and the IoUs."""
    polys = [shapely.Polygon(table.polygon(i)).buffer(0) for i in range(len(table))]
    tree = shapely.STRtree(polys)
    hits = np.zeros(len(known), int)
    ious = []
    for k, nucleus in enumerate(known):
        for j in tree.query(nucleus["polygon"], predicate="intersects"):
            inter = polys[j].intersection(nucleus["polygon"]).area
            iou = inter / (polys[j].area + nucleus["polygon"].area - inter)
            if iou >= 0.5:
                hits[k] += 1
                ious.append(iou)
                assert table.type[j] == nucleus["type"], f"nucleus {k}: type {table.type[j]}"
    return hits, ious


def test_seams_cut_through_many_nuclei(scene: dict) -> None:
    # The test only means something if region borders (multiples of 256 model px) split nuclei.
    inst = scene["inst"]
    cut = set()
    for line in range(256, max(SHAPE), 256):
        if line < SHAPE[0]:
            cut |= set(np.unique(inst[line - 1][inst[line - 1] == inst[line]]).tolist()) - {0}
        if line < SHAPE[1]:
            cut |= set(np.unique(inst[:, line - 1][inst[:, line - 1] == inst[:, line]]).tolist()) - {0}
    assert len(cut) >= 40


@pytest.mark.parametrize("region_size", [256, 512])
def test_every_known_nucleus_found_exactly_once(scene: dict, region_size: int) -> None:
    table = _run(scene, region_size)
    hits, ious = _match(table, scene["known"])
    assert (hits == 0).sum() == 0, f"{(hits == 0).sum()} nuclei lost"
    assert (hits > 1).sum() == 0, f"{(hits > 1).sum()} nuclei duplicated"
    assert len(table) == len(scene["known"]), "reported nuclei that do not exist"
    assert np.median(ious) > 0.8


def test_two_region_sizes_agree(scene: dict) -> None:
    small, large = _run(scene, 256), _run(scene, 768)
    assert len(small) == len(large)
    order_s = np.lexsort(np.round(small.centroid.T, 1))
    order_l = np.lexsort(np.round(large.centroid.T, 1))
    np.testing.assert_allclose(small.centroid[order_s], large.centroid[order_l], atol=0.5)
    np.testing.assert_array_equal(small.type[order_s], large.type[order_l])


def test_process_pool_gives_the_same_nuclei(scene: dict) -> None:
    inline, pooled = _run(scene, 512), _run(scene, 512, workers=2)
    assert len(inline) == len(pooled)
    np.testing.assert_allclose(np.sort(inline.centroid[:, 0]), np.sort(pooled.centroid[:, 0]))
