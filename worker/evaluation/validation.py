"""Training validation that scores what the card will do.

:func:`models.train.loop.run_training` picks its best checkpoint by a held-out score it cannot
compute itself (models never import the worker): ``hoverserve model train`` injects
:func:`validate_training`. The network predicts each held-out item whole
(:func:`models.train.validate.predict_outputs`); the maps become nuclei through the card's family
runner (:func:`worker.families.runner_for`) with the card's options — thresholds and upsampling
included — exactly as a slide job with the exported model would; labels traced on a finer grid
are brought back to the item's by nearest neighbour and scored per source.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from models.card import ModelCard
from models.evaluate import evaluate_dataset, radius_for_mpp
from models.train.config import TrainConfig
from models.train.data import Item
from models.train.release import card_for
from models.train.validate import predict_detections, predict_outputs, summarise
from worker.evaluation.model import ImageMaps, instances_from_maps
from worker.families import FamilyRunner, job_options, runner_for

__all__ = ["item_maps", "score_items", "validate_items", "validate_training"]

logger = logging.getLogger(__name__)


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def item_maps(model: nn.Module, item: Item, card: ModelCard) -> ImageMaps:
    """The network's maps of one item at the item's size, laid out as the card's family runner
    keeps a region's (:meth:`worker.families.FamilyRunner.map_specs`: for hover ``np_prob``,
    ``hv`` and, for a network with a type head, the per-pixel class ``types``).

    Raises
    ------
    ValueError
        The network lacks an output the card's family needs.
    """
    return _item_maps(model, item, card)[0]


def _item_maps(model: nn.Module, item: Item, card: ModelCard) -> tuple[ImageMaps, bool]:
    # The maps, and whether the network classifies (the runner's answer for its outputs).
    runner = runner_for(card)
    if runner.whole_box:
        maps, outputs = _detector_maps(model, item, card, runner)
        return maps, runner.typed(card, outputs)
    # As a batch of one patch under the exported graph's output names.
    result = predict_outputs(model, item.image, card.family, device=_device(model))
    outputs = runner.network_outputs(card, list(result))
    tiles = runner.tile_maps({name: result[name] for name in outputs}, 0)
    arrays = {spec.name: np.asarray(tiles[spec.name], spec.dtype)
              for spec in runner.map_specs(card, outputs)}
    return ImageMaps(arrays=arrays, shape=item.inst.shape[:2]), runner.typed(card, outputs)


def _detector_maps(model: nn.Module, item: Item, card: ModelCard,
                   runner: FamilyRunner) -> tuple[ImageMaps, tuple[str, ...]]:
    # The item as one box (a slide region's core, whole tiles, and its margin), every tile
    # analysed, framed as `model evaluate` frames it; and the outputs the network gave.
    height, width = item.inst.shape[:2]
    tile = card.output_size
    result = predict_detections(model, item.image, margin=card.margin, multiple=tile,
                                device=_device(model))
    outputs = runner.network_outputs(card, list(result))
    wanted = np.ones((-(-height // tile), -(-width // tile)), bool)
    maps = runner.box_maps(result, card, wanted=wanted)
    arrays = {name: array[:height, :width] for name, array in maps.items()}
    return ImageMaps(arrays=arrays, shape=(height, width)), outputs


def score_items(model: nn.Module, items: Sequence[Item], card: ModelCard) -> dict[str, dict[str, Any]]:
    """Score ``model`` on held-out items as ``card`` post-processes: one
    :func:`models.evaluate.evaluate_dataset` result per source.

    Classes are scored for a typed card whose network has a type head, on sources whose items all
    carry type maps (item classes are the card's, background first).

    Raises
    ------
    ValueError
        An item is not at the card's resolution, or the network lacks an output of the card's
        family.
    """
    options = job_options(card)
    class_names = [c.name for c in card.classes]
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, Any]] = {}
    try:
        for source in sorted({item.source for item in items}):
            chosen = [item for item in items if item.source == source]
            typed = card.typed and all(item.typed for item in chosen)
            found = []
            for item in chosen:
                if not np.isclose(item.mpp, card.mpp):
                    raise ValueError(f"item {item.name} is at {item.mpp} µm/px; the card works at "
                                     f"{card.mpp}")
                maps, head = _item_maps(model, item, card)
                typed = typed and head  # a network without a type head is scored untyped
                found.append(instances_from_maps(maps, card, options, typed=head))
            pairs = [(labels, types if typed else None, item.inst, item.types if typed else None)
                     for (labels, types), item in zip(found, chosen, strict=True)]
            results[source] = evaluate_dataset(
                pairs,
                radius=radius_for_mpp(chosen[0].mpp),
                class_names=class_names if typed else None,
                image_names=[item.name for item in chosen],
            )
    finally:
        model.train(was_training)
    return results


def validate_items(model: nn.Module, items: Sequence[Item], card: ModelCard) -> dict[str, float]:
    """:func:`score_items` as flat headline numbers (:func:`models.train.validate.summarise`)."""
    return summarise(score_items(model, items, card))


def validate_training(model: nn.Module, items: Sequence[Item], config: TrainConfig) -> dict[str, float]:
    """The :data:`models.train.validate.Validator` of ``hoverserve model train``: held-out items
    scored with the card the run's config exports (:func:`models.train.release.card_for`)."""
    card = card_for(config)
    logger.debug("validating %d items with %s's post-processing %s", len(items), card.name,
                 card.options)
    return validate_items(model, items, card)
