"""Fine-tuning a shipped model: trainable weights are recovered from its ONNX file."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.export import OnnxHead, export_onnx
from models.train.config import REPO_ROOT, load_config
from models.train.from_onnx import calibrate_batchnorm, load_onnx_weights
from models.train.loop import build_model, run_training
from models.train.release import card_for
from tests.models.train._batchnorm import perturb_batchnorms

SMOKE = REPO_ROOT / "configs" / "smoke.yaml"


def _trained_like(seed: int) -> torch.nn.Module:
    """A tiny network with non-trivial BatchNorm statistics, as after training."""
    torch.manual_seed(seed)
    model = build_model(load_config(SMOKE).model)
    perturb_batchnorms(model)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = _trained_like(seed=3)
    card = card_for(load_config(SMOKE))
    model.margin = card.margin  # as models.train.export_trained does
    path = export_onnx(model, card, tmp_path_factory.mktemp("onnx") / "m.onnx")
    model.margin = 0
    return model, path


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(
        np.random.default_rng(seed).uniform(0, 255, (n, 3, size, size)).astype(np.float32)
    )


def test_recovered_network_reproduces_the_file(exported: tuple[torch.nn.Module, Path]) -> None:
    original, path = exported
    fresh = build_model(load_config(SMOKE).model)
    load_onnx_weights(fresh, path, input_size=64, typed=True)
    fresh.eval()
    image = _images(2, seed=1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        got = [t.numpy()[..., 8:56, 8:56] for t in OnnxHead(fresh, typed=True)(image)]
        source = [t.numpy()[..., 8:56, 8:56] for t in OnnxHead(original, typed=True)(image)]
    for want, have, before in zip(expected, got, source, strict=True):
        np.testing.assert_allclose(have, want, atol=1e-4)
        np.testing.assert_allclose(have, before, atol=1e-4)


def test_calibration_keeps_eval_outputs_and_matches_batch_statistics(
    exported: tuple[torch.nn.Module, Path],
) -> None:
    _, path = exported
    model = build_model(load_config(SMOKE).model)
    load_onnx_weights(model, path, input_size=64, typed=True)
    image = _images(4, seed=2)
    with torch.no_grad():
        before = model.eval()(image)
        # uncalibrated, train mode normalises every layer afresh: a different function
        drift_raw = (copy.deepcopy(model).train()(image)["np"] - before["np"]).abs().max()
        assert calibrate_batchnorm(model, [image]) > 0
        after = model.eval()(image)
        drift_calibrated = (model.train()(image)["np"] - before["np"]).abs().max()
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-4, rtol=1e-4)
    assert drift_calibrated < 1e-3 < drift_raw


def test_load_refuses_a_file_of_another_architecture(exported: tuple[torch.nn.Module, Path]) -> None:
    _, path = exported
    bigger = build_model(load_config(SMOKE).model.model_copy(update={"architecture": "conic-small"}))
    with pytest.raises(ValueError, match="convolution"):
        load_onnx_weights(bigger, path, input_size=64, typed=True)


def test_training_can_start_from_an_onnx_model(
    tmp_path: Path, exported: tuple[torch.nn.Module, Path]
) -> None:
    original, path = exported
    config = load_config(SMOKE)
    zero_lr = config.optim.model_copy(update={"lr": 1e-12, "weight_decay": 0.0})
    tuned = config.model_copy(
        update={
            "output_dir": tmp_path,
            "steps": 1,
            "init_from": path,
            "optim": zero_lr,
            "data": config.data.model_copy(update={"holdout": ()}),
        }
    )
    checkpoint = run_training(tuned, device="cpu", progress=False)
    model = build_model(config.model)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    image = _images(1, seed=4)
    with torch.no_grad():
        # one train-mode step moved the running statistics a little (momentum 0.1), nothing else
        got = model.eval()(image)["np"].softmax(1)
        want = original(image)["np"].softmax(1)
    assert (got - want).abs().max() < 0.05


def test_training_refuses_an_onnx_model_of_another_architecture(
    tmp_path: Path, exported: tuple[torch.nn.Module, Path]
) -> None:
    _, path = exported
    config = load_config(SMOKE)
    other = config.model_copy(
        update={
            "output_dir": tmp_path,
            "init_from": path,
            "model": config.model.model_copy(update={"architecture": "conic-small"}),
        }
    )
    with pytest.raises(ValueError, match="conic-tiny model"):
        run_training(other, device="cpu", progress=False)
