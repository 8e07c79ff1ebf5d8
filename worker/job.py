"""The values that flow between the stages of a job (see docs/architecture.md).

``prepare`` makes a :class:`SlidePlan` (slide identity, model grid, regions, tissue mask, stain
vectors, thumbnail, the job's choices); ``process_region`` turns one region of it into a
:class:`RegionResult`; ``finish`` merges the results and writes a :class:`JobOutputs`. All are
frozen: a driver that needs a variant (the plan pointed at a worker's local copy of the slide)
makes a new value with :meth:`SlidePlan.at`, never changes a stored one. The plan is stored by
:mod:`worker.plan_io` as JSON plus arrays.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from worker.nuclei import NucleusTable
from worker.options import DEFAULT_EXPANSION_UM, ObjectsOption
from worker.plan import Box, Region
from worker.read import ModelGrid
from worker.stain import StainVectors
from worker.tissue import TissueMask

__all__ = ["JobOutputs", "RegionResult", "SlideIdentity", "SlidePlan", "Timings"]


@dataclass(frozen=True)
class SlideIdentity:
    """What the manifest says of the slide: its name (the client's, for display), format,
    level-0 ``shape`` (height, width), µm per level-0 pixel, level count, the reader's properties
    and the file's SHA-256 (None for a slide that is not one local file)."""

    name: str
    format: str
    shape: tuple[int, int]
    mpp: float
    levels: int
    properties: dict[str, str] = field(default_factory=dict)
    sha256: str | None = None

    @property
    def seed(self) -> str:
        """The slide part of the run key nucleus ids derive from: its hash, else its name."""
        return self.sha256 or self.name

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (the manifest's ``slide``)."""
        return {"name": self.name, "format": self.format, "shape": list(self.shape),
                "width": self.shape[1], "height": self.shape[0], "mpp": self.mpp,
                "levels": self.levels, "properties": dict(self.properties), "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlideIdentity:
        return cls(name=str(data["name"]), format=str(data["format"]),
                   shape=(int(data["shape"][0]), int(data["shape"][1])), mpp=float(data["mpp"]),
                   levels=int(data["levels"]), properties=dict(data.get("properties") or {}),
                   sha256=data.get("sha256"))


_TIMING_FIELDS = ("load_model", "plan", "read", "infer", "postprocess", "regions_wall",
                  "regions_cpu", "merge", "write", "total")


@dataclass(frozen=True)
class Timings:
    """Seconds spent per stage; None where a driver did not measure it (a queue driver has no
    single ``regions_wall``; the local run has no ``regions_cpu``)."""

    load_model: float | None = None
    plan: float | None = None
    read: float | None = None
    infer: float | None = None
    postprocess: float | None = None
    regions_wall: float | None = None
    regions_cpu: float | None = None
    merge: float | None = None
    write: float | None = None
    total: float | None = None

    def with_(self, **seconds: float) -> Timings:
        """A copy with these stages set."""
        return dataclasses.replace(self, **seconds)

    def plus(self, **seconds: float) -> Timings:
        """A copy with these seconds added to the stages' (None counts as 0)."""
        return dataclasses.replace(
            self, **{k: (getattr(self, k) or 0.0) + v for k, v in seconds.items()})

    def to_dict(self) -> dict[str, float]:
        """The measured stages, in stage order (the manifest's ``timings``)."""
        return {k: float(v) for k in _TIMING_FIELDS if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class SlidePlan:
    """Everything needed to process a slide's regions and write its results.

    Picklable (worker processes receive it) and storable (:mod:`worker.plan_io`).
    """

    slide_path: Path
    mpp_override: float | None
    slide: SlideIdentity
    grid: ModelGrid
    area: Box
    regions: tuple[Region, ...]
    margin: int
    tissue: TissueMask | None
    tissue_area_mm2: float
    thumbnail: NDArray[np.uint8]
    thumbnail_downsample: float
    stains: StainVectors = field(default_factory=StainVectors.default)
    objects: ObjectsOption = "detections"
    cell_expansion_um: float = DEFAULT_EXPANSION_UM
    min_class_prob: float | None = None
    """The job's class-probability floor for classified nuclei (None: the card's)."""
    plan_seconds: float = 0.0

    def at(self, slide_path: Path) -> SlidePlan:
        """This plan reading the slide from ``slide_path`` (a worker's local copy)."""
        return dataclasses.replace(self, slide_path=Path(slide_path))

    def tissue_in(self, level0: Box) -> bool:
        """Whether any tissue lies in a level-0 box (always true without a mask)."""
        return self.tissue is None or self.tissue.tissue_in(level0)

    def tile_wanted(self, tile: Box) -> bool:
        """Whether the network runs on this output tile: it lies on the slide (a tile beyond
        its edge would see only padding) and its input reaches tissue."""
        if tile.intersect(Box(0, 0, *self.grid.shape)) is None:
            return False
        return self.tissue_in(self.grid.to_level0(tile.grow(self.margin)))

    def region(self, index: int) -> Region:
        """The region with this index (ValueError naming the range otherwise)."""
        for region in self.regions:
            if region.index == index:
                return region
        raise ValueError(f"the plan has no region {index} (0..{len(self.regions) - 1})")


@dataclass(frozen=True)
class RegionResult:
    """One region's reported nuclei and the seconds its stages took."""

    index: int
    table: NucleusTable
    read_s: float = 0.0
    infer_s: float = 0.0
    postprocess_s: float = 0.0
    patches: int = 0
    """Network patches inferred for this region (its halo's included)."""

    @property
    def seconds(self) -> float:
        return self.read_s + self.infer_s + self.postprocess_s


@dataclass(frozen=True)
class JobOutputs:
    """What ``finish`` wrote: the merged table, output name → path, counts per class name."""

    table: NucleusTable
    outputs: dict[str, str]
    counts: dict[str, int]
    timings: Timings
