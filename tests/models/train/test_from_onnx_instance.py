"""Training a shipped detector further: its weights are read back from its ONNX file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.panoptic import InstanceHead, export_instance_onnx
from models.panoptic.export import reference_image
from models.train.from_onnx import calibrate_batchnorm, load_instance_onnx_weights
from tests.models.panoptic._cases import card, tiny
from tests.models.train._batchnorm import perturb_batchnorms


def _trained_like(seed: int) -> torch.nn.Module:
    """A tiny detector whose trunk BatchNorms hold non-trivial statistics, as after training."""
    model = tiny(seed=seed, score_threshold=0.0)
    # milder than the hover tests' draws: wider ones send the random detector's masks out of 0..1
    perturb_batchnorms(model.backbone.body, mean=(-0.1, 0.1), var=(0.8, 1.25), weight=(0.8, 1.2),
                       bias=(-0.05, 0.05))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_instance_onnx(_trained_like(seed=5), card(), tmp_path_factory.mktemp("onnx") / "det.onnx")


@pytest.mark.slow
def test_the_recovered_detector_finds_what_the_file_finds(exported: Path) -> None:
    fresh = tiny(seed=9, score_threshold=0.0)
    load_instance_onnx_weights(fresh, exported)
    image = reference_image()
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    boxes, scores, _, masks = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        got = [t.numpy() for t in InstanceHead(fresh.eval())(image)]
    assert len(boxes) > 0
    assert got[0].shape == boxes.shape
    # near-tied scores may come out in either order: pair each box with the nearest one
    pair = np.abs(boxes[:, None, :] - got[0][None, :, :]).max(axis=2).argmin(axis=1)
    assert np.abs(got[0][pair] - boxes).max() < 1e-2
    assert np.abs(got[1][pair] - scores).max() < 1e-4
    assert np.abs(got[3][pair] - masks).max() < 1e-3


@pytest.mark.slow
def test_recalibrated_batchnorm_keeps_the_detections(exported: Path) -> None:
    model = tiny(seed=9, score_threshold=0.0)
    load_instance_onnx_weights(model, exported)
    image = reference_image()
    with torch.no_grad():
        before = InstanceHead(model.eval())(image)[1].numpy()
        assert calibrate_batchnorm(model, [image, reference_image(128, 192)]) > 0
        after = InstanceHead(model.eval())(image)[1].numpy()
    assert after.shape == before.shape
    assert np.abs(np.sort(after) - np.sort(before)).max() < 1e-3


def test_a_detector_of_another_shape_is_refused(exported: Path) -> None:
    from models.panoptic.builder import build_panoptic_r18

    with pytest.raises(ValueError, match=r"weight backbone\.fpn\..* in the file"):
        load_instance_onnx_weights(build_panoptic_r18(2), exported)


def test_a_network_without_a_trunk_is_refused(exported: Path) -> None:
    with pytest.raises(ValueError, match="trunk"):
        load_instance_onnx_weights(torch.nn.Conv2d(3, 3, 1), exported)
