"""Exported panoptic graphs of untyped cards and of tiles without nuclei."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.panoptic import check_instance_onnx, export_instance_onnx
from tests.models.panoptic._cases import card, tiny


@pytest.mark.slow
def test_the_export_check_accepts_its_own_file_and_an_untyped_card_gives_class_1(tmp_path: Path) -> None:
    path = export_instance_onnx(tiny(seed=1), card(typed=False), tmp_path / "untyped.onnx")
    outputs = check_instance_onnx(path, card(typed=False))
    assert len(outputs["classes"]) > 0 and set(outputs["classes"].tolist()) == {1}


@pytest.mark.slow
def test_a_graph_finding_nothing_answers_empty_outputs_of_the_contract_shapes(tmp_path: Path) -> None:
    # a background tile: no box clears the score threshold
    path = export_instance_onnx(tiny(seed=1, score_threshold=0.999), card(), tmp_path / "empty.onnx")
    outputs = check_instance_onnx(path, card())
    assert {k: v.shape for k, v in outputs.items()} == {
        "boxes": (0, 4), "scores": (0,), "classes": (0,), "masks": (0, 1, 28, 28)}
