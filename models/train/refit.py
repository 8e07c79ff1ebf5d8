"""``hoverserve model refit-types``: a model's classes refit on outlined and point-labelled data.

Gathers labelled pixels (:mod:`models.train.type_head`) from

* point data sets (``points.npz`` + ``images/``, e.g. BRCA-M2C, its ``train`` split), classes
  matched to the model's by name (:data:`models.evaluate_points.CLASS_ALIASES`), and
* classified outline data sets of the shared nucleus data (``consep_train``, ``consep_test``),
  resampled to the model's resolution, with whole source images held out,

refits the type layer, and writes a copy of the model whose card records what was done. The
model's segmentation outputs are untouched, so only the classes of its nuclei can change.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from models.card import ModelCard, embed_card, read_card
from models.train.type_head import (
    POINT_RADIUS_UM,
    LabelledPixels,
    balance,
    feature_session,
    image_features,
    point_pixels,
    read_type_head,
    refit_type_head,
    type_map_pixels,
    write_type_head,
)

__all__ = ["RefitOptions", "gather_pixels", "refit_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefitOptions:
    """What :func:`refit_model` reads and how it fits."""

    points: tuple[Path, ...] = ()
    points_split: str | None = "train"
    data_root: Path | None = None
    typed_sources: tuple[str, ...] = ()
    holdout: tuple[str, ...] = ()
    per_point: int = 12
    per_class: int = 150
    l2: float = 1e-3
    seed: int = 0
    threads: int = 2


def gather_pixels(path: str | Path, options: RefitOptions) -> tuple[list[LabelledPixels], int]:
    """Labelled type features of every source (one entry per source) and the model's class count."""
    from models.evaluate_points import class_map, point_class_names, read_points
    from models.train.data import load_items, split_items

    card = read_card(path)
    model, session = feature_session(path, threads=options.threads)
    n_classes = read_type_head(model).weight.shape[0]
    rng = np.random.default_rng(options.seed)
    names = [c.name for c in card.classes]
    sources: list[LabelledPixels] = []
    for folder in options.points:
        mapping = class_map(point_class_names(folder), names)
        parts = []
        for im in read_points(folder, split=options.points_split):
            if abs(im.mpp - card.mpp) > 1e-6 * card.mpp:
                raise ValueError(f"{folder}: points at {im.mpp} µm/px, the model works at {card.mpp}")
            feats = image_features(session, im.image, input_size=card.input_size,
                                   output_size=card.output_size)
            keep = np.asarray([int(c) in mapping for c in im.classes], bool)
            classes = np.asarray([mapping.get(int(c), 0) for c in im.classes], np.int64)[keep]
            parts.append(point_pixels(feats, im.xy[keep], classes, radius_px=POINT_RADIUS_UM / im.mpp,
                                      per_point=options.per_point, rng=rng))
        sources.append(LabelledPixels.concat(parts))
        logger.info("%s: %d labelled pixels", folder, sources[-1].labels.size)
    if options.typed_sources:
        if options.data_root is None:
            raise ValueError("typed sources need data_root (the shared data/nuclei folder)")
        items = load_items(options.data_root, mpp=card.mpp, sources=options.typed_sources)
        train, _ = split_items(items, options.holdout)
        parts = []
        for item in train:
            if item.types is None:
                continue
            feats = image_features(session, item.image, input_size=card.input_size,
                                   output_size=card.output_size)
            parts.append(type_map_pixels(feats, item.types, per_class=options.per_class, rng=rng))
        sources.append(LabelledPixels.concat(parts))
        logger.info("%s: %d labelled pixels", "+".join(options.typed_sources), sources[-1].labels.size)
    if not sources:
        raise ValueError("nothing to fit: give point data sets and/or typed sources")
    return sources, n_classes


def refit_model(path: str | Path, output: str | Path, options: RefitOptions, *,
                card_updates: dict[str, object] | None = None,
                sources: Sequence[LabelledPixels] | None = None) -> ModelCard:
    """Refit ``path``'s type layer and write the result to ``output``; returns its card.

    ``sources`` (from :func:`gather_pixels`) skips the feature pass when given.
    """
    model = onnx.load(str(path))
    head = read_type_head(model)
    if sources is None:
        sources, _ = gather_pixels(path, options)
    weight, bias = refit_type_head(head, balance(sources, head.weight.shape[0]), l2=options.l2)
    refit = write_type_head(model, weight, bias)
    card = read_card(path).model_copy(update=card_updates or {})
    embed_card(refit, card)
    onnx.save(refit, str(output))
    return card
