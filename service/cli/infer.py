"""``hoverserve infer``: segment and classify the nuclei of one slide, here, without a server."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from service.cli import _args
from service.cli._errors import UsageError
from worker.options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EXPANSION_UM,
    DEFAULT_REGION_SIZE,
    DEFAULT_WORKERS,
    InferenceOptions,
    TissueOption,
)

__all__ = ["register"]


def _tissue(args: argparse.Namespace) -> TissueOption:
    if args.no_tissue_mask and args.tissue_mask:
        raise UsageError("--no-tissue-mask and --tissue-mask exclude each other")
    if args.no_tissue_mask:
        return "none"
    return Path(args.tissue_mask) if args.tissue_mask else "auto"


def _cmd_infer(args: argparse.Namespace) -> int:
    import fsspec
    from tqdm import tqdm

    from worker.pipeline import run_slide

    tissue = _tissue(args)
    slide = Path(args.slide)
    if not slide.exists():
        raise UsageError(f"slide not found: {slide}")
    options = InferenceOptions(
        model=_args.model_file(args.model, "--model"), mpp=args.mpp, roi=args.roi,
        region_size=args.region_size, batch_size=args.batch_size,
        workers=args.workers if args.workers is not None else DEFAULT_WORKERS,
        device=args.device, tissue=tissue, objects=args.objects, min_class_prob=args.min_class_prob,
        trt_cache=Path(args.trt_cache) if args.trt_cache else None, trt_fp16=args.trt_fp16,
    )
    out = args.out or f"{slide.stem}-nuclei"
    fs, root = fsspec.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    bar = tqdm(total=0, unit="region", desc=slide.name, disable=args.quiet, dynamic_ncols=True)

    def on_plan(plan: Any) -> None:
        bar.reset(total=len(plan.regions))

    def on_region(done: int, total: int, nuclei: int) -> None:
        bar.update(1)
        bar.set_postfix(nuclei=nuclei, refresh=False)

    start = time.perf_counter()
    try:
        result = run_slide(slide, fs=fs, root=root, options=options, on_plan=on_plan,
                           on_region=on_region)
    finally:
        bar.close()
    wall = time.perf_counter() - start
    if not args.quiet:
        _summary(result, f"{slide.name} → {out}", wall)
    return 0


def _summary(result: Any, title: str, wall: float) -> None:
    """The per-class counts and one line of what the run took."""
    from service.cli.tables import print_counts

    grid = result.plan.grid
    tissue_px = result.tissue_area_mm2 / (grid.mpp / 1000.0) ** 2 / (grid.level0_per_model ** 2)
    print_counts(title, result.counts, len(result.table),
                 f"model {result.card.name} · {len(result.plan.regions)} regions · "
                 f"tissue {result.tissue_area_mm2:.2f} mm² · wall {wall:.1f} s · "
                 f"{tissue_px / 1e6 / wall:.2f} tissue Mpx/s (level 0)")


def register(sub: _args.Subparsers) -> None:
    """Add ``infer`` to the ``hoverserve`` parser."""
    p = sub.add_parser("infer", help="segment and classify the nuclei of one slide")
    p.add_argument("slide", help="slide file (SVS, NDPI, MRXS, SCN, TIFF/OME-TIFF, DICOM, PNG/JPEG)")
    p.add_argument("--model", help="ONNX model file (default: the bundled model)")
    p.add_argument("--out", help="output directory or fsspec URL (default: ./<slide>-nuclei)")
    p.add_argument("--roi", type=_args.roi, help="x,y,w,h in level-0 pixels: analyse only this box")
    p.add_argument("--mpp", type=_args.mpp, help="µm per level-0 pixel (overrides metadata)")
    p.add_argument("--region-size", type=_args.region_size, default=DEFAULT_REGION_SIZE,
                   help=f"region core side in model pixels (default {DEFAULT_REGION_SIZE})")
    p.add_argument("--batch-size", type=_args.positive_int, default=DEFAULT_BATCH_SIZE,
                   help="patches per batch")
    p.add_argument("--workers", type=int, help="read/post-process processes (0 = in-process)")
    p.add_argument("--device", choices=_args.DEVICES, default="auto")
    p.add_argument("--trt-cache", metavar="DIR",
                   help="folder for TensorRT's engines, kept between runs (TensorRT builds them for "
                        "minutes otherwise, at every start)")
    p.add_argument("--trt-fp16", action="store_true",
                   help="let TensorRT use float16 kernels (always on for an fp16 model: `hoverserve "
                        "model fp16`)")
    p.add_argument("--no-tissue-mask", action="store_true", help="analyse background too")
    p.add_argument("--tissue-mask", help="PNG mask (non-zero = tissue) with the slide's aspect")
    p.add_argument("--objects", choices=_args.OBJECTS, default="detections",
                   help="QuPath objects: nuclei as detections (default), or cells with a boundary "
                        f"{DEFAULT_EXPANSION_UM:g} µm out from each nucleus, never overlapping a neighbour")
    p.add_argument("--min-class-prob", type=_args.probability, metavar="P",
                   help="report nuclei whose class probability is below P as unclassified "
                        "(default: the model card's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_cmd_infer)
