"""The local driver: one slide through the three stages in this process and its pool.

``hoverserve infer`` runs this; the queues run the same stages (:mod:`worker.stages`) as separate
tasks. Here the regions are overlapped (:func:`worker.regions.iterate_regions`): reads and
post-processing on a process pool, inference in this process.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fsspec

from models.card import ModelCard
from worker.infer import load_model
from worker.job import JobOutputs, RegionResult, SlidePlan, Timings
from worker.nuclei import NucleusTable
from worker.options import InferenceOptions
from worker.regions import Executor, close_cached, iterate_regions
from worker.stages import class_counts, finish, prepare
from worker.tile_cache import TileCache

__all__ = ["InferenceOptions", "RunResult", "class_counts", "run_slide"]


@dataclass(frozen=True)
class RunResult:
    """What a local run produced: the plan it followed and what ``finish`` wrote."""

    plan: SlidePlan
    card: ModelCard
    outputs: JobOutputs

    @property
    def table(self) -> NucleusTable:
        return self.outputs.table

    @property
    def counts(self) -> dict[str, int]:
        return self.outputs.counts

    @property
    def timings(self) -> dict[str, float]:
        return self.outputs.timings.to_dict()

    @property
    def tissue_area_mm2(self) -> float:
        return self.plan.tissue_area_mm2


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
    model = load_model(options.model, device=options.device, batch_size=options.batch_size,
                       trt_cache=options.trt_cache, trt_fp16=options.trt_fp16)
    loaded = time.perf_counter()
    plan = prepare(slide_path, model.card, options)
    timings = Timings(load_model=loaded - t0, plan=plan.plan_seconds)
    if on_plan is not None:
        on_plan(plan)
    executor = Executor(min(options.workers, max(1, len(plan.regions))))
    results: list[RegionResult] = []
    nuclei = 0
    start = time.perf_counter()
    # Tiles regions share wait on local disk for their last user: memory stays per region.
    scratch = tempfile.TemporaryDirectory(prefix="hoverserve-tiles-")
    try:
        cache = TileCache(fsspec.filesystem("file"), scratch.name)
        # One region read ahead and one post-processing behind per pair of workers keeps every
        # stage busy while bounding the regions in memory to a handful.
        ahead = max(1, options.workers // 2)
        for done, result in enumerate(
                iterate_regions(plan, model, executor, prefetch=ahead, max_pending=ahead,
                                cache=cache), start=1):
            results.append(result)
            nuclei += len(result.table)
            if on_region is not None:
                on_region(done, len(plan.regions), nuclei)
    finally:
        executor.close()
        close_cached()  # in-process runs (workers=0) opened the slide here
        scratch.cleanup()
    timings = timings.with_(
        regions_wall=time.perf_counter() - start,
        read=sum(r.read_s for r in results), infer=sum(r.infer_s for r in results),
        postprocess=sum(r.postprocess_s for r in results))
    outputs = finish(plan, results, fs=fs, root=root, card=model.card,
                     parameters=options.parameters(), timings=timings)
    outputs = dataclasses.replace(outputs, timings=outputs.timings.with_(total=time.perf_counter() - t0))
    return RunResult(plan, model.card, outputs)
