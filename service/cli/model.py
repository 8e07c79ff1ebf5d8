"""``hoverserve model ...``: import, export, train and inspect models, and rewrite their cards.

Scoring and calibrating a model on annotated data (``model evaluate``, ``model calibrate``) are in
:mod:`service.cli.model_eval`; this module registers them in their place among the others.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from models.families import MAX_UPSAMPLE
from models.precision import PROBABILITY_TOLERANCE
from service.cli import _args, model_eval
from service.cli._errors import UsageError

__all__ = ["read_metrics", "register"]


def read_metrics(path: str | None) -> dict[str, Any] | None:
    """The JSON object of ``--metrics PATH`` (None without one); UsageError if unreadable."""
    if not path:
        return None
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--metrics {path}: {exc}") from exc
    if not isinstance(metrics, dict):
        raise UsageError(f"--metrics {path}: expected a JSON object")
    return metrics


def _cmd_model_import(args: argparse.Namespace) -> int:
    from models.importer import import_to_onnx

    card = import_to_onnx(args.checkpoint, args.output, types=args.types, name=args.name,
                          trusted=args.trust_checkpoint)
    print(f"wrote {args.output}: {card.name} ({card.architecture}, "
          f"{len(card.classes)} classes, {card.input_size}→{card.output_size} px at {card.mpp} µm/px)")
    return 0


def _cmd_model_set_postprocess(args: argparse.Namespace) -> int:
    from models.card import read_card, replace_card

    source = _args.model_file(args.model)
    card = read_card(source)
    asked = {k: v for k, v in _args.postprocess_args(args).items() if v is not None}
    if args.official_edges:
        asked["edge_range"] = None
    elif args.measure_edge_range:
        asked["edge_range"] = list(_measured_edge_range(source, args.measure_edge_range))
    known = type(card.options).KEYS
    foreign = [k for k in asked if k not in known]
    if foreign:
        raise UsageError(f"{', '.join('--' + k.replace('_', '-') for k in foreign)}: not an option of "
                         f"a {card.family} model (its options: {', '.join(known)})")
    postprocess = {**card.postprocess, **asked}
    try:
        card.model_copy(update={"postprocess": postprocess})
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    update: dict[str, Any] = {"postprocess": postprocess}
    metrics = read_metrics(args.metrics)
    if metrics is not None:
        update["metrics"] = metrics
    replace_card(source, args.output, card.model_copy(update=update))
    print(f"wrote {args.output}: {card.name}, post-processing {json.dumps(postprocess)}")
    return 0


def _measured_edge_range(model: Path, data: list[str]) -> tuple[float, float]:
    from worker.evaluation.edges import measure_edge_range
    from worker.infer import load_model

    try:
        low, high = measure_edge_range(load_model(model, device="cpu"), data)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return round(low, 4), round(high, 4)


def _cmd_model_refit_types(args: argparse.Namespace) -> int:
    from models.train.refit import RefitOptions, refit_model

    source = _args.model_file(args.model)
    options = RefitOptions(
        points=tuple(Path(p) for p in args.points or ()), points_split=args.split,
        data_root=Path(args.data_root) if args.data_root else None,
        typed_sources=tuple(args.typed or ()), holdout=tuple(args.holdout or ()), l2=args.l2)
    updates: dict[str, Any] = {k: v for k, v in (("name", args.name), ("version", args.version),
                                                 ("description", args.description)) if v}
    metrics = read_metrics(args.metrics)
    if metrics is not None:
        updates["metrics"] = metrics
    try:
        card = refit_model(source, args.output, options, card_updates=updates)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    print(f"wrote {args.output}: {card.name} (classes refit; segmentation unchanged)")
    return 0


def _cmd_model_export(args: argparse.Namespace) -> int:
    from models.train import export_trained

    metrics = read_metrics(args.metrics)
    card = export_trained(args.checkpoint, args.output, tta=args.tta, metrics=metrics,
                          card_from=args.card_from)
    print(f"wrote {args.output}: {card.name} ({card.family} family, {card.architecture}, "
          f"test-time augmentation: {card.test_time_augmentation})")
    return 0


def _read_rgb(path: str) -> Any:
    """An image file as (H, W, 3) uint8 RGB; UsageError if it is not one."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UsageError(f"--image {path}: not a readable image ({exc})") from exc


def _cmd_model_fp16(args: argparse.Namespace) -> int:
    from worker.variant_check import write_fp16_variant

    source = _args.model_file(args.model)
    check = write_fp16_variant(source, args.output, _read_rgb(args.image), args.image_mpp,
                               device=args.device, prob_tolerance=args.tolerance)
    print(f"wrote {args.output}: fp16 variant of {source.name}; check {check.summary()}")
    return 0


def _cmd_model_train(args: argparse.Namespace) -> int:
    from models.train import train
    from worker.evaluation.validation import validate_training

    # The held-out score that picks the checkpoint post-processes as the exported card will.
    path = train(args.config, resume=args.resume, device=args.device, validate=validate_training)
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

    card = read_card(_args.model_file(args.model))
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


# --------------------------------------------------------------------------- parsers


def _add_import(msub: _args.Subparsers) -> None:
    p = msub.add_parser("import", help="official HoVer-Net checkpoint (.tar) → ONNX")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--types", help="pannuke | consep | monusac | classes JSON file")
    p.add_argument("--name", help="model name for the card")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow arbitrary pickled objects in the checkpoint (only for files you trust)")
    p.set_defaults(func=_cmd_model_import)


def _add_export(msub: _args.Subparsers) -> None:
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


def _add_fp16(msub: _args.Subparsers) -> None:
    p = msub.add_parser("fp16", help="a float16 copy of a model, written only if it finds the nuclei "
                                     "the float32 model finds")
    p.add_argument("model", help="ONNX model file or bundled model name (float32)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--image", required=True,
                   help="real H&E image (PNG/JPEG/TIFF) with nuclei to check the variant on")
    p.add_argument("--image-mpp", type=_args.mpp, metavar="MPP",
                   help="the image's µm per pixel (default: the model's)")
    p.add_argument("--tolerance", type=_args.probability, default=PROBABILITY_TOLERANCE, metavar="P",
                   help="largest difference of a probability on the reference batch "
                        f"(default {PROBABILITY_TOLERANCE:g})")
    p.add_argument("--device", choices=_args.DEVICES, default="cpu",
                   help="where the check runs (default cpu; cuda checks the GPU's float16 kernels)")
    p.set_defaults(func=_cmd_model_fp16)


def _add_set_postprocess(msub: _args.Subparsers) -> None:
    p = msub.add_parser("set-postprocess",
                        help="write a copy of a model with other post-processing options in its card")
    p.add_argument("model", help="ONNX model file or bundled model name")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--np-threshold", type=_args.probability, metavar="T")
    p.add_argument("--marker-threshold", type=_args.probability, metavar="T")
    p.add_argument("--score-threshold", type=_args.probability, metavar="T",
                   help="instance models: lowest detection score kept")
    p.add_argument("--mask-threshold", type=_args.probability, metavar="T",
                   help="instance models: mask probability above which a pixel is the nucleus's")
    p.add_argument("--min-class-prob", type=_args.probability, metavar="P",
                   help="nuclei below this class probability are reported unclassified")
    p.add_argument("--upsample", type=_args.upsample_factor, metavar="N",
                   help=f"segment on maps upsampled N times (1-{MAX_UPSAMPLE}): finer outlines, "
                        "slower post-processing")
    edges = p.add_mutually_exclusive_group()
    edges.add_argument("--edge-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       help="fixed edge-map normalisation (fractions of the Sobel gain): the same "
                            "nuclei whatever the region size")
    edges.add_argument("--measure-edge-range", nargs="+", metavar="DATA",
                       help="measure --edge-range on these annotated data sets (median extremes)")
    edges.add_argument("--official-edges", action="store_true",
                       help="back to the official per-map min-max normalisation")
    p.add_argument("--metrics", metavar="JSON", help="measured metrics to store in the card instead")
    p.set_defaults(func=_cmd_model_set_postprocess)


def _add_refit_types(msub: _args.Subparsers) -> None:
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
    p.add_argument("--l2", type=_args.positive_float, default=1e-3,
                   help="pull towards the current weights")
    p.add_argument("--name")
    p.add_argument("--version")
    p.add_argument("--description")
    p.add_argument("--metrics", metavar="JSON", help="measured metrics to store in the card")
    p.set_defaults(func=_cmd_model_refit_types)


def _add_train(msub: _args.Subparsers) -> None:
    p = msub.add_parser("train", help="train a model from a config file")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--device", choices=_args.DEVICES, default="auto")
    p.set_defaults(func=_cmd_model_train)


def _add_cache_data(msub: _args.Subparsers) -> None:
    p = msub.add_parser("cache-data",
                        help="write the training data resampled to one resolution (to carry to a GPU box)")
    p.add_argument("out", type=Path)
    p.add_argument("--data-root", type=Path, help="the nuclei data sets (default: ../shared/data/nuclei)")
    p.add_argument("--mpp", type=_args.mpp, default=0.5, help="resolution to resample to (default 0.5)")
    p.add_argument("--sources", nargs="+", metavar="SOURCE",
                   help="consep_train consep_test monuseg cpm15 (default: all)")
    p.set_defaults(func=_cmd_model_cache_data)


def _add_info_and_list(msub: _args.Subparsers) -> None:
    p = msub.add_parser("info", help="print a model file's card")
    p.add_argument("model", nargs="?", help="ONNX file (default: the bundled model)")
    p.set_defaults(func=_cmd_model_info)
    p = msub.add_parser("list", help="list bundled models")
    p.set_defaults(func=_cmd_model_list)


def register(sub: _args.Subparsers) -> None:
    """Add ``model import|export|fp16|set-postprocess|refit-types|calibrate|train|cache-data|info|
    list|evaluate`` to the ``hoverserve`` parser (in that order, the order of its help)."""
    model = sub.add_parser("model", help="import, export, train and inspect models")
    msub = model.add_subparsers(dest="model_command", required=True)
    _add_import(msub)
    _add_export(msub)
    _add_fp16(msub)
    _add_set_postprocess(msub)
    _add_refit_types(msub)
    model_eval.add_calibrate(msub)
    _add_train(msub)
    _add_cache_data(msub)
    _add_info_and_list(msub)
    model_eval.add_evaluate(msub)
