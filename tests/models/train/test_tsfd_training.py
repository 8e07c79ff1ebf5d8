"""TSFD-Net trains and exports through the ordinary tooling: the card's family (``boundary``)
picks the network, targets, loss, validation post-processing and export; the exported file
runs in the inference path and answers as the PyTorch network does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.card import read_card
from models.train.config import REPO_ROOT, TrainConfig, load_config
from models.train.families import FAMILIES, family_of, training_family
from models.train.loop import build_model, run_training
from models.train.release import card_for, export_trained, load_checkpoint
from models.train.tsfd_losses import TSFDLoss
from models.train.tsfd_targets import boundary_target, collate_boundary
from models.train.validate import predict_outputs
from models.tsfd.export import BoundaryHead
from models.tsfd.net import TSFDNet
from service.cli import main
from worker.evaluation.validation import validate_training
from worker.infer import load_model, predict_maps
from worker.plan import Box

TSFD = REPO_ROOT / "configs" / "tsfd.yaml"


def _smoke(tmp_path: Path, *, holdout: bool = True, **update: object) -> TrainConfig:
    """configs/tsfd.yaml shrunk to a few steps of the tiny network on four shared images."""
    config = load_config(TSFD)
    data = config.data.model_copy(update={
        "sources": ("consep_train", "monuseg"), "max_items_per_source": 2, "patch_size": 64,
        "holdout": ("monuseg_TCGA-21-5786-01Z-00-DX1",) if holdout else (), "source_weights": {}})
    model = config.model.model_copy(update={"architecture": "tsfd-tiny"})
    card = config.card.model_copy(update={"input_size": 64, "output_size": 32})
    return config.model_copy(update={
        "output_dir": tmp_path, "steps": 3, "batch_size": 2, "num_threads": 1, "log_every": 1,
        "checkpoint_every": 3, "eval_every": 0, "data": data, "model": model, "card": card,
        **update})


def test_the_tsfd_config_is_a_boundary_family_run() -> None:
    config = load_config(TSFD)
    assert config.card.family == "boundary"
    family = training_family(config)
    assert family is FAMILIES["boundary"] and family_of("tsfd-tiny") is family
    assert isinstance(build_model(config.model), TSFDNet)
    assert isinstance(family.loss(config.loss), TSFDLoss)
    assert card_for(config).family == "boundary"


def test_a_card_of_another_family_than_the_architecture_is_refused(tmp_path: Path) -> None:
    config = _smoke(tmp_path)
    wrong = config.model_copy(update={"card": config.card.model_copy(update={"family": "hover"})})
    with pytest.raises(ValueError, match=r"card\.family: boundary"):
        run_training(wrong, device="cpu", progress=False)
    assert not wrong.run_dir.exists()
    with pytest.raises(ValueError, match="unknown architecture"):
        family_of("tsfd-huge")
    hover_weights = config.loss.model_copy(update={"weights": {"np_ce": 1.0}})
    with pytest.raises(ValueError, match=r"loss\.weights takes"):
        run_training(config.model_copy(update={"loss": hover_weights}), device="cpu", progress=False)
    assert not config.run_dir.exists()


def test_boundary_batches_carry_semantic_and_boundary_targets() -> None:
    inst = np.zeros((8, 8), np.int32)
    inst[1:5, 1:5] = 1
    types = np.where(inst > 0, 3, 0).astype(np.uint8)
    image = np.zeros((8, 8, 3), np.uint8)
    batch = collate_boundary([image, image], [inst, inst], [types, types], [True, False], n_classes=5)
    assert set(batch) == {"image", "sem", "boundary", "typed"}
    assert batch["image"].shape == (2, 3, 8, 8)
    assert batch["sem"][0].unique().tolist() == [0, 3]  # the nucleus keeps its class
    assert batch["sem"][1].unique().tolist() == [0, 1]  # untyped data: foreground only
    np.testing.assert_array_equal(batch["boundary"][1].numpy(), boundary_target(inst))
    assert batch["typed"].tolist() == [True, False]


def test_loss_weights_scale_the_terms() -> None:
    torch.manual_seed(0)
    outputs = {"sem": torch.randn(2, 3, 8, 8), "boundary": torch.randn(2, 1, 8, 8)}
    batch = {"sem": torch.randint(0, 3, (2, 8, 8)), "boundary": torch.randint(0, 2, (2, 8, 8)),
             "typed": torch.tensor([True, False])}
    total, terms = TSFDLoss({"semantic": 2.0, "boundary": 0.5})(outputs, batch)
    assert float(total) == pytest.approx(2.0 * terms["semantic"] + 0.5 * terms["boundary"], rel=1e-5)


@pytest.mark.slow
def test_tsfd_trains_validates_and_exports_a_boundary_model(tmp_path: Path) -> None:
    config = _smoke(tmp_path)
    checkpoint = run_training(config, device="cpu", progress=False, validate=validate_training)
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == 3
    log = [json.loads(line) for line in (checkpoint.parent / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(np.isfinite(r[k]) for r in log for k in ("loss", "semantic", "boundary"))
    # held-out scoring went through the boundary runner with the card's options
    assert {"monuseg/pq", "monuseg/aji", "monuseg/f1_d"} <= set(state["metrics"])
    assert (checkpoint.parent / "best.pt").is_file()

    output = tmp_path / "tsfd.onnx"
    card = export_trained(checkpoint, output)
    stored = read_card(output)
    assert stored == card and stored.family == "boundary" and stored.architecture == "tsfd-tiny"
    assert stored.postprocess == {"fg_threshold": 0.5, "boundary_threshold": 0.5}
    assert len(stored.classes) == 5 and stored.margin == 16
    assert "monuseg/pq" in stored.metrics

    # ONNX = PyTorch on a reference batch (the exported head: softmax / sigmoid, centre crop)
    net, _, _ = load_checkpoint(checkpoint)
    assert isinstance(net, TSFDNet)
    net.margin = card.margin
    generator = torch.Generator().manual_seed(1)
    batch = torch.rand(2, 3, 64, 64, generator=generator) * 255
    with torch.no_grad():
        sem, bnd = BoundaryHead(net)(batch)
    model = load_model(output, device="cpu")
    got = model.predict(batch.numpy())
    np.testing.assert_allclose(got["sem_prob"], sem.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["boundary_prob"], bnd.numpy(), atol=1e-4, rtol=0)

    # the inference path stitches the family's maps
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    maps_box = Box(0, 0, 64, 64)
    maps = predict_maps(model, image, maps_box.grow(card.margin), maps_box)
    assert maps.arrays["sem_prob"].shape == (5, 64, 64)
    assert maps.arrays["boundary_prob"].shape == (64, 64)
    assert np.isfinite(maps.arrays["sem_prob"]).all()
    np.testing.assert_allclose(maps.arrays["sem_prob"].sum(axis=0), 1.0, atol=1e-4)

    with pytest.raises(ValueError, match="test-time augmentation"):
        export_trained(checkpoint, tmp_path / "tta.onnx", tta="flip")

    # the command line writes the same kind of file
    assert main(["model", "export", str(checkpoint), "-o", str(tmp_path / "cli.onnx")]) == 0
    assert read_card(tmp_path / "cli.onnx").family == "boundary"


def test_validation_predicts_whole_items_under_the_graph_output_names() -> None:
    net = build_model(load_config(TSFD).model.model_copy(update={"architecture": "tsfd-tiny"}))
    net.eval()
    image = np.full((50, 70, 3), 200, np.uint8)  # sides no multiple of 32: padded, then cut back
    out = predict_outputs(net, image, "boundary")
    assert set(out) == {"sem_prob", "boundary_prob"}
    assert out["sem_prob"].shape == (1, 5, 50, 70) and out["boundary_prob"].shape == (1, 1, 50, 70)
    with pytest.raises(ValueError, match="no training family"):
        predict_outputs(net, image, "no-such-family")


@pytest.mark.slow
def test_loader_workers_leave_the_dropout_draws_alone(tmp_path: Path) -> None:
    # TSFD-Net trains with spatial dropout: starting the loader processes must not shift its draws
    config = _smoke(tmp_path, holdout=False, steps=2)
    assert config.model.options["dropout"] > 0
    inline = run_training(config, device="cpu", progress=False)
    workers = run_training(_smoke(tmp_path / "w", holdout=False, steps=2, loader_workers=2),
                           device="cpu", progress=False)
    a = torch.load(inline, weights_only=True)["model"]
    b = torch.load(workers, weights_only=True)["model"]
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, atol=0, rtol=0)
