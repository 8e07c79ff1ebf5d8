"""Cells: constrained expansion never overlaps a neighbour, stays within its distance, contains
its nucleus; outlines are pixel-edge polygons; cell measurements reach the table."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from scipy import ndimage

from worker.cells import expand_nuclei, trace_outlines
from worker.measure import measure_region
from worker.nuclei import NucleusTable
from worker.stain import StainVectors


def _nuclei() -> np.ndarray:
    """Three discs: two 4 px apart (their cells must meet and split the gap), one alone."""
    yy, xx = np.mgrid[0:80, 0:120]
    labels = np.zeros((80, 120), np.int32)
    labels[(yy - 30) ** 2 + (xx - 30) ** 2 <= 64] = 1   # x 22..38
    labels[(yy - 30) ** 2 + (xx - 51) ** 2 <= 81] = 2   # x 42..60: a 3-px gap to 1
    labels[(yy - 55) ** 2 + (xx - 95) ** 2 <= 36] = 3
    return labels


def _polygons(vertices: np.ndarray, offsets: np.ndarray) -> list[shapely.Polygon]:
    return [shapely.Polygon(vertices[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)]


def test_expansion_is_bounded_and_keeps_every_nucleus_pixel() -> None:
    nuclei = _nuclei()
    cells = expand_nuclei(nuclei, 5.0)
    assert (cells[nuclei > 0] == nuclei[nuclei > 0]).all()  # nucleus pixels keep their label
    for label in (1, 2, 3):
        distance = ndimage.distance_transform_edt(nuclei != label)
        assert distance[cells == label].max() <= 5.0
    # The lone nucleus grows the full distance all round: a disc of radius ~6 + 5.
    assert (cells == 3).sum() == pytest.approx(np.pi * 11**2, rel=0.08)
    assert expand_nuclei(nuclei, 0).tolist() == nuclei.tolist()
    with pytest.raises(ValueError, match="distance"):
        expand_nuclei(nuclei, -1)


def test_cell_outlines_never_overlap_and_contain_their_nucleus() -> None:
    nuclei = _nuclei()
    cells = expand_nuclei(nuclei, 5.0)
    wanted = np.array([1, 2, 3])
    cell_polys = _polygons(*trace_outlines(cells, wanted))
    nucleus_polys = _polygons(*trace_outlines(nuclei, wanted))
    for i, cell in enumerate(cell_polys):
        assert cell.is_valid
        assert cell.area == pytest.approx((cells == wanted[i]).sum())  # pixel edges: area = count
        assert cell.contains(nucleus_polys[i])
        for other in cell_polys[i + 1:]:
            assert cell.intersection(other).area == 0.0
    # The close pair's cells touch along the split of their gap; the lone one touches nobody.
    assert cell_polys[0].intersects(cell_polys[1])
    assert not cell_polys[2].intersects(cell_polys[0].union(cell_polys[1]))


def test_absent_labels_get_empty_rings() -> None:
    vertices, offsets = trace_outlines(_nuclei(), np.array([3, 9]))
    assert offsets[2] == offsets[1] > 0
    assert vertices.shape == (offsets[-1], 2)


def test_measure_region_adds_cells_and_their_measurements() -> None:
    nuclei = _nuclei()
    wanted = np.array([2, 3])
    rings, offsets = trace_outlines(nuclei, wanted)
    n = len(wanted)
    table = NucleusTable(
        centroid=np.zeros((n, 2)), bbox=np.zeros((n, 4)), area_um2=np.ones(n, np.float32),
        perimeter_um=np.ones(n, np.float32), solidity=np.ones(n, np.float32),
        eccentricity=np.zeros(n, np.float32), type=np.array([1, 0], np.int16),
        type_prob=np.array([0.8, 1.0], np.float32), np_prob=np.array([0.9, 0.7], np.float32),
        vertices=((rings + 0.5) * 2.0).astype(np.float32), offsets=offsets,
        region=np.zeros(n, np.int32),
    )
    rgb = np.full((80, 120, 3), 230, np.uint8)
    rgb[nuclei > 0] = (90, 60, 150)  # hematoxylin-dark nuclei on a pale background
    out = measure_region(table, nuclei, wanted, rgb, stains=StainVectors.default(), factor=1,
                         to_level0=(2.0, 0.0, 0.0), slide_mpp=0.25, typed=True,
                         cell_expansion_px=5.0)
    m = out.measurements
    assert out.has_cells and out.cell_offsets is not None and len(out.cell_offsets) == n + 1
    # Level-0 polygons at 2 px per label pixel and 0.25 µm/px: 0.25 µm² per label pixel.
    for i, label in enumerate(wanted):
        assert m["Nucleus: Area µm^2"][i] == pytest.approx((nuclei == label).sum() * 0.25)
        cell_px = (expand_nuclei(nuclei, 5.0) == label).sum()
        assert m["Cell: Area µm^2"][i] == pytest.approx(cell_px * 0.25)
        assert m["Nucleus/Cell area ratio"][i] == pytest.approx((nuclei == label).sum() / cell_px)
    assert (m["Nucleus: Hematoxylin OD mean"] > m["Cytoplasm: Hematoxylin OD mean"] + 0.2).all()
    assert m["Cell: Hematoxylin OD max"] == pytest.approx(m["Nucleus: Hematoxylin OD max"])
    assert m["Detection probability"].tolist() == pytest.approx([0.9, 0.7])
    # The unclassified nucleus has no class probability (NaN, which writers leave out).
    assert m["Class probability"][0] == pytest.approx(0.8) and np.isnan(m["Class probability"][1])
    # Rows taken and concatenated keep measurements and cells with them.
    both = NucleusTable.concat([out.take(np.array([1])), out.take(np.array([0]))])
    assert both.measurements["Cell: Area µm^2"].tolist() == m["Cell: Area µm^2"][::-1].tolist()
    np.testing.assert_array_equal(both.cell_polygon(0), out.cell_polygon(1))
    with pytest.raises(ValueError, match="with and without"):
        NucleusTable.concat([out, table])


def test_outlines_traced_together_equal_each_traced_alone() -> None:
    """The one-pass tracer gives, vertex for vertex, what tracing each cell's box alone gives
    (labels in pieces, wanted twice, absent or out of range included)."""
    from scipy import ndimage

    from worker.contours import pixel_edge_ring

    rng = np.random.default_rng(5)
    for trial in range(20):
        noise = ndimage.gaussian_filter(rng.random((90, 120)), 2.0)
        pieces, _ = ndimage.label(noise > np.quantile(noise, 0.6))
        labels = (pieces % 7).astype(np.int32)  # several pieces per label, some labels merged
        wanted = np.array([*rng.integers(0, 10, 8), 3, 3])
        vertices, offsets = trace_outlines(labels, wanted)
        boxes = ndimage.find_objects(labels, max_label=int(max(labels.max(), wanted.max())))
        for i, label in enumerate(wanted.tolist()):
            ring = vertices[offsets[i]:offsets[i + 1]]
            box = boxes[label - 1] if 0 < label <= len(boxes) else None
            if box is None:
                assert len(ring) == 0, (trial, label)
                continue
            alone = pixel_edge_ring(labels[box] == label).astype(np.float64)
            np.testing.assert_array_equal(ring, alone + (box[1].start, box[0].start))
