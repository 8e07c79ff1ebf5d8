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
from scipy.spatial import cKDTree

from tests._synthetic import build_oracle, draw_ellipses, encode_slide, oracle_card, write_tiff
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
    # The same oracle, its card asking for maps upsampled twice before segmentation.
    card = oracle_card().model_copy(update={"postprocess": {"upsample": 2}})
    fine_model = build_oracle(root / "oracle-upsample2.onnx", card)
    return {"root": root, "slide": slide, "model": model, "fine_model": fine_model, "known": known,
            "inst": inst}


def _run(scene: dict, region_size: int, *, workers: int = 0, model: str = "model") -> NucleusTable:
    options = InferenceOptions(model=scene[model], region_size=region_size, workers=workers,
                               tissue="none", batch_size=4)
    out = scene["root"] / f"out-{region_size}-{workers}-{model}"
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


def test_upsampled_post_processing_finds_every_nucleus_once_in_level0_place(scene: dict) -> None:
    fine, plain = _run(scene, 256, model="fine_model"), _run(scene, 512)
    hits, ious = _match(fine, scene["known"])
    assert (hits == 1).all(), f"{(hits == 0).sum()} lost, {(hits > 1).sum()} duplicated"
    assert len(fine) == len(scene["known"])
    assert np.median(ious) > 0.8
    # The finer grid moves no nucleus: each centroid sits by its model-grid twin, same area.
    distance, twin = cKDTree(plain.centroid).query(fine.centroid)
    assert distance.max() < 0.75 and len(set(twin.tolist())) == len(plain)
    np.testing.assert_allclose(fine.area_um2, plain.area_um2[twin], rtol=0.15)
