"""A training checkpoint exports to an ONNX file with a complete card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.card import read_card
from models.train.config import REPO_ROOT, load_config
from models.train.from_onnx import load_onnx_weights
from models.train.loop import run_training
from models.train.release import export_trained, load_checkpoint
from service.cli import main


def test_export_trained_writes_contract_onnx_with_card(tmp_path: Path) -> None:
    config = load_config(REPO_ROOT / "configs" / "smoke.yaml")
    config = config.model_copy(
        update={
            "output_dir": tmp_path,
            "steps": 1,
            "data": config.data.model_copy(update={"holdout": ()}),
            "card": config.card.model_copy(update={"input_size": 64, "output_size": 48}),
        }
    )
    checkpoint = run_training(config, device="cpu", progress=False)
    text = (REPO_ROOT / "configs" / "smoke.yaml").read_text().replace("hoverserve-smoke", "renamed")
    (tmp_path / "card.yaml").write_text(text)
    card = export_trained(
        checkpoint,
        tmp_path / "model.onnx",
        metrics={"note": "smoke"},
        postprocess={"np_threshold": 0.45},
        card_from=tmp_path / "card.yaml",
    )
    stored = read_card(tmp_path / "model.onnx")
    assert stored == card
    assert card.mpp == 0.5 and card.margin == 8 and card.metrics == {"note": "smoke"}
    assert card.postprocess == {"np_threshold": 0.45} and card.name == "renamed"
    assert (
        card.architecture == "conic-tiny" and len(card.classes) == 5 and card.classes[0].name == "background"
    )
    assert card.test_time_augmentation == "none"

    # the same weights with test-time augmentation in the graph; fine-tuning can start from it too
    tta = export_trained(checkpoint, tmp_path / "tta.onnx", tta="dihedral")
    assert read_card(tmp_path / "tta.onnx").test_time_augmentation == tta.test_time_augmentation == "dihedral"
    model, _, _ = load_checkpoint(checkpoint)
    load_onnx_weights(model, tmp_path / "tta.onnx", input_size=64, typed=True, tta="dihedral")

    # the command line: measured metrics and corrected card texts go into the file
    (tmp_path / "metrics.json").write_text(json.dumps({"consep": {"pq": 0.5}}))
    argv = ["model", "export", str(checkpoint), "-o", str(tmp_path / "cli.onnx"), "--tta", "flip",
            "--metrics", str(tmp_path / "metrics.json"), "--card-from", str(tmp_path / "card.yaml")]
    assert main(argv) == 0
    cli = read_card(tmp_path / "cli.onnx")
    assert cli.metrics == {"consep": {"pq": 0.5}} and cli.name == "renamed"
    assert cli.test_time_augmentation == "flip"
    (tmp_path / "metrics.json").write_text("[1, 2]")
    assert main(argv) != 0


def test_export_rejects_a_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    import torch

    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a HoVerServe training checkpoint"):
        export_trained(tmp_path / "x.pt", tmp_path / "x.onnx")
