"""The three stages of every job: ``prepare`` → ``process_region`` (each region) → ``finish``.

Every driver runs exactly these: the CLI's local run (:func:`worker.pipeline.run_slide`, regions
overlapped on a pool), the embedded queue and the RQ workers (``service.queue.tasks``, regions as
separate tasks, possibly on other hosts, with the plan stored between them by
:mod:`worker.plan_io`). The values between the stages are in :mod:`worker.job`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from models.card import ModelCard
from worker.job import JobOutputs, RegionResult, SlideIdentity, SlidePlan, Timings
from worker.merge import resolve_seams
from worker.nuclei import NucleusTable
from worker.options import InferenceOptions
from worker.plan import Box, plan_regions, tile_boxes
from worker.read import model_grid
from worker.regions import process_region
from worker.stain import StainVectors

if TYPE_CHECKING:
    from worker.slide import Overview, Slide
    from worker.tissue import TissueMask

__all__ = ["class_counts", "covering_patches", "finish", "prepare", "process_region"]

logger = logging.getLogger(__name__)


def _roi_box(roi: tuple[int, int, int, int] | None, shape: tuple[int, int]) -> Box:
    full = Box(0, 0, shape[0], shape[1])
    if roi is None:
        return full
    x, y, w, h = roi
    box = Box(y, x, y + h, x + w).intersect(full)
    if box is None:
        raise ValueError(f"roi {roi} lies outside the slide (width {shape[1]}, height {shape[0]})")
    return box


def _tissue(slide: Slide, options: InferenceOptions, detail: Overview | None) -> TissueMask | None:
    from worker.tissue import load_tissue_mask, tissue_mask_for, tissue_mask_from

    if options.tissue == "none":
        return None
    if options.tissue == "auto":
        if detail is None:
            return tissue_mask_for(slide, roi=options.roi)
        return tissue_mask_from(detail.image, detail.downsample, detail.origin,
                                name=Path(slide.path).name)
    return load_tissue_mask(Path(options.tissue), slide.shape)


def _core_size(card: ModelCard, options: InferenceOptions, halo: int) -> int:
    """The region core side on the model grid.

    Post-processing holds a region's maps (core + halo) upsampled by the card's factor: a core
    whose upsampled maps are no larger than a plain region's keeps memory what region_size
    promises (rounded down to whole tiles, as the plan would otherwise round it up). A family
    that runs a region as one network input caps its side (``region_cap``).
    """
    from worker.families import runner_for

    tile = card.output_size
    cap = runner_for(card).region_cap(card)
    size = options.region_size if cap is None else min(options.region_size, max(tile, cap // tile * tile))
    factor = card.options.grid_scale
    if factor == 1:
        return size
    return max(tile, ((size + 2 * halo) // factor - 2 * halo) // tile * tile)


def _slide_stains(image: NDArray[np.uint8], mask: TissueMask | None) -> StainVectors:
    """The slide's stain vectors, estimated on the tissue of its planning overview ``image``
    (QuPath's H&E defaults when estimation fails)."""
    from worker.stain import estimate_stains

    pixels = None if mask is None else mask.mask
    if pixels is not None and pixels.shape != image.shape[:2]:
        pixels = None  # a mask at another scale (a mask file): estimate on the whole image instead
    stains = estimate_stains(image, pixels)
    record = stains.to_dict()
    logger.info("stain vectors (%s): hematoxylin %s, eosin %s, background %s", stains.source,
                record["hematoxylin"], record["eosin"], record["background"])
    return stains


def _identity(slide: Slide, path: Path, name: str | None) -> SlideIdentity:
    import fsspec

    from worker.writers import file_sha256

    return SlideIdentity(
        name=name or path.name, format=slide.format,
        shape=(int(slide.shape[0]), int(slide.shape[1])), mpp=float(slide.mpp),
        levels=len(slide.level_shapes), properties=dict(slide.properties),
        sha256=file_sha256(fsspec.filesystem("file"), str(path)) if path.is_file() else None,
    )


def prepare(slide_path: str | Path, card: ModelCard, options: InferenceOptions, *,
            name: str | None = None) -> SlidePlan:
    """Open a slide, find its tissue and stains, and plan its regions on the model's grid.

    ``name`` is the slide's name for display (default: the file's). Raises ``SlideError`` for
    slides that cannot be read, ``SlideTooLarge`` when the slide cannot be planned within the
    planning pixel budget, ValueError for an ROI outside the slide.
    """
    from worker.slide import open_slide, planning_overviews

    start = time.perf_counter()
    slide_path = Path(slide_path)
    with open_slide(slide_path, mpp=options.mpp) as slide:
        # Within the planning pixel budget: the whole slide from a low level, or the ROI alone.
        overview, detail = planning_overviews(slide, options.roi)
        grid = model_grid(slide, card.mpp)
        roi0 = _roi_box(options.roi, slide.shape)
        area = grid.from_level0(roi0)
        area = area.intersect(Box(0, 0, *grid.shape)) or area
        mask = _tissue(slide, options, detail)
        halo = math.ceil(options.halo_um / grid.mpp)

        def keep(core: Box) -> bool:
            return mask is None or mask.tissue_in(grid.to_level0(core))

        regions = plan_regions(area, tile=card.output_size, region_size=_core_size(card, options, halo),
                               halo=halo, keep=keep)
        tissue_mm2 = (roi0.area * (slide.mpp / 1000.0) ** 2 if mask is None
                      else mask.area_mm2_in(roi0, slide.mpp))
        stains = _slide_stains(overview.image if detail is None else detail.image, mask)
        plan = SlidePlan(
            slide_path=slide_path, mpp_override=options.mpp,
            slide=_identity(slide, slide_path, name), grid=grid, area=area,
            regions=tuple(regions), margin=card.margin, tissue=mask, tissue_area_mm2=tissue_mm2,
            thumbnail=overview.image, thumbnail_downsample=overview.downsample, stains=stains,
            objects=options.objects, cell_expansion_um=options.cell_expansion_um,
            min_class_prob=options.min_class_prob, plan_seconds=time.perf_counter() - start,
        )
    logger.info("slide %s: %d regions on the %dx%d model grid (%.4f µm/px, level %d)",
                slide_path.name, len(plan.regions), plan.grid.shape[1], plan.grid.shape[0],
                plan.grid.mpp, plan.grid.level)
    return plan


def class_counts(table: NucleusTable, card: ModelCard) -> dict[str, int]:
    """Nuclei per class name, then ``unclassified`` (type 0; every nucleus of an untyped model):
    the values add up to the table's length, as in ``counts.json``."""
    from worker.writers import UNCLASSIFIED_NAME

    counts = table.counts(max(len(card.classes), 1)) if card.typed else np.zeros(1, np.int64)
    named = {c.name: int(counts[i]) for i, c in enumerate(card.classes) if i > 0 and card.typed}
    return {**named, UNCLASSIFIED_NAME: len(table) - sum(named.values())}


def covering_patches(plan: SlidePlan, tile: int) -> int:
    """The fewest network patches that cover the plan's tissue: output tiles of the slide-wide
    grid over the analysed area whose input reaches tissue (what an inference that ran every
    patch once would run)."""
    area = plan.area
    aligned = Box(area.row0 // tile * tile, area.col0 // tile * tile,
                  -(-area.row1 // tile) * tile, -(-area.col1 // tile) * tile)
    return sum(1 for t in tile_boxes(aligned, tile=tile) if plan.tile_wanted(t))


def finish(
    plan: SlidePlan,
    results: Iterable[RegionResult],
    *,
    fs: Any,
    root: str,
    card: ModelCard,
    parameters: dict[str, Any],
    timings: Timings,
) -> JobOutputs:
    """Merge the regions' nuclei (settling seams) and write every output under ``root``.

    ``results`` are the regions' results in plan order; ``timings`` what the driver measured
    so far (merge and write are added here).
    """
    from worker.families import runner_for
    from worker.writers import write_all

    results = list(results)
    tables = [r.table for r in results]
    inferred, minimum = sum(r.patches for r in results), covering_patches(plan, card.output_size)
    start = time.perf_counter()
    runner = runner_for(card)  # the family says what a seam duplicate is
    table = resolve_seams(NucleusTable.concat(tables), plan.regions, plan.grid,
                          iou=runner.seam_iou, band=runner.seam_band)
    merged = time.perf_counter()
    timings = timings.with_(merge=merged - start)
    outputs = write_all(
        table, fs=fs, root=root, card=card, slide=plan.slide,
        thumbnail=plan.thumbnail, thumbnail_downsample=plan.thumbnail_downsample,
        tissue_area_mm2=plan.tissue_area_mm2,
        parameters={**parameters, "regions": len(plan.regions), "model_grid_mpp": plan.grid.mpp,
                    "pyramid_level": plan.grid.level, "stain_vectors": plan.stains.to_dict(),
                    "patches": {"inferred": inferred, "covering_minimum": minimum,
                                "ratio": round(inferred / minimum, 4) if minimum else None}},
        timings=timings.to_dict(),
    )
    timings = timings.with_(write=time.perf_counter() - merged)
    return JobOutputs(table, outputs, class_counts(table, card), timings)
