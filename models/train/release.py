"""Turn a training checkpoint into a shipped ONNX model with its card."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.card import ClassInfo, ModelCard
from models.train.config import TrainConfig, load_config
from models.train.families import training_family
from models.train.loop import build_model

__all__ = ["card_for", "export_trained", "load_checkpoint"]

logger = logging.getLogger(__name__)


def load_checkpoint(checkpoint: str | Path) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """Rebuild the network of a checkpoint written by :func:`models.train.train`.

    Returns
    -------
    tuple
        (model in eval mode on the CPU, its training config, its last held-out metrics).
    """
    state = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
    for key in ("model", "config"):
        if key not in state:
            raise ValueError(f"{checkpoint} is not a HoVerServe training checkpoint (no {key!r})")
    config = TrainConfig.model_validate(state["config"])
    model = build_model(config.model)
    model.load_state_dict(state["model"])
    model.eval()
    return model, config, dict(state.get("metrics", {}))


def card_for(config: TrainConfig, *, metrics: Mapping[str, Any] | None = None) -> ModelCard:
    """The model card of a trained model, from its config and held-out metrics (its family is
    the config's ``card.family``; training and export check it against the architecture)."""
    card = config.card
    classes = tuple(ClassInfo(name=name, colour=colour) for name, colour in card.classes)
    if classes and len(classes) != config.model.n_classes:
        raise ValueError(f"card lists {len(classes)} classes but the model has {config.model.n_classes}")
    return ModelCard(
        name=card.name,
        version=card.version,
        family=card.family,
        architecture=config.model.architecture,
        input_size=card.input_size,
        output_size=card.output_size,
        mpp=config.data.mpp,
        classes=classes,
        postprocess=dict(card.postprocess),
        training_data=card.training_data,
        licence=card.licence,
        metrics=dict(metrics or {}),
        description=card.description,
        test_time_augmentation=card.test_time_augmentation,
    )


def export_trained(
    checkpoint: str | Path,
    output: str | Path,
    *,
    metrics: Mapping[str, Any] | None = None,
    postprocess: Mapping[str, Any] | None = None,
    card_from: str | Path | None = None,
    tta: str | None = None,
    check: bool = True,
) -> ModelCard:
    """Export a training checkpoint to an ONNX file following its family's model contract
    (``hover``: :func:`models.export.export_onnx`; ``boundary``:
    :func:`models.tsfd.export.export_boundary_onnx`, which builds no test-time augmentation in).

    Parameters
    ----------
    checkpoint : str or Path
        A ``last.pt``/``best.pt`` written by :func:`models.train.train`.
    output : str or Path
        ONNX file to write (its folder must exist).
    metrics : mapping, optional
        Metrics for the card; default: the held-out metrics stored in the checkpoint.
    postprocess : mapping, optional
        Post-processing options for the card (e.g. ``np_threshold``, ``marker_threshold``
        chosen on the hold-out); default: the training config's ``card.postprocess``.
    card_from : str or Path, optional
        A training config file whose ``card`` section replaces the checkpoint's (to correct or
        complete the card's texts after training).
    tta : str, optional
        Test-time augmentation built into the graph (``"none"``, ``"flip"``, ``"dihedral"``);
        default: the training config's ``card.test_time_augmentation``.
    check : bool
        Run the written file once in ONNX Runtime.

    Returns
    -------
    ModelCard
        The card embedded in the file.
    """
    model, config, stored = load_checkpoint(checkpoint)
    if card_from is not None:
        config = config.model_copy(update={"card": load_config(card_from).card})
    if postprocess is not None:
        config = config.model_copy(
            update={"card": config.card.model_copy(update={"postprocess": dict(postprocess)})}
        )
    card = card_for(config, metrics=stored if metrics is None else metrics)
    if tta is not None:
        card = card.model_copy(update={"test_time_augmentation": tta})
    # the exported graph returns only the centre output_size pixels (both families' networks crop
    # by their ``margin`` attribute)
    setattr(model, "margin", card.margin)  # noqa: B010 - nn.Module's attribute typing is Tensor | Module
    training_family(config).export(model, card, Path(output), check)
    logger.info("exported %s as %s", checkpoint, output)
    return card
