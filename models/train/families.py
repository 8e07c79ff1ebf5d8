"""What training does differently per model family, in one typed mapping.

A run's family is its card's (``card.family`` in the config, :mod:`models.families`). Each
:class:`TrainingFamily` says which architectures build its networks, how a batch's targets are
made from the augmented instance maps, which loss trains it, how its raw logits become the
probabilities its exported graph outputs (held-out validation predicts with these, named as the
graph names them) and how it is exported. The loop, validation and export look the family up
here (:func:`training_family`) and never branch on its name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from models.card import ModelCard
from models.conic.builder import BUILDERS as HOVER_BUILDERS
from models.train.config import LossConfig, ModelConfig, TrainConfig
from models.train.data import collate
from models.train.from_onnx import load_instance_onnx_weights, load_onnx_weights
from models.train.losses import HoverLoss
from models.train.tsfd_losses import TSFDLoss
from models.train.tsfd_targets import collate_boundary
from models.tsfd.builder import BUILDERS as BOUNDARY_BUILDERS

__all__ = ["FAMILIES", "Collate", "TrainingFamily", "family_of", "training_family"]

OnnxInit = Callable[[nn.Module, Path, ModelCard], None]
"""``(model, onnx_path, card)`` → the file's weights loaded into ``model`` (checked against it)."""

Collate = Callable[
    [list[NDArray[np.uint8]], list[NDArray[np.int32]], list[NDArray[np.uint8]], list[bool]],
    dict[str, Tensor],
]
"""(images, instance maps, type maps, typed flags) of a batch's patches → the batch's tensors."""


@dataclass(frozen=True)
class TrainingFamily:
    """How one model family is built, trained, predicted with and exported.

    Attributes
    ----------
    name : str
        The family, as a card names it.
    builders : mapping of str to callable
        Architecture name → ``builder(n_classes, **options)``.
    collate : callable
        ``collate(model_config)`` → the :data:`Collate` of the batch targets its loss reads.
    loss : callable
        ``loss(loss_config)`` → the loss module, ``loss(outputs, batch)`` → (total, terms).
    logits : tuple of str
        The keys the family's networks always return (raw logits), which tell a network's family.
    probabilities : callable
        Raw logits (the network's dict) → the exported graph's outputs, by their names.
    export : callable
        ``export(model, card, output, check)`` writes the ONNX file under the family contract.
    stride : int
        Input sides must be multiples of this.
    onnx_init : callable or None
        ``onnx_init(model, path, card)`` reads an exported ONNX file's weights back into a freshly
        built network (``init_from`` naming a shipped model); None where the family cannot.
    forward : callable
        ``forward(model, batch)`` → the outputs ``loss`` reads: the network on the batch's image
        (most families), or with its targets too (a detector samples proposals against them).
    """

    name: str
    builders: Mapping[str, Callable[..., nn.Module]]
    collate: Callable[[ModelConfig], Collate]
    loss: Callable[[LossConfig], nn.Module]
    logits: tuple[str, ...]
    probabilities: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
    export: Callable[[nn.Module, ModelCard, Path, bool], None]
    stride: int
    onnx_init: OnnxInit | None
    forward: Callable[[nn.Module, Mapping[str, Tensor]], Mapping[str, Tensor]] = (
        lambda model, batch: model(batch["image"]))


def _hover_collate(_: ModelConfig) -> Collate:
    return collate


def _hover_loss(config: LossConfig) -> nn.Module:
    return HoverLoss(config.weights, class_weights=config.class_weights)


def _hover_probabilities(out: Mapping[str, Tensor]) -> dict[str, Tensor]:
    probs = {"np_prob": torch.softmax(out["np"], dim=1)[:, 1:2], "hv": out["hv"]}
    if "tp" in out:
        probs["tp_prob"] = torch.softmax(out["tp"], dim=1)
    return probs


def _hover_export(model: nn.Module, card: ModelCard, output: Path, check: bool) -> None:
    from models.export import export_onnx

    export_onnx(model, card, output, check=check)


def _boundary_collate(config: ModelConfig) -> Collate:
    # a partial of a module-level function: DataLoader workers (spawned) must be able to pickle it
    return functools.partial(collate_boundary, n_classes=config.n_classes)


def _boundary_loss(config: LossConfig) -> nn.Module:
    if config.class_weights is not None:
        raise ValueError("loss.class_weights is a hover-family option; a boundary model's loss "
                         "weighs its terms only (loss.weights)")
    return TSFDLoss(config.weights)


def _boundary_probabilities(out: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {"sem_prob": torch.softmax(out["sem"], dim=1), "boundary_prob": torch.sigmoid(out["boundary"])}


def _boundary_export(model: nn.Module, card: ModelCard, output: Path, check: bool) -> None:
    from models.tsfd.export import export_boundary_onnx

    if card.test_time_augmentation != "none":
        raise ValueError(f"test-time augmentation {card.test_time_augmentation!r} is not built into "
                         "boundary-family graphs; export with tta none")
    export_boundary_onnx(model, card, output, check=check)


def _instance_collate(_: ModelConfig) -> Collate:
    from models.train.panoptic import collate_panoptic

    return collate_panoptic


def _instance_loss(config: LossConfig) -> nn.Module:
    from models.train.panoptic import PanopticLoss

    if config.class_weights is not None:
        raise ValueError("loss.class_weights is a hover-family option; a panoptic model's loss "
                         "weighs its terms only (loss.weights)")
    return PanopticLoss(config.weights)


def _instance_forward(model: nn.Module, batch: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    from models.train.panoptic import panoptic_forward

    return panoptic_forward(model, batch)


def _instance_probabilities(out: Mapping[str, Tensor]) -> dict[str, Tensor]:
    raise ValueError("an instance-family network outputs detections, not probability maps")


def _instance_export(model: nn.Module, card: ModelCard, output: Path, check: bool) -> None:
    from models.panoptic.export import export_instance_onnx

    if card.test_time_augmentation != "none":
        raise ValueError(f"test-time augmentation {card.test_time_augmentation!r} is not built into "
                         "instance-family graphs; export with tta none")
    export_instance_onnx(model, card, output, check=check)


def _hover_onnx_init(model: nn.Module, path: Path, card: ModelCard) -> None:
    load_onnx_weights(model, path, input_size=card.input_size, typed=bool(card.classes),
                      tta=card.test_time_augmentation)


def _instance_onnx_init(model: nn.Module, path: Path, _card: ModelCard) -> None:
    # the card's 32-px tile is a grid unit, not the detector's input: check on a whole patch
    load_instance_onnx_weights(model, path)


def _instance_builders() -> Mapping[str, Callable[..., nn.Module]]:
    try:
        from models.panoptic.builder import BUILDERS
    except ImportError:  # torchvision missing: the family trains nothing, the others still do
        return {}
    return BUILDERS


FAMILIES: dict[str, TrainingFamily] = {
    "hover": TrainingFamily("hover", HOVER_BUILDERS, _hover_collate, _hover_loss, ("np", "hv"),
                            _hover_probabilities, _hover_export, stride=16, onnx_init=_hover_onnx_init),
    "boundary": TrainingFamily("boundary", BOUNDARY_BUILDERS, _boundary_collate, _boundary_loss,
                               ("sem", "boundary"), _boundary_probabilities, _boundary_export,
                               stride=32, onnx_init=None),
    # ``logits`` names no tensor: the network returns loss terms in training, detections in eval
    "instance": TrainingFamily("instance", _instance_builders(), _instance_collate, _instance_loss,
                               ("boxes", "scores", "classes", "masks"), _instance_probabilities,
                               _instance_export, stride=32, onnx_init=_instance_onnx_init,
                               forward=_instance_forward),
}
"""Family name → how it trains. Architecture names are unique across families."""


def family_of(architecture: str) -> TrainingFamily:
    """The family whose builders know ``architecture`` (ValueError naming the known ones)."""
    for family in FAMILIES.values():
        if architecture in family.builders:
            return family
    known = sorted(name for family in FAMILIES.values() for name in family.builders)
    raise ValueError(f"unknown architecture {architecture!r}; known: {known}")


def training_family(config: TrainConfig) -> TrainingFamily:
    """The family a run trains: its card's, which must be its architecture's.

    Raises
    ------
    ValueError
        Unknown architecture, or an architecture of another family than ``card.family``.
    """
    family = family_of(config.model.architecture)
    if family.name != config.card.family:
        raise ValueError(f"architecture {config.model.architecture!r} is a {family.name}-family "
                         f"network but the card says family {config.card.family!r}; set "
                         f"card.family: {family.name}")
    return family
