"""Refitting a model's class layer: the 1x1 type convolution is found in the exported graph and
replaced exactly; the refit learns planted classes from labelled pixels; segmentation outputs
stay bit-for-bit those of the original model; a temperature fitted on over-confident logits is
recovered; point labels cover a disk around each point."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models.card import ClassInfo, ModelCard, read_card
from models.conic import build_conic_tiny
from models.export import export_onnx
from models.train.refit import RefitOptions, refit_model
from models.train.type_head import (
    LabelledPixels,
    feature_session,
    fit_temperature,
    image_features,
    point_pixels,
    read_type_head,
    refit_type_head,
    write_type_head,
)

CLASSES = (ClassInfo(name="background", colour=(0, 0, 0)), ClassInfo(name="inflammatory", colour=(0, 200, 0)),
           ClassInfo(name="epithelial", colour=(200, 0, 0)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = build_conic_tiny(3, margin=8).eval()
    card = ModelCard(name="tiny", architecture="conic-tiny", input_size=64, output_size=48, mpp=0.5,
                     classes=CLASSES)
    return export_onnx(net, card, tmp_path_factory.mktemp("tiny") / "tiny.onnx")


def _run(path: Path | bytes, image: np.ndarray) -> dict[str, np.ndarray]:
    source = path if isinstance(path, bytes) else str(path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"image": image})
    return {o.name: v for o, v in zip(session.get_outputs(), outputs, strict=True)}


def test_the_type_layer_is_found_and_replaced_exactly(tiny: Path) -> None:
    model = onnx.load(str(tiny))
    head = read_type_head(model)
    assert head.weight.shape == (3, 4) and head.bias.shape == (3,)
    rng = np.random.default_rng(1)
    weight = rng.normal(size=head.weight.shape).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    refit = write_type_head(model, weight, bias)
    image = rng.uniform(0, 255, (2, 3, 64, 64)).astype(np.float32)
    before, after = _run(tiny, image), _run(refit.SerializeToString(), image)
    np.testing.assert_array_equal(before["np_prob"], after["np_prob"])
    np.testing.assert_array_equal(before["hv"], after["hv"])
    assert not np.allclose(before["tp_prob"], after["tp_prob"])
    # the probe reads the layer's input features, one vector per output pixel
    _, session = feature_session(tiny, threads=1)
    rgb = image[0].transpose(1, 2, 0)[8:56, 8:56]
    feats = image_features(session, np.ascontiguousarray(rgb).astype(np.uint8), input_size=64, output_size=48)
    assert feats.shape == (4, 48, 48)
    with pytest.raises(ValueError, match="type head is"):
        write_type_head(model, weight[:2], bias[:2])


def test_the_refit_learns_planted_classes_and_l2_holds_it_back(tiny: Path) -> None:
    head = read_type_head(onnx.load(str(tiny)))
    rng = np.random.default_rng(2)
    planted = rng.normal(size=(3, 4)) * 3
    x = rng.normal(size=(3000, 4)).astype(np.float32)
    y = np.argmax(x @ planted.T, axis=1)
    pixels = LabelledPixels(x, y, np.ones(len(y), np.float32))
    weight, bias = refit_type_head(head, pixels, l2=1e-4)
    assert (np.argmax(x @ weight.T + bias, axis=1) == y).mean() > 0.95
    held, _ = refit_type_head(head, pixels, l2=1e3)
    assert np.abs(held - head.weight).max() < 0.05


def test_a_temperature_undoes_over_confidence() -> None:
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(3, 4))
    x = rng.normal(size=(20000, 4))
    logits = x @ weight.T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=p) for p in probs])  # calibrated at T = 1 for ``weight``
    pixels = LabelledPixels(x.astype(np.float32), y, np.ones(len(y), np.float32))
    assert fit_temperature(weight * 3, np.zeros(3), pixels) == pytest.approx(3.0, rel=0.1)


def test_points_label_a_disk_and_skip_points_outside() -> None:
    feats = np.arange(2 * 20 * 30, dtype=np.float16).reshape(2, 20, 30)
    xy = np.array([[10.0, 5.0], [100.0, 100.0]])
    got = point_pixels(feats, xy, np.array([2, 1]), radius_px=2.0, per_point=100,
                       rng=np.random.default_rng(0))
    assert got.labels.tolist() == [2] * 13  # the 13 pixels within 2 px of (10, 5)
    flat = got.features[:, 0].astype(int)
    rows, cols = flat // 30, flat % 30
    assert ((rows - 5) ** 2 + (cols - 10) ** 2 <= 4).all()


def test_refit_model_writes_a_carded_copy_with_the_same_segmentation(tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "points"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(4)
    image = rng.integers(0, 255, (90, 100, 3), dtype=np.uint8)
    cv2.imwrite(str(folder / "images" / "a.png"), image[..., ::-1])
    np.savez(folder / "points.npz", names=np.array(["a"]), split=np.array(["train"]), mpp=np.float32(0.5),
             class_names=np.array(["background", "lymphocyte", "tumour", "stromal"]),
             a_xy=rng.uniform(5, 85, (40, 2)).astype(np.float32),
             a_cls=rng.integers(1, 4, 40).astype(np.int8))
    out = tmp_path / "refit.onnx"
    card = refit_model(tiny, out, RefitOptions(points=(folder,)),
                       card_updates={"name": "tiny-refit", "version": "2"})
    assert card.name == "tiny-refit" and read_card(out).name == "tiny-refit"
    batch = rng.uniform(0, 255, (1, 3, 64, 64)).astype(np.float32)
    before, after = _run(tiny, batch), _run(out, batch)
    np.testing.assert_array_equal(before["np_prob"], after["np_prob"])
    np.testing.assert_array_equal(before["hv"], after["hv"])
