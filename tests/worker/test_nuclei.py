"""worker.nuclei: the one list of per-nucleus columns, and the table that holds them."""

from __future__ import annotations

import dataclasses

import numpy as np

from worker.nuclei import COLUMN_NAMES, COLUMNS, Nucleus, NucleusTable


def _table(n: int, start: float = 0.0) -> NucleusTable:
    nuclei = [
        Nucleus(label=i + 1, centroid=(start + i, 2.0 * i), bbox=(i, i, i + 2, i + 3), area=4 + i,
                contour=np.array([[0, 0], [1, 0], [1, 1]], np.float32) + i, type=i % 3,
                type_prob=0.5, np_prob=0.9, perimeter=8.0, solidity=0.8, eccentricity=0.3)
        for i in range(n)
    ]
    return NucleusTable.from_nuclei(nuclei, mpp=0.5, region=7)


def test_every_column_is_a_field_of_the_table_with_its_dtype_and_row_shape() -> None:
    fields = [f.name for f in dataclasses.fields(NucleusTable)]
    assert set(COLUMN_NAMES) <= set(fields)
    # Everything else is ragged or keyed, handled apart from the columns.
    assert set(fields) - set(COLUMN_NAMES) == {
        "vertices", "offsets", "measurements", "cell_vertices", "cell_offsets"}
    for table in (NucleusTable(), _table(3)):
        for column in COLUMNS:
            values = getattr(table, column.name)
            assert values.dtype == np.dtype(column.dtype), column.name
            assert values.shape[1:] == column.shape, column.name
            assert len(values) == len(table)


def test_only_shape_columns_are_qupath_measurements() -> None:
    assert [c.measurement for c in COLUMNS if c.measurement] == [
        "Area µm^2", "Perimeter µm", "Solidity", "Eccentricity"]


def test_take_and_concat_carry_every_column() -> None:
    a, b = _table(3), _table(2, start=100.0)
    both = NucleusTable.concat([a, b])
    picked = both.take(np.array([4, 0]))
    for name in COLUMN_NAMES:
        np.testing.assert_array_equal(getattr(both, name),
                                      np.concatenate([getattr(a, name), getattr(b, name)]))
        np.testing.assert_array_equal(getattr(picked, name), getattr(both, name)[[4, 0]])
    np.testing.assert_array_equal(picked.polygon(0), b.polygon(1))
