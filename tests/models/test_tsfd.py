"""TSFD-Net: colour deconvolution, the network's outputs, and its ONNX export (boundary family)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.card import ClassInfo, ModelCard, read_card
from models.tsfd import TSFDNet, build_tsfd, build_tsfd_tiny, export_boundary_onnx, stain_matrix
from models.tsfd.bifpn import FusionNode
from models.tsfd.deconv import HE_STAIN_VECTORS, ColourDeconvolution
from models.tsfd.efficientnet import EfficientNetFeatures, round_channels

_CLASSES = tuple(
    ClassInfo(name=n, colour=c) for n, c in
    [("background", (0, 0, 0)), ("other", (255, 0, 0)), ("inflammatory", (0, 255, 0)),
     ("epithelial", (0, 0, 255)), ("spindle", (255, 255, 0))]
)


def _card() -> ModelCard:
    return ModelCard(name="tsfd-test", family="boundary", architecture="tsfd-tiny", input_size=64,
                     output_size=48, mpp=0.5, classes=_CLASSES)


def test_stain_matrix_rows_are_unit_h_e_and_their_normal() -> None:
    m = stain_matrix()
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-12)
    h = np.asarray(HE_STAIN_VECTORS[0]) / np.linalg.norm(HE_STAIN_VECTORS[0])
    np.testing.assert_allclose(m[0], h)
    assert abs(m[2] @ m[0]) < 1e-12 and abs(m[2] @ m[1]) < 1e-12


def test_deconvolution_recovers_a_pure_haematoxylin_pixel() -> None:
    # a pixel whose optical density is 0.5·H: concentrations (0.5, 0, 0) up to the OD scale
    od = 0.5 * stain_matrix()[0] * np.log(256.0)
    rgb = 256.0 * np.exp(-od) - 1.0
    image = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1)
    out = ColourDeconvolution()(image)[0, :, 0, 0].numpy()
    np.testing.assert_allclose(out[:3], rgb / 255.0, rtol=1e-6)
    np.testing.assert_allclose(out[3:], [0.5, 0.0, 0.0], atol=1e-5)
    white = ColourDeconvolution()(torch.full((1, 3, 1, 1), 255.0))[0, 3:, 0, 0]
    assert torch.allclose(white, torch.zeros(3), atol=1e-6)


def test_rgb_only_ablation_feeds_three_channels() -> None:
    def stem_channels(net: TSFDNet) -> int:
        trunk = net.backbone.trunk
        assert isinstance(trunk, EfficientNetFeatures)
        return trunk.conv_stem.in_channels

    assert stem_channels(build_tsfd_tiny(5, rgb_only=True)) == 3
    assert stem_channels(build_tsfd_tiny(5)) == 6


def test_efficientnet_compound_scaling_matches_timm_layouts() -> None:
    # channel rounding and the stage channels of timm's efficientnet_b0 / b4 feature_info
    assert round_channels(32, 1.4) == 48 and round_channels(40, 1.4) == 56
    assert EfficientNetFeatures("b0").channels == (16, 24, 40, 112, 320)
    assert EfficientNetFeatures("b4").channels == (24, 32, 56, 160, 448)
    with pytest.raises(ValueError, match="scale"):
        EfficientNetFeatures("b9")


def test_forward_gives_cropped_finite_logits_and_optional_tissue() -> None:
    torch.manual_seed(0)
    net = build_tsfd_tiny(5, margin=8, n_tissues=19).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, 64, 64) * 255)
    assert out["sem"].shape == (1, 5, 48, 48)
    assert out["boundary"].shape == (1, 1, 48, 48)
    assert out["tissue"].shape == (1, 19)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert "tissue" not in build_tsfd_tiny(5).eval()(torch.rand(1, 3, 32, 32) * 255)


@pytest.mark.slow
def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    net = build_tsfd_tiny(3, n_tissues=4)
    out = net(torch.rand(2, 3, 32, 32) * 255)
    (out["sem"].mean() + out["boundary"].mean() + out["tissue"].mean()).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert missing == []


def test_fusion_weights_are_normalised_and_non_negative() -> None:
    node = FusionNode(8, 3)
    with torch.no_grad():
        node.weights.copy_(torch.tensor([2.0, -1.0, 1.0]))
    w = node.fusion_weights().detach()
    assert w[1] == 0 and float(w.sum()) == pytest.approx(1.0, abs=1e-3)


def test_bad_inputs_are_refused() -> None:
    net = build_tsfd_tiny(5)
    with pytest.raises(ValueError, match="multiples of 32"):
        net(torch.zeros(1, 3, 40, 64))
    with pytest.raises(ValueError, match="N×3×H×W"):
        net(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match="n_classes"):
        TSFDNet(1)


def test_default_scale_is_the_cpu_budget_b0() -> None:
    net = build_tsfd(5)
    n = sum(p.numel() for p in net.parameters())
    assert net.backbone.channels == (16, 24, 40, 112, 320)
    assert 3.5e6 < n < 5e6  # about 17 MB of float32 weights: within the 40 MB budget


@pytest.mark.slow
def test_onnx_export_matches_pytorch(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = build_tsfd_tiny(5, margin=8)
    net.eval()
    with torch.no_grad():  # random BatchNorm statistics, so the check is not on identity norms
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    card = _card()
    path = export_boundary_onnx(net, card, tmp_path / "tsfd.onnx")
    assert read_card(path).family == "boundary"

    import onnxruntime as ort

    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 255
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["sem_prob", "boundary_prob"]
    sem, bnd = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        out = net(image)
    np.testing.assert_allclose(sem, torch.softmax(out["sem"], 1).numpy(), atol=1e-4)
    np.testing.assert_allclose(bnd, torch.sigmoid(out["boundary"]).numpy(), atol=1e-4)
    assert sem.shape == (2, 5, 48, 48) and bnd.shape == (2, 1, 48, 48)
    np.testing.assert_allclose(sem.sum(axis=1), 1.0, atol=1e-5)


def test_export_refuses_a_hover_card(tmp_path: Path) -> None:
    card = ModelCard(name="x", input_size=64, output_size=48, mpp=0.5)
    with pytest.raises(ValueError, match="family"):
        export_boundary_onnx(build_tsfd_tiny(5, margin=8), card, tmp_path / "x.onnx")
