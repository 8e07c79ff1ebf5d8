"""Training validation scores what the card will do: the held-out items post-processed through the
family registry with the card's thresholds and upsampling, so a card that asks for other options
scores differently, and exactly as ``model evaluate`` scores the exported model on the same images.

The network is a torch twin of the ONNX oracle (tests/_synthetic): it decodes exact maps from the
image colours, pixel by pixel, so its whole-image prediction and the exported oracle's tiled one
see the same maps.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from models.card import ModelCard
from models.families import HoverOptions
from models.train.config import TrainConfig
from models.train.data import Item
from models.train.release import card_for
from models.train.validate import summarise
from tests._synthetic import CLASS_LEVELS, CLASSES, build_oracle, draw_ellipses, encode_slide, oracle_card
from worker.evaluation.model import evaluate_model
from worker.evaluation.validation import score_items, validate_items, validate_training

STRICT: Mapping[str, Any] = {"np_threshold": 0.9, "upsample": 2}
"""Class Alpha's nuclei decode to probability 0.78: a 0.9 threshold loses them."""


class TorchOracle(nn.Module):
    """``np``/``hv``/``tp`` logits whose softmax (and hv) are the oracle's maps."""

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        red = image[:, :1]
        foreground = 1.0 - red / 255.0
        tp = torch.cat([-(((red - level) / 15.0) ** 2) for level in CLASS_LEVELS], dim=1)
        return {"np": torch.log(torch.cat([1.0 - foreground, foreground], dim=1)),
                "hv": image[:, 1:3] / 127.5 - 1.0, "tp": tp}


@pytest.fixture(scope="module")
def items() -> list[Item]:
    found = []
    for k in range(3):
        inst, classes = draw_ellipses((150, 260), 25, seed=20 + k)
        found.append(Item(name=f"syn_{k}", group=f"syn_{k}", source="syn", image=encode_slide(inst, classes),
                          inst=inst, types=classes[inst].astype(np.uint8), mpp=0.25))
    return found


@pytest.fixture(scope="module")
def data(items: list[Item], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same images as a data set ``model evaluate`` reads."""
    path = tmp_path_factory.mktemp("data") / "syn.npz"
    np.savez(path, images=np.stack([i.image for i in items]), inst=np.stack([i.inst for i in items]),
             type_map=np.stack([i.types for i in items]), names=np.array([i.name for i in items]),
             mpp=np.float32(0.25), class_names=np.array([c.name for c in CLASSES]))
    return path


def _card(postprocess: Mapping[str, Any]) -> ModelCard:
    return oracle_card().model_copy(update={"postprocess": dict(postprocess)})


def test_the_cards_options_change_the_held_out_score(items: list[Item]) -> None:
    default = validate_items(TorchOracle(), items, _card({}))
    strict = validate_items(TorchOracle(), items, _card(STRICT))
    assert default["syn/f1_d"] == 1.0 and default["syn/pq"] > 0.95
    assert default["syn/f_c/Alpha"] == default["syn/f_c/Beta"] == 1.0
    assert strict["syn/f1_d"] < 0.8  # Alpha's nuclei are gone, Beta's remain
    assert strict["syn/f_c/Beta"] > 0.95 and strict["syn/f_c/Alpha"] == 0.0
    # Traced on a grid twice as fine and brought back to the item's: the same nuclei, outlines
    # that differ by a few pixels.
    upsampled = validate_items(TorchOracle(), items, _card({"upsample": 2}))
    assert upsampled["syn/f1_d"] == 1.0 and 0.9 < upsampled["syn/pq"] < default["syn/pq"]


@pytest.mark.parametrize("postprocess", [{}, STRICT, {"upsample": 2, "marker_threshold": 0.3}],
                         ids=["card-defaults", "strict-upsampled", "upsampled"])
def test_validation_equals_evaluating_the_exported_model(
    items: list[Item], data: Path, tmp_path: Path, postprocess: Mapping[str, Any]
) -> None:
    card = _card(postprocess)
    exported = evaluate_model(build_oracle(tmp_path / "oracle.onnx", card), data)
    assert exported["postprocess"] == postprocess
    held_out = score_items(TorchOracle(), items, card)["syn"]
    for key in ("instance", "detection", "classes"):
        assert held_out[key] == exported[key]
    assert validate_items(TorchOracle(), items, card) == summarise({"syn": exported})


def _config(postprocess: Mapping[str, Any]) -> TrainConfig:
    return TrainConfig.model_validate({
        "data": {"mpp": 0.25},
        "model": {"architecture": "oracle", "n_classes": len(CLASSES)},
        "card": {"name": "oracle", "input_size": 272, "output_size": 256,
                 "classes": [[c.name, list(c.colour)] for c in CLASSES],
                 "postprocess": dict(postprocess)},
    })


def test_the_training_validator_scores_with_the_card_the_config_exports(items: list[Item]) -> None:
    strict = _config(STRICT)
    assert card_for(strict).options == HoverOptions(np_threshold=0.9, upsample=2)
    got = validate_training(TorchOracle(), items, strict)
    assert got == validate_items(TorchOracle(), items, card_for(strict))
    assert got["syn/f1_d"] < validate_training(TorchOracle(), items, _config({}))["syn/f1_d"]


def test_a_network_without_a_type_head_is_scored_untyped(items: list[Item]) -> None:
    class Untyped(TorchOracle):
        def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
            out = super().forward(image)
            del out["tp"]
            return out

    got = validate_items(Untyped(), items, _card({}))
    assert got["syn/f1_d"] == 1.0
    assert not any("/f_c" in key for key in got)


def test_items_off_the_cards_resolution_are_refused(items: list[Item]) -> None:
    coarse = oracle_card(mpp=0.5)
    with pytest.raises(ValueError, match="µm/px"):
        validate_items(TorchOracle(), items, coarse)


def test_validation_leaves_the_network_in_its_mode(items: list[Item]) -> None:
    network = TorchOracle().train()
    validate_items(network, items[:1], _card({}))
    assert network.training


def test_a_card_of_another_family_needs_its_outputs(items: list[Item]) -> None:
    boundary = oracle_card().model_copy(update={"family": "boundary", "postprocess": {}})
    with pytest.raises(ValueError, match="sem_prob"):
        validate_items(TorchOracle(), items, boundary)
