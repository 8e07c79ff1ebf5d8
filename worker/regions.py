"""One region's work: read its pixels, infer its maps, post-process them into its nuclei.

:func:`process_region` does all three in this process (what a queue task runs).
:func:`iterate_regions` is the local driver's overlapped version: reads and post-processing on a
process pool, inference in this process (ONNX Runtime uses its own threads, or the GPU), with
bounded numbers of regions in flight between them so memory stays bounded by the region size,
never the slide size. The maps a pool process post-processes travel in shared memory.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from models.card import ModelCard
from worker.families import MapSpec, job_options, runner_for
from worker.infer import Model, RegionMaps, predict_maps
from worker.job import RegionResult, SlidePlan
from worker.merge import region_table, reported
from worker.nuclei import NucleusTable
from worker.plan import Box, Region
from worker.read import read_model_box
from worker.tile_cache import TileCache, TileUsers

__all__ = ["Executor", "exit_with_parent", "iterate_regions", "postprocess_region", "process_region",
           "read_region"]

# --------------------------------------------------------------------------- reading

_SLIDES: dict[tuple[str, float | None], Any] = {}


def _open_cached(path: Path, mpp: float | None) -> Any:
    """One open reader per process and slide: opening an SVS costs more than reading a tile."""
    from worker.slide import open_slide

    key = (str(path), mpp)
    if key not in _SLIDES:
        close_cached()
        _SLIDES[key] = open_slide(path, mpp=mpp)
    return _SLIDES[key]


def close_cached() -> None:
    """Close the slide this process keeps open (in-process runs open it here)."""
    while _SLIDES:
        _, slide = _SLIDES.popitem()
        slide.close()


def read_region(plan: SlidePlan, region: Region) -> tuple[NDArray[np.uint8], float]:
    """Pixels of the region's maps box grown by the network margin; and seconds spent."""
    start = time.perf_counter()
    slide = _open_cached(plan.slide_path, plan.mpp_override)
    image = read_model_box(slide, plan.grid, region.maps.grow(plan.margin))
    return image, time.perf_counter() - start


def _maps_pixels(image: NDArray[np.uint8], margin: int) -> NDArray[np.uint8]:
    """The pixels of a region's maps box, from its read grown by the network margin."""
    return image[margin:image.shape[0] - margin, margin:image.shape[1] - margin]


# --------------------------------------------------------------------------- post-processing


def postprocess_region(
    maps: RegionMaps, region: Region, plan: SlidePlan, card: ModelCard, rgb: NDArray[np.uint8] | None,
    typed: bool,
) -> tuple[NucleusTable, float]:
    """Instances of one region's maps as the card's family segments them, reduced to those the
    region reports, with their QuPath measurements (intensities from ``rgb``, the pixels of
    ``region.maps``); and seconds spent."""
    start = time.perf_counter()
    runner = runner_for(card)
    if not runner.has_foreground(maps.arrays):
        return NucleusTable(), time.perf_counter() - start
    options = job_options(card, min_class_prob=plan.min_class_prob)
    result = runner.segment(maps.arrays, mpp=plan.grid.mpp, options=options, typed=typed)
    f = options.grid_scale
    table = region_table(result.nuclei, region, plan.grid, area=plan.area, upsample=f)
    if len(table):
        keep = reported(result.nuclei, region, area=plan.area, upsample=f)
        labels = np.array([n.label for n, k in zip(result.nuclei, keep, strict=True) if k])
        table = _measure(table, result.labels, labels, rgb, region, plan, f, typed)
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


def process_region(plan: SlidePlan, region: Region, model: Model, *,
                   tiles: tuple[TileCache, TileUsers] | None = None) -> RegionResult:
    """Read, infer and post-process one region in this process (a queue task's unit of work).

    ``tiles``: a cache of the tiles regions share and which those are; tiles found there are
    not run again, shared tiles run here are stored for the others."""
    image, read_s = read_region(plan, region)
    start = time.perf_counter()
    cache, users = tiles if tiles is not None else (None, None)
    maps = predict_maps(model, image, region.maps.grow(plan.margin), region.maps,
                        tile_wanted=plan.tile_wanted, cache=cache,
                        shared=users.shared if users is not None else None)
    infer_s = time.perf_counter() - start
    table, post_s = postprocess_region(maps, region, plan, model.card,
                                       _maps_pixels(image, plan.margin), model.typed)
    return RegionResult(region.index, table, read_s, infer_s, post_s, maps.patches)


# --------------------------------------------------------------------------- shared maps


class _SharedMaps:
    """Region maps and pixels in one shared-memory block, handed to a pool process by name.

    Pickling ~100 MB of maps through the pool's pipe would hold two extra copies in this process
    and one in the worker; shared memory holds exactly one.
    """

    def __init__(self, box: Box, specs: tuple[MapSpec, ...]) -> None:
        from multiprocessing import shared_memory

        self.box, self.specs = box, specs
        size = sum(spec.nbytes(box.height, box.width) for spec in specs) + 3 * box.height * box.width
        self.shm = shared_memory.SharedMemory(create=True, size=max(size, 1))
        self.name = self.shm.name

    def maps(self) -> RegionMaps:
        return _views(self.shm.buf, self.box, self.specs)[0]

    def rgb(self) -> NDArray[np.uint8]:
        return _views(self.shm.buf, self.box, self.specs)[1]

    def release(self) -> None:
        self.shm.close()
        self.shm.unlink()


def _views(buf: memoryview | None, box: Box, specs: tuple[MapSpec, ...]
           ) -> tuple[RegionMaps, NDArray[np.uint8]]:
    """The maps, in ``specs`` order, then the region's RGB, laid out one after the other."""
    if buf is None:
        raise ValueError("the shared-memory block is closed")
    h, w = box.height, box.width
    arrays: dict[str, NDArray] = {}
    offset = 0
    for spec in specs:
        arrays[spec.name] = np.ndarray(spec.shape(h, w), spec.dtype, buffer=buf, offset=offset)
        offset += spec.nbytes(h, w)
    return RegionMaps(box, arrays), np.ndarray((h, w, 3), np.uint8, buffer=buf, offset=offset)


def _postprocess_shared(name: str, box: Box, specs: tuple[MapSpec, ...], region: Region,
                        plan: SlidePlan, card: ModelCard, typed: bool) -> tuple[NucleusTable, float]:
    """:func:`postprocess_region` on maps living in the shared-memory block ``name``."""
    from multiprocessing import shared_memory

    # Pool processes are spawned from the creating process and share its resource tracker, so
    # attaching here registers nothing new; the creator alone unlinks the block.
    shm = shared_memory.SharedMemory(name=name)
    try:
        maps, rgb = _views(shm.buf, box, specs)
        result = postprocess_region(maps, region, plan, card, rgb, typed)
        del maps, rgb
        return result
    finally:
        shm.close()


# --------------------------------------------------------------------------- the overlapped loop


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


class Executor:
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


def iterate_regions(plan: SlidePlan, model: Model, executor: Executor, *, prefetch: int,
                    max_pending: int, cache: TileCache | None = None) -> Iterator[RegionResult]:
    """Yield each region's result, in plan order, as post-processing finishes; reads run
    ``prefetch`` ahead and at most ``max_pending`` post-processings wait.

    With a ``cache``, every tile is run once: a tile several regions need is stored when first
    run and read by the others, and dropped as soon as the last of them has its maps."""
    users = TileUsers.of(plan.regions, model.card.output_size) if cache is not None else None
    inferred: set[int] = set()
    reads: deque[tuple[Region, Future]] = deque()
    posts: deque[tuple[Region, float, float, int, Future]] = deque()
    todo = iter(plan.regions)
    shared: dict[Future, _SharedMaps] = {}

    def refill() -> None:
        while len(reads) < prefetch:
            region = next(todo, None)
            if region is None:
                return
            reads.append((region, executor.submit(read_region, plan, region)))

    def collect() -> RegionResult:
        region, read_s, infer_s, patches, future = posts.popleft()
        try:
            table, post_s = future.result()
        finally:
            if future in shared:
                shared.pop(future).release()
        return RegionResult(region.index, table, read_s, infer_s, post_s, patches)

    refill()
    try:
        while reads:
            region, read = reads.popleft()
            image, read_s = read.result()
            refill()
            start = time.perf_counter()
            block = _SharedMaps(region.maps, model.map_specs) if executor.pool is not None else None
            maps = predict_maps(model, image, region.maps.grow(plan.margin), region.maps,
                                tile_wanted=plan.tile_wanted,
                                out=block.maps() if block is not None else None, cache=cache,
                                shared=users.shared if users is not None else None)
            if cache is not None and users is not None:
                inferred.add(region.index)
                cache.discard(users.finished(region, inferred))
            infer_s = time.perf_counter() - start
            pixels = _maps_pixels(image, plan.margin)
            if block is not None:
                block.rgb()[...] = pixels
            del image
            if block is None:
                future = executor.submit(postprocess_region, maps, region, plan, model.card,
                                         pixels, model.typed)
            else:
                future = executor.submit(_postprocess_shared, block.name, region.maps,
                                         model.map_specs, region, plan, model.card, model.typed)
                shared[future] = block
            posts.append((region, read_s, infer_s, maps.patches, future))
            del maps, pixels
            while len(posts) > max_pending or (posts and posts[0][4].done()):
                yield collect()
        while posts:
            yield collect()
    finally:
        for block in shared.values():
            block.release()
