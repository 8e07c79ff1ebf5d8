"""The panoptic network trains and exports through the ordinary tooling: the card's family
(``instance``) picks the network, the targets and training forward, the loss and the export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.card import read_card
from models.panoptic import LOSS_TERMS, PanopticNet
from models.panoptic.export import check_instance_onnx
from models.train.config import REPO_ROOT, TrainConfig, load_config
from models.train.families import FAMILIES, family_of, training_family
from models.train.loop import build_model, run_training
from models.train.panoptic import PanopticLoss, collate_panoptic, panoptic_forward
from models.train.release import card_for, export_trained
from worker.evaluation.validation import validate_training

PANOPTIC = REPO_ROOT / "configs" / "panoptic.yaml"


def _smoke(tmp_path: Path) -> TrainConfig:
    """configs/panoptic.yaml shrunk to 3 steps of the tiny network on four shared images."""
    config = load_config(PANOPTIC)
    data = config.data.model_copy(update={
        "sources": ("tnbc", "monuseg"), "max_items_per_source": 2, "patch_size": 96, "source_weights": {},
        "holdout": ("monuseg_TCGA-21-5786-01Z-00-DX1",)})
    model = config.model.model_copy(update={"architecture": "panoptic-tiny"})
    card = config.card.model_copy(update={"input_size": 96, "output_size": 96})
    return config.model_copy(update={
        "output_dir": tmp_path, "steps": 3, "batch_size": 2, "num_threads": 1, "log_every": 1,
        "checkpoint_every": 3, "data": data, "model": model, "card": card})


def test_the_panoptic_config_is_an_instance_family_run() -> None:
    config = load_config(PANOPTIC)
    assert config.card.family == "instance"
    family = training_family(config)
    assert family is FAMILIES["instance"] and family_of("panoptic-tiny") is family
    assert isinstance(build_model(config.model), PanopticNet)
    assert isinstance(family.loss(config.loss), PanopticLoss)
    assert card_for(config).family == "instance"


def test_panoptic_batches_carry_instance_maps_and_classes_of_typed_patches_only() -> None:
    inst = np.zeros((32, 32), np.int32)
    inst[4:12, 4:12] = 1
    types = np.where(inst > 0, 3, 0).astype(np.uint8)
    image = np.zeros((32, 32, 3), np.uint8)
    batch = collate_panoptic([image, image], [inst, inst], [types, types], [True, False])
    assert set(batch) == {"image", "inst", "types", "typed"}
    assert batch["image"].shape == (2, 3, 32, 32) and batch["inst"].dtype == torch.int64
    assert batch["types"][0].unique().tolist() == [0, 3] and batch["types"][1].unique().tolist() == [0]


@pytest.mark.slow
def test_the_training_forward_gives_the_terms_the_loss_weighs() -> None:
    inst = np.zeros((64, 64), np.int32)
    inst[10:20, 10:22] = 1
    inst[40:52, 30:40] = 2
    image = np.full((64, 64, 3), 200, np.uint8)
    batch = collate_panoptic([image], [inst], [np.zeros((64, 64), np.uint8)], [False])
    torch.manual_seed(0)
    terms = panoptic_forward(build_model(load_config(PANOPTIC).model.model_copy(
        update={"architecture": "panoptic-tiny"})).train(), batch)
    doubled = {**dict.fromkeys(LOSS_TERMS, 1.0), "semantic": 2.0}
    single, logged = PanopticLoss()(terms, batch)
    double, _ = PanopticLoss(doubled)(terms, batch)
    assert set(logged) == set(LOSS_TERMS)
    torch.testing.assert_close(double - single, terms["semantic"])
    with pytest.raises(ValueError, match=r"loss\.weights takes"):
        PanopticLoss({"np_ce": 1.0})


@pytest.mark.slow
def test_panoptic_trains_three_steps_and_exports_an_instance_model(tmp_path: Path) -> None:
    config = _smoke(tmp_path)
    checkpoint = run_training(config, device="cpu", progress=False, validate=validate_training)
    log = [json.loads(line) for line in (config.run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and set(LOSS_TERMS) <= set(r) for r in log)
    # the held-out image is scored through the instance family's post-processing at the end
    scores = [json.loads(line) for line in (config.run_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in scores] == [3]
    assert 0.0 <= scores[0]["monuseg/aji"] <= 1.0 and (config.run_dir / "best.pt").exists()
    output = tmp_path / "panoptic.onnx"
    card = export_trained(checkpoint, output)
    assert card.family == "instance" and read_card(output).name == "hoverserve-panoptic"
    outputs = check_instance_onnx(output, card)
    assert list(outputs) == ["boxes", "scores", "classes", "masks"]


@pytest.mark.slow
def test_a_shipped_instance_model_trains_on_from_its_onnx_file(tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    from models.panoptic import export_instance_onnx
    from tests.models.panoptic._cases import card, tiny

    shipped = export_instance_onnx(tiny(seed=4), card(), tmp_path / "shipped.onnx")
    config = _smoke(tmp_path)
    config = config.model_copy(update={
        "steps": 1, "checkpoint_every": 1, "init_from": shipped,
        "optim": config.optim.model_copy(update={"lr": 1e-12, "weight_decay": 0.0}),
        "data": config.data.model_copy(update={"holdout": ()})})
    checkpoint = run_training(config, device="cpu", progress=False)
    state = torch.load(checkpoint, weights_only=True)["model"]
    graph = {init.name: numpy_helper.to_array(init) for init in onnx.load(str(shipped)).graph.initializer}
    for name in ("backbone.fpn.layer_blocks.0.0.weight", "roi_heads.box_head.fc6.weight",
                 "roi_heads.mask_predictor.fc.weight"):
        np.testing.assert_allclose(state[name].numpy(), graph[f"model.{name}"], atol=1e-6)
