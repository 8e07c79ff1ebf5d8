"""ConicNet: output contract, builders, and ONNX export agreeing with PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.card import ClassInfo, ModelCard
from models.conic import BUILDERS, ConicNet, CoordAttention, SEResBlock, build_conic, build_conic_tiny
from models.export import export_onnx


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def _image(batch: int, size: int) -> torch.Tensor:
    return torch.rand(batch, 3, size, size) * 255.0


def test_forward_returns_np_hv_tp_logits_at_input_size() -> None:
    model = build_conic_tiny(5).eval()
    with torch.no_grad():
        out = model(_image(2, 64))
    assert set(out) == {"np", "hv", "tp"}
    assert out["np"].shape == (2, 2, 64, 64)
    assert out["hv"].shape == (2, 2, 64, 64)
    assert out["tp"].shape == (2, 5, 64, 64)
    assert all(torch.isfinite(t).all() for t in out.values())


def test_default_model_forward_is_finite() -> None:
    model = build_conic(5).eval()
    with torch.no_grad():
        out = model(_image(1, 96))
    assert out["tp"].shape == (1, 5, 96, 96)
    assert all(torch.isfinite(t).all() for t in out.values())


def test_margin_crops_the_centre_of_the_full_output() -> None:
    model = build_conic_tiny(5).eval()
    image = _image(1, 64)
    with torch.no_grad():
        full = model(image)
        model.margin = 8
        cropped = model(image)
    assert cropped["np"].shape == (1, 2, 48, 48)
    torch.testing.assert_close(cropped["hv"], full["hv"][:, :, 8:-8, 8:-8])


def test_untyped_model_has_no_tp_output() -> None:
    with torch.no_grad():
        out = build_conic_tiny(0).eval()(_image(1, 32))
    assert set(out) == {"np", "hv"}


@pytest.mark.parametrize("kwargs", [{"n_classes": 1}, {"margin": -1}, {"widths": (8, 8, 8)}])
def test_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ConicNet(**kwargs)


def test_builders_registry_names_every_builder() -> None:
    assert {"conic", "conic-wide", "conic-small", "conic-tiny"} <= set(BUILDERS)
    for build in BUILDERS.values():
        assert isinstance(build(5), ConicNet)


def test_blocks_keep_or_halve_resolution() -> None:
    x = torch.rand(2, 8, 16, 16)
    assert SEResBlock(8, 12, stride=2)(x).shape == (2, 12, 8, 8)
    assert SEResBlock(8, 8)(x).shape == (2, 8, 16, 16)
    assert CoordAttention(8)(x).shape == x.shape
    with pytest.raises(ValueError):
        SEResBlock(8, 8, stride=3)


def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    model = build_conic_tiny(5, margin=8).eval()
    card = ModelCard(
        name="tiny",
        input_size=64,
        output_size=48,
        mpp=0.5,
        classes=tuple(ClassInfo(name=n, colour=(i, i, i)) for i, n in enumerate("abcde")),
    )
    path = export_onnx(model, card, tmp_path / "tiny.onnx")
    image = _image(2, 64)
    with torch.no_grad():
        ref = model(image)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np_prob, hv, tp_prob = session.run(["np_prob", "hv", "tp_prob"], {"image": image.numpy()})
    np.testing.assert_allclose(np_prob, torch.softmax(ref["np"], 1)[:, 1:2].numpy(), atol=1e-4)
    np.testing.assert_allclose(hv, ref["hv"].numpy(), atol=1e-4)
    np.testing.assert_allclose(tp_prob, torch.softmax(ref["tp"], 1).numpy(), atol=1e-4)
    assert np_prob.shape == (2, 1, 48, 48)
