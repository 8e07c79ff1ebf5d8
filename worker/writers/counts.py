"""``counts.json``: nuclei per class, total, and densities per mm² of tissue.

Layout (every number finite, no nulls)::

    {"classes": {"Neoplastic": 120, "Inflammatory": 0, ...},  # every class of the card in
                                                             # order, background excluded
                                                             # (none if untyped)
     "unclassified": 3,        # nuclei in no class: type 0, or all of an untyped model's
     "total": 123,             # all nuclei of the table = classes + unclassified
     "tissue_area_mm2": 1.5,
     "density_per_mm2": {"Neoplastic": 80.0, ..., "unclassified": 2.0, "total": 82.0},
     "analysed_area_mm2": 2.0} # only when given

Densities are 0.0 when the tissue area is 0. Class counts sit under ``"classes"`` rather than at the
top level so that a class called ``total`` cannot collide with the totals.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np

from models.card import ClassInfo
from worker.nuclei import NucleusTable
from worker.writers._common import UNCLASSIFIED_NAME, ClassTable, join, prepare_root, write_json

__all__ = ["COUNTS_NAME", "count_nuclei", "write_counts"]

logger = logging.getLogger(__name__)

COUNTS_NAME = "counts.json"


def _area(value: float | None, name: str) -> float:
    if value is None or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite area >= 0 in mm², got {value!r}")
    return float(value)


def count_nuclei(
    table: NucleusTable,
    *,
    classes: Sequence[ClassInfo],
    tissue_area_mm2: float,
    analysed_area_mm2: float | None = None,
) -> dict[str, Any]:
    """The ``counts.json`` document (see the module docstring).

    Parameters
    ----------
    table : NucleusTable
    classes : sequence of ClassInfo
        The model card's classes (``classes[0]`` background; empty = untyped).
    tissue_area_mm2 : float
        Tissue area the densities are relative to, mm² (>= 0).
    analysed_area_mm2 : float, optional
        Area actually analysed (e.g. the planned regions), mm².

    Returns
    -------
    dict
    """
    tissue = _area(tissue_area_mm2, "tissue_area_mm2")
    class_table = ClassTable.from_classes(classes)
    index = class_table.type_index(table.type)
    per_type = np.bincount(index, minlength=len(class_table.by_type))
    counts = {c.name: int(per_type[t]) for t, c in class_table.counted}
    total = len(table)

    def density(n: int) -> float:
        return float(n / tissue) if tissue > 0 else 0.0

    unclassified = int(per_type[0])
    document: dict[str, Any] = {"classes": counts, UNCLASSIFIED_NAME: unclassified,
                                "total": total, "tissue_area_mm2": tissue}
    document["density_per_mm2"] = {**{k: density(v) for k, v in counts.items()},
                                   UNCLASSIFIED_NAME: density(unclassified),
                                   "total": density(total)}
    if analysed_area_mm2 is not None:
        document["analysed_area_mm2"] = _area(analysed_area_mm2, "analysed_area_mm2")
    return document


def write_counts(
    table: NucleusTable,
    *,
    fs: fsspec.AbstractFileSystem,
    root: str,
    classes: Sequence[ClassInfo],
    tissue_area_mm2: float,
    analysed_area_mm2: float | None = None,
) -> str:
    """Write ``counts.json`` under ``root`` (see :func:`count_nuclei`); returns its name."""
    document = count_nuclei(table, classes=classes, tissue_area_mm2=tissue_area_mm2,
                            analysed_area_mm2=analysed_area_mm2)
    prepare_root(fs, root)
    write_json(fs, join(root, COUNTS_NAME), document)
    logger.info("counts: %d nuclei, %s", document["total"], document["classes"])
    return COUNTS_NAME
