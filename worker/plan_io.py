"""The stored plan: a :class:`~worker.job.SlidePlan` as ``plan.json`` plus ``plan.npz``.

The contract between the process that plans a job and those that run its regions, possibly other
hosts and other versions of this code, so it is a documented format rather than a pickle of
classes:

``plan.json`` — UTF-8 JSON object::

    format            "hoverserve.plan"
    version           1
    slide_path        the planner's path of the slide (a worker reads its own copy: plan.at())
    mpp_override      µm per level-0 pixel given by the job, or null
    slide             {name, format, shape [h, w], width, height, mpp, levels, properties, sha256}
    grid              {level, scale, level0_per_model, mpp, shape [h, w]}: the model grid
    area              [row0, col0, row1, col1]: the analysed box on the model grid
    regions           [[index, core row0, col0, row1, col1, maps row0, col0, row1, col1], ...]
    margin            network margin, model px
    tissue            {downsample, origin [row, col]} or null (no mask: everything is tissue)
    tissue_area_mm2   analysed tissue area
    thumbnail_downsample  level-0 px per thumbnail px
    stains            {source}: "macenko" or "default"; the vectors are arrays
    objects, cell_expansion_um, min_class_prob, plan_seconds   the job's choices, planning time

``plan.npz`` — NumPy arrays: ``thumbnail`` (h, w, 3) uint8, ``tissue_mask`` (h, w) bool when
``tissue`` is not null, ``hematoxylin``, ``eosin``, ``background`` (3,) float64.

Floats go through JSON exactly (shortest round-trip repr); a version this code does not know is
refused with :class:`PlanFormatError` rather than half-read.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from worker.errors import WorkerError
from worker.job import SlideIdentity, SlidePlan
from worker.plan import Box, Region
from worker.read import ModelGrid
from worker.stain import StainVectors
from worker.tissue import TissueMask

__all__ = ["FORMAT", "VERSION", "PlanFormatError", "dump_plan", "load_plan"]

FORMAT = "hoverserve.plan"
VERSION = 1


class PlanFormatError(WorkerError):
    """A stored plan this code cannot read (another format or version, or damaged)."""


def _box(box: Box) -> list[int]:
    return [box.row0, box.col0, box.row1, box.col1]


def dump_plan(plan: SlidePlan) -> tuple[bytes, bytes]:
    """``(plan.json, plan.npz)`` bytes of ``plan``."""
    grid = plan.grid
    record: dict[str, Any] = {
        "format": FORMAT, "version": VERSION,
        "slide_path": str(plan.slide_path), "mpp_override": plan.mpp_override,
        "slide": plan.slide.to_dict(),
        "grid": {"level": grid.level, "scale": grid.scale, "level0_per_model": grid.level0_per_model,
                 "mpp": grid.mpp, "shape": list(grid.shape)},
        "area": _box(plan.area),
        "regions": [[r.index, *_box(r.core), *_box(r.maps)] for r in plan.regions],
        "margin": plan.margin,
        "tissue": (None if plan.tissue is None else
                   {"downsample": plan.tissue.downsample, "origin": list(plan.tissue.origin)}),
        "tissue_area_mm2": plan.tissue_area_mm2,
        "thumbnail_downsample": plan.thumbnail_downsample,
        "stains": {"source": plan.stains.source},
        "objects": plan.objects, "cell_expansion_um": plan.cell_expansion_um,
        "min_class_prob": plan.min_class_prob, "plan_seconds": plan.plan_seconds,
    }
    arrays: dict[str, np.ndarray] = {"thumbnail": plan.thumbnail, "hematoxylin": plan.stains.hematoxylin,
              "eosin": plan.stains.eosin, "background": plan.stains.background}
    if plan.tissue is not None:
        arrays["tissue_mask"] = plan.tissue.mask
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]  # numpy types ** as a bool
    return json.dumps(record, ensure_ascii=False).encode(), buffer.getvalue()


def _stains(source: str, arrays: Any) -> StainVectors:
    # Built field by field: the constructor re-normalises the vectors, and a second
    # normalisation may move their last bit, so measurements would not repeat exactly.
    stains = object.__new__(StainVectors)
    for name in ("hematoxylin", "eosin", "background"):
        object.__setattr__(stains, name, np.array(arrays[name], np.float64))
    object.__setattr__(stains, "source", source)
    return stains


def load_plan(plan_json: bytes, plan_npz: bytes) -> SlidePlan:
    """The plan :func:`dump_plan` wrote (PlanFormatError for anything else)."""
    try:
        record = json.loads(plan_json)
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise PlanFormatError("not a HoVerServe plan")
        if record.get("version") != VERSION:
            raise PlanFormatError(f"plan version {record.get('version')!r} is not {VERSION}; "
                                  "plan the job again")
        with np.load(io.BytesIO(plan_npz), allow_pickle=False) as arrays:
            g = record["grid"]
            tissue = record["tissue"]
            mask = (None if tissue is None else
                    TissueMask(np.array(arrays["tissue_mask"], bool), float(tissue["downsample"]),
                               (int(tissue["origin"][0]), int(tissue["origin"][1]))))
            if record["stains"]["source"] not in ("macenko", "default"):
                raise PlanFormatError(f"unknown stain source {record['stains']['source']!r}")
            return SlidePlan(
                slide_path=Path(record["slide_path"]), mpp_override=record["mpp_override"],
                slide=SlideIdentity.from_dict(record["slide"]),
                grid=ModelGrid(level=int(g["level"]), scale=float(g["scale"]),
                               level0_per_model=float(g["level0_per_model"]), mpp=float(g["mpp"]),
                               shape=(int(g["shape"][0]), int(g["shape"][1]))),
                area=Box(*record["area"]),
                regions=tuple(Region(r[0], Box(*r[1:5]), Box(*r[5:9])) for r in record["regions"]),
                margin=int(record["margin"]), tissue=mask,
                tissue_area_mm2=float(record["tissue_area_mm2"]),
                thumbnail=np.array(arrays["thumbnail"], np.uint8),
                thumbnail_downsample=float(record["thumbnail_downsample"]),
                stains=_stains(record["stains"]["source"], arrays),
                objects=record["objects"], cell_expansion_um=float(record["cell_expansion_um"]),
                min_class_prob=record["min_class_prob"], plan_seconds=float(record["plan_seconds"]),
            )
    except PlanFormatError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise PlanFormatError(f"damaged plan: {type(exc).__name__}: {exc}") from exc
