"""ONNX export of the panoptic network under the ``instance`` family contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.card import read_card
from models.errors import ExportError
from models.families import contract
from models.panoptic import INSTANCE_OUTPUTS, InstanceHead, export_instance_onnx
from models.panoptic.export import _validate
from tests.models.panoptic._cases import card, disc_image, disc_map, tiny


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = tiny(num_classes=3, seed=3)
    path = export_instance_onnx(model, card(typed=True), tmp_path_factory.mktemp("onnx") / "panoptic.onnx")
    return model, path


def _run(path: Path, image: torch.Tensor) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": image.numpy()}), strict=True))


@pytest.mark.slow
def test_the_graph_has_exactly_the_family_outputs_with_their_dtypes_and_ranks(exported) -> None:
    _, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    outputs = session.get_outputs()
    assert tuple(o.name for o in outputs) == INSTANCE_OUTPUTS == contract("instance").outputs
    types = {o.name: (o.type, len(o.shape)) for o in outputs}
    assert types == {"boxes": ("tensor(float)", 2), "scores": ("tensor(float)", 1),
                     "classes": ("tensor(int64)", 1), "masks": ("tensor(float)", 4)}
    assert read_card(path).family == "instance"


@pytest.mark.slow
@pytest.mark.parametrize(("height", "width"), [(256, 256), (150, 170)])
def test_onnx_runtime_matches_pytorch_on_a_reference_image(exported, height: int, width: int) -> None:
    model, path = exported
    image = disc_image(disc_map(height, width), seed=5)
    with torch.no_grad():
        expected = [t.numpy() for t in InstanceHead(model.eval())(image)]
    got = _run(path, image)
    assert len(expected[1]) > 0, "the reference image must give detections"
    for name, want in zip(INSTANCE_OUTPUTS, expected, strict=True):
        assert got[name].shape == want.shape, name
    # detections of equal score may come in either order: pair each with its nearest box
    distance = np.abs(got["boxes"][:, None, :] - expected[0][None, :, :]).max(axis=2)
    pair = distance.argmin(axis=1)
    assert sorted(pair.tolist()) == list(range(len(pair))), "not one-to-one"
    np.testing.assert_allclose(got["boxes"], expected[0][pair], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["scores"], expected[1][pair], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(got["classes"], expected[2][pair])
    np.testing.assert_allclose(got["masks"], expected[3][pair], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["scores"], expected[1], atol=1e-4, rtol=0)  # the order by score
    assert got["boxes"][:, 2].max() <= width and got["boxes"][:, 3].max() <= height


def test_a_card_of_another_family_or_class_count_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="family"):
        export_instance_onnx(tiny(), card().model_copy(update={"family": "hover"}), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="classes"):
        export_instance_onnx(tiny(num_classes=2), card(typed=True), tmp_path / "x.onnx")


def test_outputs_breaking_the_contract_are_reported() -> None:
    good = {"boxes": np.zeros((2, 4), np.float32), "scores": np.array([0.9, 0.5], np.float32),
            "classes": np.array([1, 2], np.int64), "masks": np.zeros((2, 1, 28, 28), np.float32)}
    _validate(good, 2, "ok.onnx")
    with pytest.raises(ExportError, match="descending"):
        _validate({**good, "scores": np.array([0.5, 0.9], np.float32)}, 2, "x.onnx")
    with pytest.raises(ExportError, match="classes"):
        _validate({**good, "classes": np.array([1, 3], np.int64)}, 2, "x.onnx")
    with pytest.raises(ExportError, match="masks"):
        _validate({**good, "masks": np.zeros((2, 28, 28), np.float32)}, 2, "x.onnx")

