"""The slide → nuclei pipeline: one entry point shared by the CLI and the queue workers.

Stages run overlapped: region reads and post-processing on a process pool, inference in this
process (ONNX Runtime uses its own threads, or the GPU), with bounded numbers of regions in
flight between them so memory stays bounded by the region size, never the slide size.
"""

from __future__ import annotations

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
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from models.card import ModelCard
from worker.infer import Device, Model, RegionMaps, load_model, predict_maps
from worker.merge import region_table, resolve_seams
from worker.nuclei import NucleusTable
from worker.plan import DEFAULT_HALO_UM, DEFAULT_REGION_SIZE, Box, Region, plan_regions
from worker.read import ModelGrid, model_grid, read_model_box

if TYPE_CHECKING:
    from worker.postprocess import PostprocessOptions
    from worker.slide import Slide

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

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
"""Default size of the read/post-process pool (processes)."""

TissueOption = Literal["auto", "none"] | Path


@dataclass(frozen=True)
class InferenceOptions:
    """What to run and how. Built once by the caller (CLI or queue task) and passed down."""

    model: Path
    mpp: float | None = None
    roi: tuple[int, int, int, int] | None = None
    region_size: int = DEFAULT_REGION_SIZE
    batch_size: int = 8
    workers: int = DEFAULT_WORKERS
    device: Device = "auto"
    tissue: TissueOption = "auto"
    halo_um: float = DEFAULT_HALO_UM

    def __post_init__(self) -> None:
        if self.mpp is not None and not 0.01 <= self.mpp <= 100:
            raise ValueError(f"mpp must be within 0.01..100 µm/px, got {self.mpp}")
        if self.roi is not None:
            x, y, w, h = self.roi
            if w <= 0 or h <= 0 or x < 0 or y < 0:
                raise ValueError(f"roi must be x,y,w,h with x,y >= 0 and w,h > 0, got {self.roi}")
        if self.region_size < 64:
            raise ValueError(f"region_size must be >= 64 model pixels, got {self.region_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.halo_um < 0:
            raise ValueError(f"halo_um must be >= 0, got {self.halo_um}")

    def parameters(self) -> dict[str, Any]:
        """JSON-ready record of the options, for the manifest."""
        return {
            "model": str(self.model), "mpp": self.mpp, "roi": list(self.roi) if self.roi else None,
            "region_size": self.region_size, "batch_size": self.batch_size,
            "workers": self.workers, "device": self.device, "tissue": str(self.tissue),
            "halo_um": self.halo_um,
        }


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

    def tissue_in(self, level0: Box) -> bool:
        """Whether any tissue lies in a level-0 box (always true without a mask)."""
        if self.tissue_mask is None:
            return True
        d = self.tissue_downsample
        h, w = self.tissue_mask.shape
        r0, c0 = max(0, math.floor(level0.row0 / d)), max(0, math.floor(level0.col0 / d))
        r1, c1 = min(h, math.ceil(level0.row1 / d)), min(w, math.ceil(level0.col1 / d))
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
    thumbnail: tuple[NDArray[np.uint8], float] | None = None,
) -> tuple[SlidePlan, float]:
    """Plan an open slide's regions; returns the plan and the analysed tissue area in mm².

    ``thumbnail`` (image, downsample), when the caller has one, spares a second thumbnail read.
    """
    from worker.tissue import TissueMask, detect_tissue, load_tissue_mask, tissue_mask_for

    grid = model_grid(slide, card.mpp)
    roi0 = _roi_box(options.roi, slide.shape)
    area = grid.from_level0(roi0)
    area = area.intersect(Box(0, 0, *grid.shape)) or area
    mask: TissueMask | None
    if options.tissue == "none":
        mask = None
    elif options.tissue == "auto":
        if thumbnail is None:
            mask = tissue_mask_for(slide)
        else:
            mask = TissueMask(detect_tissue(thumbnail[0]), thumbnail[1])
    else:
        mask = load_tissue_mask(Path(options.tissue), slide.shape)
    halo = math.ceil(options.halo_um / grid.mpp)
    plan_args: dict[str, Any] = {
        "slide_path": Path(slide.path), "mpp_override": options.mpp, "grid": grid, "area": area,
        "margin": card.margin, "slide_shape": tuple(slide.shape),
        "tissue_mask": None if mask is None else mask.mask,
        "tissue_downsample": 1.0 if mask is None else mask.downsample,
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
        tissue_mm2 = _mask_area_mm2(mask.mask, mask.downsample, roi0, slide.mpp)
    return plan, tissue_mm2


def _mask_area_mm2(mask: NDArray[np.bool_], downsample: float, roi0: Box, mpp: float) -> float:
    r0, c0 = math.floor(roi0.row0 / downsample), math.floor(roi0.col0 / downsample)
    r1, c1 = math.ceil(roi0.row1 / downsample), math.ceil(roi0.col1 / downsample)
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
    maps: RegionMaps, region: Region, plan: SlidePlan, postprocess: PostprocessOptions
) -> tuple[NucleusTable, float]:
    """Instances of one region's maps, reduced to those the region reports; and seconds spent."""
    from worker.postprocess import segment_maps

    start = time.perf_counter()
    if not maps.np_prob.any():
        return NucleusTable(), time.perf_counter() - start
    result = segment_maps(maps.np_prob, maps.hv, maps.types, mpp=plan.grid.mpp, options=postprocess)
    table = region_table(result.nuclei, region, plan.grid, area=plan.area, upsample=postprocess.upsample)
    return table, time.perf_counter() - start


def _postprocess_options(card: ModelCard) -> PostprocessOptions:
    from worker.postprocess import PostprocessOptions

    return PostprocessOptions.from_mapping(card.postprocess)


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
        size = h * w * (4 * 3 + (1 if typed else 0))
        self.shm = shared_memory.SharedMemory(create=True, size=max(size, 1))
        self.name = self.shm.name

    def maps(self) -> RegionMaps:
        return _maps_view(self.shm.buf, self.box, self.typed)

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


def postprocess_shared(
    name: str, box: Box, typed: bool, region: Region, plan: SlidePlan, postprocess: PostprocessOptions
) -> tuple[NucleusTable, float]:
    """:func:`postprocess_region` on maps living in the shared-memory block ``name``."""
    from multiprocessing import shared_memory

    # Pool processes are spawned from the creating process and share its resource tracker, so
    # attaching here registers nothing new; the creator alone unlinks the block.
    shm = shared_memory.SharedMemory(name=name)
    try:
        maps = _maps_view(shm.buf, box, typed)
        result = postprocess_region(maps, region, plan, postprocess)
        del maps
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
    postprocess = _postprocess_options(model.card)
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
            del image
            if block is None:
                posts.append(executor.submit(postprocess_region, maps, region, plan, postprocess))
            else:
                future = executor.submit(postprocess_shared, block.name, region.maps, model.typed,
                                         region, plan, postprocess)
                shared[future] = block
                posts.append(future)
            del maps
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

    from worker.slide import open_slide
    from worker.writers import file_sha256

    slide_path = Path(slide_path)
    with open_slide(slide_path, mpp=options.mpp) as slide:
        thumbnail, thumb_downsample = slide.thumbnail(max_side=2048)
        plan, tissue_mm2 = plan_slide(slide, card, options, thumbnail=(thumbnail, thumb_downsample))
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
    return PreparedSlide(plan, slide_info, thumbnail, thumb_downsample, tissue_mm2)


def process_region(plan: SlidePlan, region: Region, model: Model) -> NucleusTable:
    """Read, infer and post-process one region in this process (the queue workers' unit of work)."""
    image, _ = read_region(plan, region)
    maps = predict_maps(model, image, region.maps.grow(plan.margin), region.maps,
                        tile_wanted=plan.tile_wanted)
    table, _ = postprocess_region(maps, region, plan, _postprocess_options(model.card))
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
                    "pyramid_level": plan.grid.level},
        timings=timings, seed=prepared.slide_info.get("sha256") or prepared.slide_info["name"],
    )
    return table, outputs


def class_counts(table: NucleusTable, card: ModelCard) -> dict[str, int]:
    """Nuclei per class name (``Nucleus`` for an untyped model)."""
    if not card.typed:
        return {"Nucleus": len(table)}
    counts = table.counts(len(card.classes))
    return {c.name: int(counts[i]) for i, c in enumerate(card.classes) if i > 0}


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
