"""``hoverserve model evaluate`` and ``hoverserve model calibrate``: run a model on annotated
images, score it (PQ, AJI, F1...), and fit its class probabilities to what it gets right."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

from models.families import MAX_UPSAMPLE
from service.cli import _args
from service.cli._errors import UsageError
from service.cli.tables import print_scores, print_tables

__all__ = ["add_calibrate", "add_evaluate"]


def _reliability_rows(table: dict[str, Any]) -> list[list[str]]:
    return [[f"{row['from']:.1f}-{row['to']:.1f}", f"{row['n']:,}", f"{row['mean_probability']:.3f}",
             f"{row['share_right']:.3f}"] for row in table["bins"]]


def _cmd_model_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from models.calibration import Outcomes, fit_calibration, reliability_table
    from models.card import read_card, replace_card
    from models.families import HoverOptions
    from worker.evaluation.calibration import class_outcomes

    source = _args.model_file(args.model)
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
        print_tables([(f"{title}: ECE {table['ece']:.3f}", header, _reliability_rows(table))])
    card = read_card(source)
    postprocess = {**card.postprocess, "class_prob_calibration": [list(p) for p in points]}
    replace_card(source, args.output, card.model_copy(update={"postprocess": postprocess}))
    print(f"wrote {args.output}: {card.name}, class_prob_calibration {json.dumps(points)}")
    return 0


def _grid(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The post-processing options asked for, and every combination of their values (one
    setting, ``{}``: the card's options, when none is asked for)."""
    asked = {k: v for k, v in _args.postprocess_args(args).items() if v}
    grid = [dict(zip(asked, values, strict=True)) for values in itertools.product(*asked.values())]
    return asked, grid


def _cmd_model_evaluate(args: argparse.Namespace) -> int:
    from models.evaluate_points import is_point_dataset, point_table
    from models.evaluate_tables import sweep_table
    from worker.evaluation.model import sweep_postprocess
    from worker.evaluation.points import evaluate_points

    model = _args.model_file(args.model)
    asked, grid = _grid(args)
    results: dict[str, Any] = {}
    for data in args.data:
        title = f"{model.name} on {data}"
        if is_point_dataset(data):
            if asked:
                raise UsageError(f"{data} has point labels: post-processing sweeps need outlines")
            scored = evaluate_points(model, data, split=args.split, only=args.only or (),
                                     device=args.device, progress=True)
            print_tables([point_table(scored)], title=title)
            results[str(data)] = scored
            continue
        found = sweep_postprocess(model, data, grid, only=args.only or (), mpp=args.mpp,
                                  device=args.device, progress=True)
        if len(found) == 1:
            print_scores(found[0], title=title)
            results[str(data)] = found[0]
        else:
            print_tables([sweep_table(found)], title=title)
            results[str(data)] = found
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def add_calibrate(msub: _args.Subparsers) -> None:
    """Add ``calibrate`` to the ``hoverserve model`` parser."""
    p = msub.add_parser("calibrate",
                        help="fit a model's class probabilities to validation data; reliability table")
    p.add_argument("model", help="ONNX model file or bundled model name")
    p.add_argument("data", nargs="+", help="point data sets (points.npz) or classified outline data sets")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--split", help="point data sets: the split to use, e.g. val")
    p.add_argument("--only", nargs="+", metavar="PREFIX", help="only images whose name starts so")
    p.add_argument("--bins", type=_args.positive_int, default=10)
    p.set_defaults(func=_cmd_model_calibrate)


def add_evaluate(msub: _args.Subparsers) -> None:
    """Add ``evaluate`` to the ``hoverserve model`` parser."""
    p = msub.add_parser("evaluate", help="run a model on annotated images and score it (PQ, AJI, F1...)")
    p.add_argument("model", help="ONNX model file, or 'default' for the bundled model")
    p.add_argument("data", nargs="+",
                   help="data set: .npz (images/inst[/type_map]), a folder (labels.npz + images/), "
                   "or a point-labelled folder (points.npz + images/)")
    p.add_argument("--only", nargs="+", metavar="PREFIX",
                   help="score only images whose name starts with one of these (held-out images)")
    p.add_argument("--mpp", type=_args.mpp, help="µm/px of the data when its files do not say")
    p.add_argument("--device", choices=_args.DEVICES, default="cpu")
    p.add_argument("--np-threshold", nargs="+", type=_args.probability, metavar="T",
                   help="nucleus-probability threshold(s) instead of the card's; several: a sweep")
    p.add_argument("--marker-threshold", nargs="+", type=_args.probability, metavar="T",
                   help="marker threshold(s) instead of the card's; with --np-threshold, every pair")
    p.add_argument("--score-threshold", nargs="+", type=_args.probability, metavar="T",
                   help="instance models: detection score threshold(s) instead of the card's")
    p.add_argument("--mask-threshold", nargs="+", type=_args.probability, metavar="T",
                   help="instance models: mask threshold(s) instead of the card's; every pair")
    p.add_argument("--upsample", nargs="+", type=_args.upsample_factor, metavar="N",
                   help=f"post-process the maps upsampled N times (1-{MAX_UPSAMPLE}) instead of the "
                        "card's factor")
    p.add_argument("--split", help="point data sets (points.npz): score only this split, e.g. val")
    p.add_argument("--json", help="also write every metric to this JSON file")
    p.set_defaults(func=_cmd_model_evaluate)
