"""Training validation of a detector (the ``instance`` family) scores what its exported graph
scores: each held-out item is one white-framed box, its detections pasted by the card's options,
exactly as ``hoverserve model evaluate`` scores the exported model on the same images.

The network is the ONNX disk detector of tests/_synthetic_instance behind torchvision's
eval-mode interface (one detection dict per image), so any difference is the plumbing's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from models.card import ModelCard
from models.train.data import Item
from tests._synthetic import CLASSES
from tests._synthetic_instance import build_instance_oracle, draw_disks, encode_disk_slide, instance_card
from worker.evaluation.model import evaluate_model
from worker.evaluation.validation import score_items, validate_items

SHAPE = (150, 230)


class TorchDetector(nn.Module):
    """The ONNX disk detector as torchvision detectors answer in eval mode."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.images_seen: list[tuple[int, int]] = []

    def forward(self, image: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        self.images_seen.append((int(image.shape[-2]), int(image.shape[-1])))
        boxes, scores, classes, masks = self.session.run(None, {"image": image.numpy()})
        return [{"boxes": torch.from_numpy(boxes), "scores": torch.from_numpy(scores),
                 "labels": torch.from_numpy(classes), "masks": torch.from_numpy(masks)}]


def _disk_item(k: int) -> Item:
    disks, classes = draw_disks(SHAPE, 30, seed=40 + k)
    rows, cols = np.mgrid[: SHAPE[0], : SHAPE[1]]
    inst = np.zeros(SHAPE, np.int32)
    for label, (row, col, r) in enumerate(disks.tolist(), 1):
        inst[(rows - row) ** 2 + (cols - col) ** 2 <= r * r] = label
    types = np.r_[0, classes][inst].astype(np.uint8)
    return Item(name=f"disks_{k}", group=f"disks_{k}", source="disks",
                image=encode_disk_slide(SHAPE, disks, classes), inst=inst, types=types, mpp=0.25)


def _types(item: Item) -> np.ndarray:
    if item.types is None:
        raise ValueError(f"{item.name} has no class map")
    return item.types


@pytest.fixture(scope="module")
def items() -> list[Item]:
    return [_disk_item(k) for k in range(3)]


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return instance_card(input_size=96, output_size=64)


@pytest.fixture(scope="module")
def oracle(card: ModelCard, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_instance_oracle(tmp_path_factory.mktemp("oracle") / "disks.onnx", card)


def test_every_drawn_disk_is_found_with_its_class(items: list[Item], card: ModelCard, oracle: Path) -> None:
    got = validate_items(TorchDetector(oracle), items, card)
    assert got["disks/f1_d"] == 1.0  # (the masks are 28x28 disks, pasted: AJI stays below 1)
    assert all(got[f"disks/f_c/{c.name}"] == 1.0 for c in CLASSES[1:])


def test_each_item_runs_as_one_white_framed_box_of_whole_tiles(
    items: list[Item], card: ModelCard, oracle: Path
) -> None:
    detector = TorchDetector(oracle)
    validate_items(detector, items[:1], card)
    # 150 x 230 → 192 x 256 (whole 64-px tiles), plus the 16-px margin on each side
    assert detector.images_seen == [(192 + 2 * card.margin, 256 + 2 * card.margin)]


def test_validation_equals_evaluating_the_exported_model(
    items: list[Item], card: ModelCard, oracle: Path, tmp_path: Path
) -> None:
    data = tmp_path / "disks.npz"
    np.savez(data, images=np.stack([i.image for i in items]), inst=np.stack([i.inst for i in items]),
             type_map=np.stack([_types(i) for i in items]), names=np.array([i.name for i in items]),
             mpp=np.float32(0.25), class_names=np.array([c.name for c in CLASSES]))
    exported = evaluate_model(oracle, data)
    held_out = score_items(TorchDetector(oracle), items, card)["disks"]
    for key in ("instance", "detection", "classes"):
        assert held_out[key] == exported[key]


def test_a_detector_finding_nothing_scores_zero(items: list[Item], card: ModelCard, oracle: Path) -> None:
    class Blind(TorchDetector):
        def forward(self, image: torch.Tensor) -> list[dict[str, torch.Tensor]]:
            return [{key: value[:0] for key, value in super().forward(image)[0].items()}]

    assert validate_items(Blind(oracle), items[:1], card)["disks/f1_d"] == 0.0
