"""The family registry: how each model family's network outputs become nuclei.

A card's ``family`` (:mod:`models.families` holds the contract: output names, typed options)
selects one :class:`FamilyRunner` here. The runner says which per-pixel maps a region keeps
(:meth:`~FamilyRunner.map_specs`: names, leading shape, dtype — the pipeline allocates them, in
shared memory when a pool post-processes them), how one network patch fills them
(:meth:`~FamilyRunner.tile_maps`) and how the stitched maps become measured instances
(:meth:`~FamilyRunner.segment`). Dense families run patches on the slide-wide tile grid; a
family whose outputs do not stitch (``whole_box``: detections of a proposal-based model) runs
one patch per region, the region's whole input, and turns its outputs into the region's maps
(:meth:`~FamilyRunner.box_maps`). The pipeline, the evaluation through the inference path and
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
from models.families import BoundaryOptions, HoverOptions, InstanceOptions, contract
from worker.merge import DETECTOR_SEAM_BAND, DUPLICATE_IOU, SEAM_BAND
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
    whole_box: bool
    """One patch per region (the region's whole input) instead of the slide-wide tile grid."""

    seam_iou: float
    """Two nuclei of different regions overlapping more than this IoU are one (the merge)."""
    seam_band: float
    """How near a core edge (model pixels, see :func:`worker.merge.resolve_seams`) the merge
    looks for such duplicates."""

    def region_cap(self, card: ModelCard) -> int | None:
        """Largest region core side (model pixels) the family runs, whatever a job asks."""
        ...

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

    def box_maps(self, result: Mapping[str, NDArray], card: ModelCard, *,
                 wanted: NDArray[np.bool_]) -> dict[str, NDArray]:
        """A ``whole_box`` family's maps from the outputs of one patch: the maps box grown by
        the card's margin. ``wanted`` (rows, cols) tells which ``card.output_size`` tiles of the
        maps box are analysed (tissue, inside the slide): the maps are ``wanted``'s extent in
        pixels, and nothing is reported whose centre lies in a tile that is not wanted (as
        dense families never run those tiles)."""
        ...

    def has_foreground(self, maps: Mapping[str, NDArray]) -> bool:
        """Whether any pixel may belong to a nucleus (else segmentation is skipped)."""
        ...

    def segment(self, maps: Mapping[str, NDArray], *, mpp: float, options: Any,
                typed: bool) -> HoverInstances:
        """Measured instances of stitched maps made at ``mpp`` µm/px, as ``options`` ask."""
        ...


class _Tiled:
    """Dense families: maps come tile by tile (:meth:`tile_maps`), never from a whole box."""

    # Maps agree where regions overlap, so only near-copies close to a seam are duplicates.
    seam_iou = DUPLICATE_IOU
    seam_band = SEAM_BAND

    def region_cap(self, card: ModelCard) -> int | None:
        return None

    def box_maps(self, result: Mapping[str, NDArray], card: ModelCard, *,
                 wanted: NDArray[np.bool_]) -> dict[str, NDArray]:
        raise TypeError(f"the {getattr(self, 'name', '?')} family stitches tiles; it has no box maps")


def _required(card: ModelCard, available: Sequence[str]) -> None:
    missing = [name for name in contract(card.family).outputs if name not in available]
    if missing:
        raise ValueError(f"a {card.family} model must output {missing}; this one has "
                         f"{list(available)}")


class HoverRunner(_Tiled):
    """HoVer-Net family: nucleus probability, horizontal/vertical distances, optional types."""

    name = "hover"
    whole_box = False

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


class BoundaryRunner(_Tiled):
    """TSFD-Net family: semantic class probabilities (background first) and boundaries."""

    name = "boundary"
    whole_box = False


    def network_outputs(self, card: ModelCard, available: Sequence[str]) -> tuple[str, ...]:
        _required(card, available)
        return ("sem_prob", "boundary_prob")

    def map_specs(self, card: ModelCard, outputs: Sequence[str]) -> tuple[MapSpec, ...]:
        return (MapSpec("sem_prob", (card.label_channels,), np.dtype(np.float32)),
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


WHOLE_BOX_CORE = 256
"""Region core side (model pixels) of the instance family: the panoptic network's training patch."""


class InstanceRunner:
    """Panoptic (Mask R-CNN) family: scored boxes with box-relative masks, one image per run.

    Detections do not stitch, so each region runs as one patch (its maps box grown by the
    card's margin); the detections are pasted by score into the region's dense maps
    (``instances``, ``classes``, ``scores``: :func:`worker.instance.paste_detections`), whose
    nuclei the seams then settle like any family's."""

    name = "instance"
    whole_box = True
    # Two inputs may cut one nucleus differently: any shared area settles it, for nuclei up to a
    # whole nucleus away from the seam.
    seam_iou = 0.0
    seam_band = DETECTOR_SEAM_BAND

    def region_cap(self, card: ModelCard) -> int | None:
        # Every region core is this side (or less at the area's edge), so every network input is
        # the same size on the slide-wide tile grid whatever region size a job asks for, and a
        # nucleus's detection cannot depend on it. A detector's output depends on its whole
        # input, and larger inputs lost nuclei (the RPN keeps 2000 proposals per input; the
        # network trains on 256-px patches): CMU-1-Small-Region with cores of 256, 512 and 768
        # gave 2,754, 2,571 and 2,409 nuclei, 78-87 % identical. The input is the core, its
        # halo and the card's margin.
        return max(card.output_size, WHOLE_BOX_CORE // card.output_size * card.output_size)

    def network_outputs(self, card: ModelCard, available: Sequence[str]) -> tuple[str, ...]:
        _required(card, available)
        return contract("instance").outputs

    def map_specs(self, card: ModelCard, outputs: Sequence[str]) -> tuple[MapSpec, ...]:
        return (MapSpec("instances", (), np.dtype(np.int32)),
                MapSpec("classes", (), np.dtype(np.uint8)),
                MapSpec("scores", (), np.dtype(np.float32)))

    def typed(self, card: ModelCard, outputs: Sequence[str]) -> bool:
        return card.typed  # box-head classes are the card's

    def tile_maps(self, result: Mapping[str, NDArray[np.float32]], i: int) -> dict[str, NDArray]:
        raise TypeError("the instance family runs whole boxes; it has no tile maps")

    def box_maps(self, result: Mapping[str, NDArray], card: ModelCard, *,
                 wanted: NDArray[np.bool_]) -> dict[str, NDArray]:
        from worker.instance import instance_sizes, paste_detections

        options = card.options
        if not isinstance(options, InstanceOptions):
            raise TypeError(f"instance post-processing wants InstanceOptions, "
                            f"got {type(options).__name__}")
        tile, margin = card.output_size, card.margin
        boxes = np.asarray(result["boxes"], np.float32).reshape(-1, 4)
        # A detection belongs to the tile holding its box centre: outside the slide (the
        # reflected margin) or without tissue, nothing is reported, as for tiled families.
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2 - margin
        cell = np.floor(np.nan_to_num(centre, nan=-1.0) / tile).astype(np.int64)
        inside = ((cell >= 0) & (cell < np.array(wanted.shape[::-1]))).all(axis=1)
        keep = np.zeros(len(boxes), bool)
        keep[inside] = wanted[cell[inside, 1], cell[inside, 0]]
        pasted = paste_detections(
            boxes[keep], np.asarray(result["scores"])[keep], np.asarray(result["classes"])[keep],
            np.asarray(result["masks"])[keep], height=wanted.shape[0] * tile,
            width=wanted.shape[1] * tile, offset=(float(margin), float(margin)),
            score_threshold=options.score_threshold, mask_threshold=options.mask_threshold,
            min_unclaimed=options.min_unclaimed, min_size=instance_sizes(card.mpp).min_size)
        return {"instances": pasted.instances, "classes": pasted.classes, "scores": pasted.scores}

    def has_foreground(self, maps: Mapping[str, NDArray]) -> bool:
        return bool(maps["instances"].any())

    def segment(self, maps: Mapping[str, NDArray], *, mpp: float, options: Any,
                typed: bool) -> HoverInstances:
        from worker.instance import instance_nuclei

        if not isinstance(options, InstanceOptions):
            raise TypeError(f"instance post-processing wants InstanceOptions, "
                            f"got {type(options).__name__}")
        return instance_nuclei(maps, mpp=mpp, typed=typed)


RUNNERS: dict[str, FamilyRunner] = {"hover": HoverRunner(), "boundary": BoundaryRunner(),
                                    "instance": InstanceRunner()}
"""Family name → runner."""


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
