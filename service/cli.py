"""The ``hoverserve`` command line.

Each subcommand parses its arguments, builds the value objects the library takes, calls one
library function and renders the result. Library errors become a one-line message on stderr and
exit status 2; nothing else is printed on failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = ["main"]

# Spinning OpenMP threads starve everything else on small shared machines (training ran ~10x
# slower); this only takes effect if set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EXIT_USAGE = 2
"""Exit status for bad input (unreadable slide, bad option, missing model...)."""


def _roi(text: str) -> tuple[int, int, int, int]:
    parts = text.replace(" ", "").split(",")
    try:
        x, y, w, h = (int(float(p)) for p in parts)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--roi wants x,y,w,h in level-0 pixels, got {text!r}") from exc
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise argparse.ArgumentTypeError(f"--roi wants x,y >= 0 and w,h > 0, got {text!r}")
    return x, y, w, h


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc


def _positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _probability(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a threshold between 0 and 1, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _upsample_factor(text: str) -> int:
    from worker.postprocess import MAX_UPSAMPLE

    value = _positive_int(text)
    if value > MAX_UPSAMPLE:
        raise argparse.ArgumentTypeError(
            f"expected an upsampling factor from 1 to {MAX_UPSAMPLE}, got {text!r}")
    return value


def _postprocess_args(args: argparse.Namespace) -> dict[str, Any]:
    """The post-processing options given on the command line (``--np-threshold`` etc. are named
    after the card keys), None or empty where not given."""
    from models.families import HoverOptions

    return {key: getattr(args, key, None) for key in HoverOptions.KEYS}


class UsageError(Exception):
    """A problem with the command line the user can fix; printed without a traceback."""


# --------------------------------------------------------------------------- infer


def _resolve_model(name: str | None) -> Path:
    from models.zoo import ZOO_DIR, default_model

    if name is None:
        path = default_model()
        if path is None:
            raise UsageError(
                "no bundled default model in this build (models/zoo is empty); "
                "pass --model MODEL.onnx (e.g. one made by `hoverserve model import CKPT.tar`)"
            )
        return path
    path = Path(name)
    if not path.exists():  # a bundled model by file name or by name (`hoverserve model list`)
        for bundled in (ZOO_DIR / name, ZOO_DIR / f"{name}.onnx"):
            if bundled.is_file():
                return bundled
    if not path.is_file():
        raise UsageError(f"--model {name}: no such file")
    return path


def _cmd_infer(args: argparse.Namespace) -> int:
    import fsspec
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from worker.pipeline import InferenceOptions, run_slide

    if args.no_tissue_mask and args.tissue_mask:
        raise UsageError("--no-tissue-mask and --tissue-mask exclude each other")
    slide = Path(args.slide)
    if not slide.exists():
        raise UsageError(f"slide not found: {slide}")
    tissue: Literal["auto", "none"] | Path = (
        "none" if args.no_tissue_mask else (Path(args.tissue_mask) if args.tissue_mask else "auto"))
    options = InferenceOptions(
        model=_resolve_model(args.model), mpp=args.mpp, roi=args.roi,
        region_size=args.region_size, batch_size=args.batch_size,
        workers=args.workers if args.workers is not None else InferenceOptions.workers,
        device=args.device, tissue=tissue, objects=args.objects, min_class_prob=args.min_class_prob,
    )
    out = args.out or f"{slide.stem}-nuclei"
    fs, root = fsspec.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    bar = tqdm(total=0, unit="region", desc=slide.name, disable=args.quiet, dynamic_ncols=True)

    def on_plan(plan) -> None:
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
    tissue_px = result.tissue_area_mm2 / (result.plan.grid.mpp / 1000.0) ** 2 / (
        result.plan.grid.level0_per_model ** 2)
    console = Console(stderr=False)
    table = Table(title=f"{slide.name} → {out}", show_header=True)
    table.add_column("class")
    table.add_column("nuclei", justify="right")
    for name, count in result.counts.items():
        table.add_row(name, f"{count:,}")
    table.add_row("[bold]total[/bold]", f"[bold]{len(result.table):,}[/bold]")
    if not args.quiet:
        console.print(table)
        console.print(
            f"model {result.card.name} · {len(result.plan.regions)} regions · "
            f"tissue {result.tissue_area_mm2:.2f} mm² · wall {wall:.1f} s · "
            f"{tissue_px / 1e6 / wall:.2f} tissue Mpx/s (level 0)"
        )
    return 0


# --------------------------------------------------------------------------- export


def _cmd_export_qupath(args: argparse.Namespace) -> int:
    import fsspec

    from worker.writers import export_qupath

    source_fs, source = fsspec.url_to_fs(args.table)
    if not source_fs.exists(source):
        raise UsageError(f"nucleus table not found: {args.table}")
    fs, root = fsspec.url_to_fs(args.out)
    written = export_qupath(source_fs, source, fs=fs, root=root, objects=args.objects,
                            measurements=args.measurements)
    if not args.quiet:
        print(f"wrote {written.total:,} {args.objects} to {args.out}/{written.names[0]} "
              f"({len(written.entries)} entr{'y' if len(written.entries) == 1 else 'ies'})")
    return 0


# --------------------------------------------------------------------------- model


def _cmd_model_import(args: argparse.Namespace) -> int:
    from models.importer import import_to_onnx

    card = import_to_onnx(args.checkpoint, args.output, types=args.types, name=args.name,
                          trusted=args.trust_checkpoint)
    print(f"wrote {args.output}: {card.name} ({card.architecture}, "
          f"{len(card.classes)} classes, {card.input_size}→{card.output_size} px at {card.mpp} µm/px)")
    return 0


def _read_metrics(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--metrics {path}: {exc}") from exc
    if not isinstance(metrics, dict):
        raise UsageError(f"--metrics {path}: expected a JSON object")
    return metrics


def _cmd_model_set_postprocess(args: argparse.Namespace) -> int:
    from models.card import read_card, replace_card
    from models.families import HoverOptions

    source = _resolve_model(args.model)
    card = read_card(source)
    asked = {k: v for k, v in _postprocess_args(args).items() if v is not None}
    postprocess = {**card.postprocess, **asked}
    try:
        HoverOptions.from_mapping(postprocess)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    update: dict[str, Any] = {"postprocess": postprocess}
    metrics = _read_metrics(args.metrics)
    if metrics is not None:
        update["metrics"] = metrics
    replace_card(source, args.output, card.model_copy(update=update))
    print(f"wrote {args.output}: {card.name}, post-processing {json.dumps(postprocess)}")
    return 0


def _cmd_model_refit_types(args: argparse.Namespace) -> int:
    from models.train.refit import RefitOptions, refit_model

    source = _resolve_model(args.model)
    options = RefitOptions(
        points=tuple(Path(p) for p in args.points or ()), points_split=args.split,
        data_root=Path(args.data_root) if args.data_root else None,
        typed_sources=tuple(args.typed or ()), holdout=tuple(args.holdout or ()), l2=args.l2)
    updates: dict[str, Any] = {k: v for k, v in (("name", args.name), ("version", args.version),
                                                 ("description", args.description)) if v}
    metrics = _read_metrics(args.metrics)
    if metrics is not None:
        updates["metrics"] = metrics
    try:
        card = refit_model(source, args.output, options, card_updates=updates)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    print(f"wrote {args.output}: {card.name} (classes refit; segmentation unchanged)")
    return 0


def _reliability_rows(table: dict[str, Any]) -> list[list[str]]:
    return [[f"{row['from']:.1f}-{row['to']:.1f}", f"{row['n']:,}", f"{row['mean_probability']:.3f}",
             f"{row['share_right']:.3f}"] for row in table["bins"]]


def _cmd_model_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from models.calibration import Outcomes, class_outcomes, fit_calibration, reliability_table
    from models.card import read_card, replace_card
    from models.families import HoverOptions

    source = _resolve_model(args.model)
    outcomes = Outcomes.concat([class_outcomes(source, data, split=args.split, only=args.only or ())
                                for data in args.data])
    try:
        points = fit_calibration(outcomes.scores, outcomes.correct, bins=args.bins)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    options = HoverOptions(class_prob_calibration=points)
    after = np.array([options.class_probability(s) for s in outcomes.scores])
    header = ["score", "nuclei", "mean probability", "share right"]
    for title, scores in (("before (raw vote share)", outcomes.scores), ("after calibration", after)):
        table = reliability_table(scores, outcomes.correct, bins=args.bins)
        _print_tables([(f"{title}: ECE {table['ece']:.3f}", header, _reliability_rows(table))])
    card = read_card(source)
    postprocess = {**card.postprocess, "class_prob_calibration": [list(p) for p in points]}
    replace_card(source, args.output, card.model_copy(update={"postprocess": postprocess}))
    print(f"wrote {args.output}: {card.name}, class_prob_calibration {json.dumps(points)}")
    return 0


def _cmd_model_export(args: argparse.Namespace) -> int:
    from models.train import export_trained

    metrics = _read_metrics(args.metrics)
    card = export_trained(args.checkpoint, args.output, tta=args.tta, metrics=metrics,
                          card_from=args.card_from)
    print(f"wrote {args.output}: {card.name} ({card.architecture}, "
          f"test-time augmentation: {card.test_time_augmentation})")
    return 0


def _cmd_model_train(args: argparse.Namespace) -> int:
    from models.train import train

    path = train(args.config, resume=args.resume, device=args.device)
    print(f"checkpoint: {path}")
    return 0


def _cmd_model_cache_data(args: argparse.Namespace) -> int:
    from models.train.cache import write_cache
    from models.train.config import DEFAULT_DATA_ROOT
    from models.train.data import SOURCES, load_items

    root = args.data_root or DEFAULT_DATA_ROOT
    items = load_items(root, mpp=args.mpp, sources=args.sources or SOURCES)
    written = write_cache(items, args.out)
    print(f"wrote {written} images at {args.mpp} µm/px to {args.out}")
    return 0


def _cmd_model_info(args: argparse.Namespace) -> int:
    from models.card import read_card

    card = read_card(_resolve_model(args.model))
    print(json.dumps(json.loads(card.to_json()), indent=2, ensure_ascii=False))
    return 0


def _cmd_model_list(args: argparse.Namespace) -> int:
    from models.card import read_card
    from models.zoo import default_model, list_models

    default = default_model()
    for path in list_models():
        card = read_card(path)
        mark = " (default)" if default and path == default else ""
        tta = "" if card.test_time_augmentation == "none" else f", {card.test_time_augmentation} TTA"
        print(f"{path.name}{mark}: {card.name} {card.version}, {card.architecture}{tta}, "
              f"{card.mpp} µm/px, classes: {', '.join(c.name for c in card.classes[1:]) or '-'}")
    return 0


# --------------------------------------------------------------------------- evaluate


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from models.evaluate import evaluate_files

    result = evaluate_files(args.pred, args.gt, radius=args.radius, mpp=args.mpp)
    _print_scores(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _print_tables(tables: list[tuple[str, list[str], list[list[str]]]], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if title:
        console.print(title)
    for caption, header, rows in tables:
        table = Table(title=caption)
        for name in header:
            table.add_column(name)
        for row in rows:
            table.add_row(*row)
        console.print(table)


def _print_scores(result: dict, title: str | None = None) -> None:
    from models.evaluate import summary_tables

    _print_tables(summary_tables(result), title)


def _cmd_model_evaluate(args: argparse.Namespace) -> int:
    import itertools

    from models.evaluate import sweep_table
    from models.evaluate_model import sweep_postprocess
    from models.evaluate_points import evaluate_points, is_point_dataset, point_table
    from models.zoo import default_model

    model = args.model if args.model != "default" else default_model()
    if model is None:
        raise UsageError("no bundled model: name an ONNX file")
    # One setting ({}: the card's options) unless a grid of options is asked for.
    asked = {k: v for k, v in _postprocess_args(args).items() if v}
    grid = [dict(zip(asked, values, strict=True)) for values in itertools.product(*asked.values())]
    results: dict[str, Any] = {}
    for data in args.data:
        if is_point_dataset(data):
            if asked:
                raise UsageError(f"{data} has point labels: post-processing sweeps need outlines")
            scored = evaluate_points(model, data, split=args.split, only=args.only or (),
                                     device=args.device, progress=True)
            _print_tables([point_table(scored)], title=f"{Path(model).name} on {data}")
            results[str(data)] = scored
            continue
        found = sweep_postprocess(model, data, grid, only=args.only or (), mpp=args.mpp,
                                  device=args.device, progress=True)
        if len(found) == 1:
            _print_scores(found[0], title=f"{Path(model).name} on {data}")
            results[str(data)] = found[0]
        else:
            _print_tables([sweep_table(found)], title=f"{Path(model).name} on {data}")
            results[str(data)] = found
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    import service.commands  # noqa: F401  (registers serve/worker/submit/key)

    parser = argparse.ArgumentParser(
        prog="hoverserve",
        description="Nuclear instance segmentation and classification of whole-slide images.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("infer", help="segment and classify the nuclei of one slide")
    p.add_argument("slide", help="slide file (SVS, NDPI, MRXS, SCN, TIFF/OME-TIFF, DICOM, PNG/JPEG)")
    p.add_argument("--model", help="ONNX model file (default: the bundled model)")
    p.add_argument("--out", help="output directory or fsspec URL (default: ./<slide>-nuclei)")
    p.add_argument("--roi", type=_roi, help="x,y,w,h in level-0 pixels: analyse only this box")
    p.add_argument("--mpp", type=_positive_float, help="µm per level-0 pixel (overrides metadata)")
    p.add_argument("--region-size", type=_positive_int, default=2048,
                   help="region core side in model pixels (default 2048)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="patches per batch")
    p.add_argument("--workers", type=int, help="read/post-process processes (0 = in-process)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-tissue-mask", action="store_true", help="analyse background too")
    p.add_argument("--tissue-mask", help="PNG mask (non-zero = tissue) with the slide's aspect")
    p.add_argument("--objects", choices=("detections", "cells"), default="detections",
                   help="QuPath objects: nuclei as detections (default), or cells with a boundary "
                        "5 µm out from each nucleus, never overlapping a neighbour")
    p.add_argument("--min-class-prob", type=_probability, metavar="P",
                   help="report nuclei whose class probability is below P as unclassified "
                        "(default: the model card's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_cmd_infer)

    model = sub.add_parser("model", help="import, export, train and inspect models")
    msub = model.add_subparsers(dest="model_command", required=True)
    p = msub.add_parser("import", help="official HoVer-Net checkpoint (.tar) → ONNX")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--types", help="pannuke | consep | monusac | classes JSON file")
    p.add_argument("--name", help="model name for the card")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow arbitrary pickled objects in the checkpoint (only for files you trust)")
    p.set_defaults(func=_cmd_model_import)
    p = msub.add_parser("export", help="a HoVerServe training checkpoint → ONNX")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--tta", choices=["none", "flip", "dihedral"], default=None,
                   help="average the prediction over 4 flips or all 8 flips/rotations inside the graph "
                        "(4x/8x compute; default: the training config's card)")
    p.add_argument("--metrics", metavar="JSON",
                   help="measured metrics to embed in the card (default: the checkpoint's last held-out "
                        "evaluation)")
    p.add_argument("--card-from", metavar="CONFIG",
                   help="a training config whose card section replaces the checkpoint's (names, texts, "
                        "post-processing thresholds)")
    p.set_defaults(func=_cmd_model_export)
    p = msub.add_parser("set-postprocess",
                        help="write a copy of a model with other post-processing options in its card")
    p.add_argument("model", help="ONNX model file or bundled model name")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--np-threshold", type=_probability, metavar="T")
    p.add_argument("--marker-threshold", type=_probability, metavar="T")
    p.add_argument("--min-class-prob", type=_probability, metavar="P",
                   help="nuclei below this class probability are reported unclassified")
    p.add_argument("--upsample", type=_upsample_factor, metavar="N",
                   help="segment on maps upsampled N times (1-4): finer outlines, slower post-processing")
    p.add_argument("--metrics", metavar="JSON", help="measured metrics to store in the card instead")
    p.set_defaults(func=_cmd_model_set_postprocess)
    p = msub.add_parser("refit-types",
                        help="refit a model's class layer on class points and outlined classes")
    p.add_argument("model", help="ONNX model file or bundled model name")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--points", nargs="+", metavar="DIR", help="point data sets (points.npz + images/)")
    p.add_argument("--split", default="train", help="split of the point data sets to fit on")
    p.add_argument("--data-root", metavar="DIR", help="the shared data/nuclei folder (for --typed)")
    p.add_argument("--typed", nargs="+", metavar="SOURCE",
                   help="classified outline sources, e.g. consep_train")
    p.add_argument("--holdout", nargs="+", metavar="GROUP", help="source images kept out of the fit")
    p.add_argument("--l2", type=_positive_float, default=1e-3, help="pull towards the current weights")
    p.add_argument("--name"), p.add_argument("--version"), p.add_argument("--description")
    p.add_argument("--metrics", metavar="JSON", help="measured metrics to store in the card")
    p.set_defaults(func=_cmd_model_refit_types)
    p = msub.add_parser("calibrate",
                        help="fit a model's class probabilities to validation data; reliability table")
    p.add_argument("model", help="ONNX model file or bundled model name")
    p.add_argument("data", nargs="+", help="point data sets (points.npz) or classified outline data sets")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--split", help="point data sets: the split to use, e.g. val")
    p.add_argument("--only", nargs="+", metavar="PREFIX", help="only images whose name starts so")
    p.add_argument("--bins", type=_positive_int, default=10)
    p.set_defaults(func=_cmd_model_calibrate)
    p = msub.add_parser("train", help="train a model from a config file")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=_cmd_model_train)
    p = msub.add_parser("cache-data",
                        help="write the training data resampled to one resolution (to carry to a GPU box)")
    p.add_argument("out", type=Path)
    p.add_argument("--data-root", type=Path, help="the nuclei data sets (default: ../shared/data/nuclei)")
    p.add_argument("--mpp", type=float, default=0.5, help="resolution to resample to (default 0.5)")
    p.add_argument("--sources", nargs="+", metavar="SOURCE",
                   help="consep_train consep_test monuseg cpm15 (default: all)")
    p.set_defaults(func=_cmd_model_cache_data)
    p = msub.add_parser("info", help="print a model file's card")
    p.add_argument("model", nargs="?", help="ONNX file (default: the bundled model)")
    p.set_defaults(func=_cmd_model_info)
    p = msub.add_parser("list", help="list bundled models")
    p.set_defaults(func=_cmd_model_list)
    p = msub.add_parser("evaluate", help="run a model on annotated images and score it (PQ, AJI, F1...)")
    p.add_argument("model", help="ONNX model file, or 'default' for the bundled model")
    p.add_argument("data", nargs="+",
                   help="data set: .npz (images/inst[/type_map]), a folder (labels.npz + images/), "
                   "or a point-labelled folder (points.npz + images/)")
    p.add_argument("--only", nargs="+", metavar="PREFIX",
                   help="score only images whose name starts with one of these (held-out images)")
    p.add_argument("--mpp", type=_positive_float, help="µm/px of the data when its files do not say")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--np-threshold", nargs="+", type=_probability, metavar="T",
                   help="nucleus-probability threshold(s) instead of the card's; several: a sweep")
    p.add_argument("--marker-threshold", nargs="+", type=_probability, metavar="T",
                   help="marker threshold(s) instead of the card's; with --np-threshold, every pair")
    p.add_argument("--upsample", nargs="+", type=_upsample_factor, metavar="N",
                   help="post-process the maps upsampled N times (1-4) instead of the card's factor")
    p.add_argument("--split", help="point data sets (points.npz): score only this split, e.g. val")
    p.add_argument("--json", help="also write every metric to this JSON file")
    p.set_defaults(func=_cmd_model_evaluate)

    export = sub.add_parser("export", help="re-export a result without re-running the slide")
    esub = export.add_subparsers(dest="export_command", required=True)
    p = esub.add_parser("qupath", help="a result's nucleus table → QuPath GeoJSON (one file to drag)")
    p.add_argument("table", help="nuclei.zarr.zip (as downloaded) or a nuclei.zarr directory")
    p.add_argument("--out", required=True, help="output directory or fsspec URL")
    p.add_argument("--objects", choices=["detections", "cells"], default="detections",
                   help="QuPath object type (cells need a table with cell boundaries)")
    p.add_argument("--measurements", nargs="+", metavar="NAME",
                   help="measurement names to write, in this order (default: all in the table)")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    p.set_defaults(func=_cmd_export_qupath)

    p = sub.add_parser("evaluate", help="compare predicted and ground-truth label maps")
    p.add_argument("pred", help=".npz (inst[, type_map]) or label image")
    p.add_argument("gt", help=".npz (inst[, type_map]) or label image")
    p.add_argument("--radius", type=_positive_float, help="detection radius, pixels")
    p.add_argument("--mpp", type=_positive_float, help="µm/px (sets the default radius)")
    p.add_argument("--json", help="also write every metric to this JSON file")
    p.set_defaults(func=_cmd_evaluate)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []
"""Subcommand registrars of other modules (the HTTP service adds serve/worker/submit)."""


def _error_types() -> tuple[type[BaseException], ...]:
    from models.errors import ModelError
    from worker.errors import WorkerError

    return (UsageError, WorkerError, ModelError, ValueError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except _error_types() as exc:
        print(f"hoverserve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        # training, export and data caching need the optional PyTorch extra; inference does not
        if exc.name != "torch":
            raise
        print("hoverserve: error: this command needs PyTorch: pip install -e '.[torch]'", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("hoverserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
