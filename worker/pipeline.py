"""The slide → nuclei pipeline: one entry point shared by the CLI and the queue workers.

Stages run overlapped: region reads and post-processing on a process pool, inference in this
process (ONNX Runtime uses its own threads, or the GPU), with bounded numbers of regions in
flight between them so memory stays bounded by the region size, never the slide size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from models.card import ModelCard
from worker.infer import Model, RegionMaps, load_model, predict_maps
from worker.merge import region_table, resolve_seams
from worker.nuclei import NucleusTable
from worker.options import DEFAULT_EXPANSION_UM, InferenceOptions, ObjectsOption
from worker.plan import Box, Region, plan_regions
from worker.read import ModelGrid, model_grid, read_model_box
from worker.stain import StainVectors

if TYPE_CHECKING:
    from models.families import HoverOptions
    from worker.slide import Overview, Slide

__all__ = [
    "InferenceOptions",
    "PreparedSlide",
    "RunResult",
    "SlidePlan",
    "class_counts",
    "exit_with_parent",
    "finalize",
    "plan_slide",
    "prepare_slide",
    "process_region",
    "run_slide",
]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class SlidePlan:
    """Everything needed to process a slide's regions: picklable, shared with worker processes."""

    slide_path: Path
    mpp_override: float | None
    grid: ModelGrid
    area: Box
    regions: tuple[Region, ...]
    margin: int
    tissue_mask: NDArray[np.bool_] | None
    tissue_downsample: float
    slide_shape: tuple[int, int]
    stains: StainVectors = field(default_factory=StainVectors.default)
    objects: ObjectsOption = "detections"
    cell_expansion_um: float = DEFAULT_EXPANSION_UM
    tissue_origin: tuple[int, int] = (0, 0)
    min_class_prob: float | None = None
    """The job's class-probability floor for classified nuclei (None: the card's)."""
    """Level-0 (row, col) of the mask's corner: the ROI's when only the ROI could be read."""

    def tissue_in(self, level0: Box) -> bool:
        """Whether any tissue lies in a level-0 box (always true without a mask)."""
        if self.tissue_mask is None:
            return True
        d = self.tissue_downsample
        h, w = self.tissue_mask.shape
        y, x = self.tissue_origin
        r0, c0 = max(0, math.floor((level0.row0 - y) / d)), max(0, math.floor((level0.col0 - x) / d))
        r1, c1 = min(h, math.ceil((level0.row1 - y) / d)), min(w, math.ceil((level0.col1 - x) / d))
        if r1 <= r0 or c1 <= c0:
            return False
        return bool(self.tissue_mask[r0:r1, c0:c1].any())

    def tile_wanted(self, tile: Box) -> bool:
        return self.tissue_in(self.grid.to_level0(tile.grow(self.margin)))


@dataclass
class RunResult:
    """What a run produced."""

    table: NucleusTable
    card: ModelCard
    plan: SlidePlan
    outputs: dict[str, str]
    timings: dict[str, float]
    tissue_area_mm2: float
    counts: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- planning


def _roi_box(roi: tuple[int, int, int, int] | None, shape: tuple[int, int]) -> Box:
    full = Box(0, 0, shape[0], shape[1])
    if roi is None:
        return full
    x, y, w, h = roi
    box = Box(y, x, y + h, x + w).intersect(full)
    if box is None:
        raise ValueError(f"roi {roi} lies outside the slide (width {shape[1]}, height {shape[0]})")
    return box


def plan_slide(
    slide: Slide,
    card: ModelCard,
    options: InferenceOptions,
    *,
    detail: Overview | None = None,
) -> tuple[SlidePlan, float]:
    """Plan an open slide's regions; returns the plan and the analysed tissue area in mm².

    ``detail``, the image to detect tissue on (from :func:`~worker.slide.planning_overviews`),
    when the caller has one, spares a second read. Raises ``SlideTooLarge`` when the slide
    cannot be planned within the planning pixel budget.
    """
    from worker.tissue import TissueMask, load_tissue_mask, tissue_mask_for, tissue_mask_from

    grid = model_grid(slide, card.mpp)
    roi0 = _roi_box(options.roi, slide.shape)
    area = grid.from_level0(roi0)
    area = area.intersect(Box(0, 0, *grid.shape)) or area
    mask: TissueMask | None
    if options.tissue == "none":
        mask = None
    elif options.tissue == "auto":
        if detail is None:
            mask = tissue_mask_for(slide, roi=options.roi)
        else:
            mask = tissue_mask_from(detail.image, detail.downsample, detail.origin,
                                    name=Path(slide.path).name)
    else:
        mask = load_tissue_mask(Path(options.tissue), slide.shape)
    halo = math.ceil(options.halo_um / grid.mpp)
    plan_args: dict[str, Any] = {
        "slide_path": Path(slide.path), "mpp_override": options.mpp, "grid": grid, "area": area,
        "margin": card.margin, "slide_shape": tuple(slide.shape),
        "tissue_mask": None if mask is None else mask.mask,
        "tissue_downsample": 1.0 if mask is None else mask.downsample,
        "objects": options.objects, "cell_expansion_um": options.cell_expansion_um,
        "tissue_origin": (0, 0) if mask is None else mask.origin,
        "min_class_prob": options.min_class_prob,
    }
    probe = SlidePlan(regions=(), **plan_args)
    # Post-processing holds a region's maps (core + halo) upsampled by the card's factor: a core
    # whose upsampled maps are no larger than a plain region's keeps memory what region_size
    # promises (rounded down to whole tiles, as the plan would otherwise round it up).
    factor = _postprocess_options(card).upsample
    core = options.region_size
    if factor > 1:
        tile = card.output_size
        core = max(tile, ((options.region_size + 2 * halo) // factor - 2 * halo) // tile * tile)
    regions = plan_regions(
        area, tile=card.output_size, region_size=core, halo=halo,
        keep=lambda core: probe.tissue_in(grid.to_level0(core)),
    )
    plan = SlidePlan(regions=tuple(regions), **plan_args)
    if mask is None:
        tissue_mm2 = roi0.area * (slide.mpp / 1000.0) ** 2
    else:
        tissue_mm2 = _mask_area_mm2(mask.mask, mask.downsample, roi0, slide.mpp, mask.origin)
    return plan, tissue_mm2


def _mask_area_mm2(mask: NDArray[np.bool_], downsample: float, roi0: Box, mpp: float,
                   origin: tuple[int, int] = (0, 0)) -> float:
    y, x = origin  # the mask's level-0 corner
    r0 = max(0, math.floor((roi0.row0 - y) / downsample))
    c0 = max(0, math.floor((roi0.col0 - x) / downsample))
    r1, c1 = math.ceil((roi0.row1 - y) / downsample), math.ceil((roi0.col1 - x) / downsample)
    pixels = int(mask[r0:r1, c0:c1].sum())
    return pixels * (downsample * mpp / 1000.0) ** 2


# --------------------------------------------------------------------------- per-region tasks

_SLIDES: dict[tuple[str, float | None], Any] = {}


def _open_cached(path: Path, mpp: float | None):
    """One open reader per process and slide: opening an SVS costs more than reading a tile."""
    from worker.slide import open_slide

    key = (str(path), mpp)
    if key not in _SLIDES:
        _close_cached()
        _SLIDES[key] = open_slide(path, mpp=mpp)
    return _SLIDES[key]


def _close_cached() -> None:
    while _SLIDES:
        _, slide = _SLIDES.popitem()
        slide.close()


def read_region(plan: SlidePlan, region: Region) -> tuple[NDArray[np.uint8], float]:
    """Pixels of the region's maps box grown by the network margin; and seconds spent."""
    start = time.perf_counter()
    slide = _open_cached(plan.slide_path, plan.mpp_override)
    image = read_model_box(slide, plan.grid, region.maps.grow(plan.margin))
    return image, time.perf_counter() - start


def postprocess_region(
    maps: RegionMaps, region: Region, plan: SlidePlan, postprocess: HoverOptions,
    rgb: NDArray[np.uint8] | None = None,
) -> tuple[NucleusTable, float]:
    """Instances of one region's maps, reduced to those the region reports, with their QuPath
    measurements (intensities from ``rgb``, the pixels of ``region.maps``); and seconds spent."""
    from worker.merge import reported
    from worker.postprocess import segment_maps

    start = time.perf_counter()
    if not maps.np_prob.any():
        return NucleusTable(), time.perf_counter() - start
    result = segment_maps(maps.np_prob, maps.hv, maps.types, mpp=plan.grid.mpp, options=postprocess)
    f = postprocess.upsample
    table = region_table(result.nuclei, region, plan.grid, area=plan.area, upsample=f)
    if len(table):
        keep = reported(result.nuclei, region, area=plan.area, upsample=f)
        labels = np.array([n.label for n, k in zip(result.nuclei, keep, strict=True) if k])
        table = _measure(table, result.labels, labels, rgb, region, plan, f, maps.types is not None)
    return table, time.perf_counter() - start


def _measure(table: NucleusTable, label_map: NDArray[np.int32], labels: NDArray[np.int64],
             rgb: NDArray[np.uint8] | None, region: Region, plan: SlidePlan, factor: int,
             typed: bool) -> NucleusTable:
    """QuPath measurements (and cells, when the plan asks) of one region's reported nuclei."""
    from worker.measure import measure_region

    grid = plan.grid
    fine_mpp = grid.mpp / factor
    return measure_region(
        table, label_map, labels, rgb, stains=plan.stains, factor=factor,
        # As region_table maps the fine grid: level-0 = scale·(p + origin·f + 0.5).
        to_level0=(grid.level0_per_model / factor, float(region.maps.col0 * factor),
                   float(region.maps.row0 * factor)),
        slide_mpp=grid.mpp / grid.level0_per_model, typed=typed,
        cell_expansion_px=plan.cell_expansion_um / fine_mpp if plan.objects == "cells" else None,
    )


def _postprocess_options(card: ModelCard, plan: SlidePlan | None = None) -> HoverOptions:
    """The card's post-processing, with the job's class-probability floor when it sets one."""
    from models.families import HoverOptions

    options = HoverOptions.from_mapping(card.postprocess)
    if plan is not None and plan.min_class_prob is not None:
        options = dataclasses.replace(options, min_class_prob=plan.min_class_prob)
    return options


# --------------------------------------------------------------------------- shared maps


class _SharedMaps:
    """Region maps in a shared-memory block, handed to a post-processing process by name.

    Pickling ~100 MB of maps through the pool's pipe would hold two extra copies in this process
    and one in the worker; shared memory holds exactly one.
    """

    def __init__(self, box: Box, typed: bool) -> None:
        from multiprocessing import shared_memory

        h, w = box.height, box.width
        self.box, self.typed = box, typed
        size = h * w * (4 * 3 + (1 if typed else 0) + 3)  # maps, then the region's RGB
        self.shm = shared_memory.SharedMemory(create=True, size=max(size, 1))
        self.name = self.shm.name

    def maps(self) -> RegionMaps:
        return _maps_view(self.shm.buf, self.box, self.typed)

    def rgb(self) -> NDArray[np.uint8]:
        return _rgb_view(self.shm.buf, self.box, self.typed)

    def release(self) -> None:
        self.shm.close()
        self.shm.unlink()


def _maps_view(buf: memoryview | None, box: Box, typed: bool) -> RegionMaps:
    if buf is None:
        raise ValueError("the shared-memory block is closed")
    h, w = box.height, box.width
    np_prob = np.ndarray((h, w), np.float32, buffer=buf, offset=0)
    hv = np.ndarray((2, h, w), np.float32, buffer=buf, offset=4 * h * w)
    types = np.ndarray((h, w), np.uint8, buffer=buf, offset=12 * h * w) if typed else None
    return RegionMaps(box, np_prob, hv, types)


def _rgb_view(buf: memoryview | None, box: Box, typed: bool) -> NDArray[np.uint8]:
    if buf is None:
        raise ValueError("the shared-memory block is closed")
    h, w = box.height, box.width
    return np.ndarray((h, w, 3), np.uint8, buffer=buf, offset=(13 if typed else 12) * h * w)


def _maps_pixels(image: NDArray[np.uint8], margin: int) -> NDArray[np.uint8]:
    """The pixels of a region's maps box, from its read grown by the network margin."""
    return image[margin:image.shape[0] - margin, margin:image.shape[1] - margin]


def postprocess_shared(
    name: str, box: Box, typed: bool, region: Region, plan: SlidePlan, postprocess: HoverOptions
) -> tuple[NucleusTable, float]:
    """:func:`postprocess_region` on maps living in the shared-memory block ``name``."""
    from multiprocessing import shared_memory

    # Pool processes are spawned from the creating process and share its resource tracker, so
    # attaching here registers nothing new; the creator alone unlinks the block.
    shm = shared_memory.SharedMemory(name=name)
    try:
        maps = _maps_view(shm.buf, box, typed)
        rgb = _rgb_view(shm.buf, box, typed)
        result = postprocess_region(maps, region, plan, postprocess, rgb)
        del maps, rgb
        return result
    finally:
        shm.close()


# --------------------------------------------------------------------------- orchestration


def exit_with_parent(interval: float = 1.0) -> None:
    """In a pool process: exit as soon as the process that started it is gone.

    A parent killed outright (SIGKILL, OOM) cannot shut its pool down; without this its children
    would be orphaned, some blocked forever on a pipe nobody will write to.
    """
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class _Executor:
    """A process pool, or direct calls when ``workers == 0`` (debugging, tiny inputs)."""

    def __init__(self, workers: int) -> None:
        self.pool = (
            ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                initializer=exit_with_parent)
            if workers > 0 else None
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # delivered to the caller through the future
            future.set_exception(exc)
        return future

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _iterate_regions(
    plan: SlidePlan, model: Model, executor: _Executor, *, prefetch: int, max_pending: int,
    timings: dict[str, float],
) -> Iterator[NucleusTable]:
    """Yield each region's table as post-processing finishes; reads run ``prefetch`` ahead."""
    postprocess = _postprocess_options(model.card, plan)
    reads: deque[tuple[Region, Future]] = deque()
    posts: deque[Future] = deque()
    todo = iter(plan.regions)

    def refill() -> None:
        while len(reads) < prefetch:
            region = next(todo, None)
            if region is None:
                return
            reads.append((region, executor.submit(read_region, plan, region)))

    shared: dict[Future, _SharedMaps] = {}

    def collect() -> NucleusTable:
        future = posts.popleft()
        try:
            table, seconds = future.result()
        finally:
            if future in shared:
                shared.pop(future).release()
        timings["postprocess"] += seconds
        return table

    refill()
    try:
        while reads:
            region, read = reads.popleft()
            image, seconds = read.result()
            timings["read"] += seconds
            refill()
            start = time.perf_counter()
            block = _SharedMaps(region.maps, model.typed) if executor.pool is not None else None
            maps = predict_maps(model, image, region.maps.grow(plan.margin), region.maps,
                                tile_wanted=plan.tile_wanted,
                                out=block.maps() if block is not None else None)
            timings["infer"] += time.perf_counter() - start
            pixels = _maps_pixels(image, plan.margin)
            if block is not None:
                block.rgb()[...] = pixels
            del image
            if block is None:
                posts.append(executor.submit(postprocess_region, maps, region, plan, postprocess,
                                             pixels))
            else:
                future = executor.submit(postprocess_shared, block.name, region.maps, model.typed,
                                         region, plan, postprocess)
                shared[future] = block
                posts.append(future)
            del maps, pixels
            while len(posts) > max_pending or (posts and posts[0].done()):
                yield collect()
        while posts:
            yield collect()
    finally:
        for block in shared.values():
            block.release()


@dataclass
class PreparedSlide:
    """A planned slide: the plan plus what the final writers need (thumbnail, tissue, identity)."""

    plan: SlidePlan
    slide_info: dict[str, Any]
    thumbnail: NDArray[np.uint8]
    thumbnail_downsample: float
    tissue_area_mm2: float


def prepare_slide(slide_path: str | Path, card: ModelCard, options: InferenceOptions) -> PreparedSlide:
    """Open a slide, find its tissue and plan its regions (raises SlideError for bad slides)."""
    import fsspec

    from worker.slide import open_slide, planning_overviews
    from worker.writers import file_sha256

    slide_path = Path(slide_path)
    with open_slide(slide_path, mpp=options.mpp) as slide:
        # Within the planning pixel budget: the whole slide from a low level, or the ROI alone.
        overview, detail = planning_overviews(slide, options.roi)
        plan, tissue_mm2 = plan_slide(slide, card, options, detail=detail)
        plan = dataclasses.replace(
            plan, stains=_slide_stains(overview.image if detail is None else detail.image, plan))
        slide_info = {
            "name": slide_path.name, "format": slide.format, "shape": list(slide.shape),
            "width": slide.shape[1], "height": slide.shape[0], "mpp": slide.mpp,
            "levels": len(slide.level_shapes), "properties": dict(slide.properties),
            "sha256": (file_sha256(fsspec.filesystem("file"), str(slide_path))
                       if slide_path.is_file() else None),
        }
    logger.info("slide %s: %d regions on the %dx%d model grid (%.4f µm/px, level %d)",
                slide_path.name, len(plan.regions), plan.grid.shape[1], plan.grid.shape[0],
                plan.grid.mpp, plan.grid.level)
    return PreparedSlide(plan, slide_info, overview.image, overview.downsample, tissue_mm2)


def _slide_stains(image: NDArray[np.uint8], plan: SlidePlan) -> StainVectors:
    """The slide's stain vectors, estimated on the tissue of its planning overview ``image``
    (QuPath's H&E defaults when estimation fails)."""
    from worker.stain import estimate_stains

    mask = plan.tissue_mask
    if mask is not None and mask.shape != image.shape[:2]:
        mask = None  # a mask at another scale (a mask file): estimate on the whole image instead
    stains = estimate_stains(image, mask)
    record = stains.to_dict()
    logger.info("stain vectors (%s): hematoxylin %s, eosin %s, background %s", stains.source,
                record["hematoxylin"], record["eosin"], record["background"])
    return stains


def process_region(plan: SlidePlan, region: Region, model: Model) -> NucleusTable:
    """Read, infer and post-process one region in this process (the queue workers' unit of work)."""
    image, _ = read_region(plan, region)
    maps = predict_maps(model, image, region.maps.grow(plan.margin), region.maps,
                        tile_wanted=plan.tile_wanted)
    table, _ = postprocess_region(maps, region, plan, _postprocess_options(model.card, plan),
                                  _maps_pixels(image, plan.margin))
    return table


def finalize(
    prepared: PreparedSlide,
    tables: list[NucleusTable],
    *,
    fs,
    root: str,
    card: ModelCard,
    parameters: dict[str, Any],
    timings: dict[str, float],
) -> tuple[NucleusTable, dict[str, str]]:
    """Merge region tables (settling seams) and write every output under ``root``."""
    from worker.writers import write_all

    plan = prepared.plan
    start = time.perf_counter()
    table = resolve_seams(NucleusTable.concat(tables), plan.regions, plan.grid)
    timings["merge"] = time.perf_counter() - start
    outputs = write_all(
        table, fs=fs, root=root, card=card, slide_info=prepared.slide_info,
        thumbnail=prepared.thumbnail, thumbnail_downsample=prepared.thumbnail_downsample,
        tissue_area_mm2=prepared.tissue_area_mm2,
        parameters={**parameters, "regions": len(plan.regions), "model_grid_mpp": plan.grid.mpp,
                    "pyramid_level": plan.grid.level, "stain_vectors": plan.stains.to_dict()},
        timings=timings, seed=prepared.slide_info.get("sha256") or prepared.slide_info["name"],
    )
    return table, outputs


def class_counts(table: NucleusTable, card: ModelCard) -> dict[str, int]:
    """Nuclei per class name, then ``unclassified`` (type 0; every nucleus of an untyped model):
    the values add up to the table's length, as in ``counts.json``."""
    from worker.writers import UNCLASSIFIED_NAME

    counts = table.counts(max(len(card.classes), 1)) if card.typed else np.zeros(1, np.int64)
    named = {c.name: int(counts[i]) for i, c in enumerate(card.classes) if i > 0 and card.typed}
    return {**named, UNCLASSIFIED_NAME: len(table) - sum(named.values())}


def run_slide(
    slide_path: str | Path,
    *,
    fs,
    root: str,
    options: InferenceOptions,
    on_region: Callable[[int, int, int], None] | None = None,
    on_plan: Callable[[SlidePlan], None] | None = None,
) -> RunResult:
    """Segment and classify every nucleus of a slide and write the outputs under ``root``.

    ``on_plan(plan)`` is called once the regions are known; ``on_region(done, total, nuclei)``
    after each region.
    """
    t0 = time.perf_counter()
    timings = {"load_model": 0.0, "plan": 0.0, "read": 0.0, "infer": 0.0, "postprocess": 0.0,
               "merge": 0.0, "write": 0.0}
    model = load_model(options.model, device=options.device, batch_size=options.batch_size)
    timings["load_model"] = time.perf_counter() - t0
    start = time.perf_counter()
    prepared = prepare_slide(slide_path, model.card, options)
    plan = prepared.plan
    timings["plan"] = time.perf_counter() - start
    if on_plan is not None:
        on_plan(plan)
    executor = _Executor(min(options.workers, max(1, len(plan.regions))))
    tables: list[NucleusTable] = []
    nuclei = 0
    start = time.perf_counter()
    try:
        for done, table in enumerate(
            # One region read ahead and one post-processing behind per pair of workers keeps
            # every stage busy while bounding the regions in memory to a handful.
            _iterate_regions(plan, model, executor, prefetch=max(1, options.workers // 2),
                             max_pending=max(1, options.workers // 2), timings=timings),
            start=1,
        ):
            tables.append(table)
            nuclei += len(table)
            if on_region is not None:
                on_region(done, len(plan.regions), nuclei)
    finally:
        executor.close()
        _close_cached()  # in-process runs (workers=0) opened the slide here
    timings["regions_wall"] = time.perf_counter() - start
    start = time.perf_counter()
    table, outputs = finalize(prepared, tables, fs=fs, root=root, card=model.card,
                              parameters=options.parameters(), timings=timings)
    timings["write"] = time.perf_counter() - start - timings["merge"]
    timings["total"] = time.perf_counter() - t0
    return RunResult(table, model.card, plan, outputs, timings, prepared.tissue_area_mm2,
                     class_counts(table, model.card))
