"""The family registry: how each model family's network outputs become nuclei.

A card's ``family`` (:mod:`models.families` holds the contract: output names, typed options)
selects one :class:`FamilyRunner` here. The runner says which per-pixel maps a region keeps
(:meth:`~FamilyRunner.map_specs`: names, leading shape, dtype — the pipeline allocates them, in
shared memory when a pool post-processes them), how one network patch fills them
(:meth:`~FamilyRunner.tile_maps`) and how the stitched maps become measured instances
(:meth:`~FamilyRunner.segment`). The pipeline, the evaluation through the inference path and
training validation call only these, so a new family is a new runner registered in
:data:`RUNNERS`, and nothing else changes.

Instances are :class:`~worker.postprocess.HoverInstances` for every family (labels on a grid
``options.grid_scale`` times finer than the model's, and the nucleus records), so seams, writers
and counts treat all families alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from models.card import ModelCard
from models.families import BoundaryOptions, HoverOptions, contract
from worker.postprocess import HoverInstances

__all__ = [
    "RUNNERS",
    "FamilyRunner",
    "MapSpec",
    "job_options",
    "runner_for",
]


@dataclass(frozen=True, slots=True)
class MapSpec:
    """One stitched map of a region: ``lead + (height, width)`` values of ``dtype``."""

    name: str
    lead: tuple[int, ...]
    dtype: np.dtype[Any]

    def shape(self, height: int, width: int) -> tuple[int, ...]:
        return (*self.lead, height, width)

    def nbytes(self, height: int, width: int) -> int:
        return int(np.prod(self.shape(height, width), dtype=np.int64)) * self.dtype.itemsize


class FamilyRunner(Protocol):
    """What the pipeline needs to know of a family."""

    name: str

    def network_outputs(self, card: ModelCard, available: Sequence[str]) -> tuple[str, ...]:
        """The graph outputs to fetch (required ones missing → ValueError naming them)."""
        ...

    def map_specs(self, card: ModelCard, outputs: Sequence[str]) -> tuple[MapSpec, ...]:
        """The maps a region keeps, for a graph with these ``outputs``."""
        ...

    def typed(self, card: ModelCard, outputs: Sequence[str]) -> bool:
        """Whether nuclei get classes from a graph with these ``outputs``."""
        ...

    def tile_maps(self, result: Mapping[str, NDArray[np.float32]], i: int) -> dict[str, NDArray]:
        """Patch ``i`` of a batch ``result`` as tiles of each map (``(lead…, s, s)`` arrays)."""
        ...

    def has_foreground(self, maps: Mapping[str, NDArray]) -> bool:
        """Whether any pixel may belong to a nucleus (else segmentation is skipped)."""
        ...

    def segment(self, maps: Mapping[str, NDArray], *, mpp: float, options: Any,
                typed: bool) -> HoverInstances:
        """Measured instances of stitched maps made at ``mpp`` µm/px, as ``options`` ask."""
        ...


def _required(card: ModelCard, available: Sequence[str]) -> None:
    missing = [name for name in contract(card.family).outputs if name not in available]
    if missing:
        raise ValueError(f"a {card.family} model must output {missing}; this one has "
                         f"{list(available)}")


class HoverRunner:
    """HoVer-Net family: nucleus probability, horizontal/vertical distances, optional types."""

    name = "hover"

    def network_outputs(self, card: ModelCard, available: Sequence[str]) -> tuple[str, ...]:
        _required(card, available)
        return ("np_prob", "hv", *(("tp_prob",) if "tp_prob" in available else ()))

    def map_specs(self, card: ModelCard, outputs: Sequence[str]) -> tuple[MapSpec, ...]:
        specs = (MapSpec("np_prob", (), np.dtype(np.float32)),
                 MapSpec("hv", (2,), np.dtype(np.float32)))
        # The per-pixel class is all post-processing reads of tp_prob: one byte instead of C floats.
        return (*specs, MapSpec("types", (), np.dtype(np.uint8))) if "tp_prob" in outputs else specs

    def typed(self, card: ModelCard, outputs: Sequence[str]) -> bool:
        return "tp_prob" in outputs  # the optional type head

    def tile_maps(self, result: Mapping[str, NDArray[np.float32]], i: int) -> dict[str, NDArray]:
        tiles: dict[str, NDArray] = {"np_prob": result["np_prob"][i, 0], "hv": result["hv"][i]}
        if "tp_prob" in result:
            tiles["types"] = result["tp_prob"][i].argmax(axis=0)
        return tiles

    def has_foreground(self, maps: Mapping[str, NDArray]) -> bool:
        return bool(maps["np_prob"].any())

    def segment(self, maps: Mapping[str, NDArray], *, mpp: float, options: Any,
                typed: bool) -> HoverInstances:
        from worker.postprocess import segment_maps

        if not isinstance(options, HoverOptions):
            raise TypeError(f"hover post-processing wants HoverOptions, got {type(options).__name__}")
        types = maps.get("types") if typed else None
        return segment_maps(maps["np_prob"], maps["hv"], types, mpp=mpp, options=options)


class BoundaryRunner:
    """TSFD-Net family: semantic class probabilities (background first) and boundaries."""

    name = "boundary"

    def network_outputs(self, card: ModelCard, available: Sequence[str]) -> tuple[str, ...]:
        _required(card, available)
        return ("sem_prob", "boundary_prob")

    def map_specs(self, card: ModelCard, outputs: Sequence[str]) -> tuple[MapSpec, ...]:
        channels = max(2, len(card.classes))
        return (MapSpec("sem_prob", (channels,), np.dtype(np.float32)),
                MapSpec("boundary_prob", (), np.dtype(np.float32)))

    def typed(self, card: ModelCard, outputs: Sequence[str]) -> bool:
        return card.typed  # the semantic channels are the card's classes

    def tile_maps(self, result: Mapping[str, NDArray[np.float32]], i: int) -> dict[str, NDArray]:
        return {"sem_prob": result["sem_prob"][i], "boundary_prob": result["boundary_prob"][i, 0]}

    def has_foreground(self, maps: Mapping[str, NDArray]) -> bool:
        # Tiles never run stay zero everywhere, background included: nothing there either.
        return bool((maps["sem_prob"][1:] > 0).any())

    def segment(self, maps: Mapping[str, NDArray], *, mpp: float, options: Any,
                typed: bool) -> HoverInstances:
        from worker.boundary import boundary_instances

        if not isinstance(options, BoundaryOptions):
            raise TypeError(f"boundary post-processing wants BoundaryOptions, "
                            f"got {type(options).__name__}")
        return boundary_instances(maps["sem_prob"], maps["boundary_prob"], mpp=mpp,
                                  fg_threshold=options.fg_threshold,
                                  boundary_threshold=options.boundary_threshold, typed=typed)


RUNNERS: dict[str, FamilyRunner] = {"hover": HoverRunner(), "boundary": BoundaryRunner()}
"""Family name → runner. ``instance`` (panoptic) registers here when its model exists."""


def runner_for(card: ModelCard) -> FamilyRunner:
    """The runner of the card's family (ValueError for a family no runner serves yet)."""
    try:
        return RUNNERS[card.family]
    except KeyError:
        raise ValueError(f"model {card.name!r} is of family {card.family!r}, which this version "
                         f"cannot run (it runs: {', '.join(RUNNERS)})") from None


def job_options(card: ModelCard, *, min_class_prob: float | None = None) -> Any:
    """The card's post-processing with what a job may change in it (a class-probability floor,
    for families that classify by a vote)."""
    options = card.options
    if min_class_prob is not None and isinstance(options, HoverOptions):
        return dataclasses.replace(options, min_class_prob=min_class_prob)
    return options
