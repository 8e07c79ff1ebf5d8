"""ONNX export: the model contract, the embedded card, and agreement with PyTorch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn

from models.card import CARD_METADATA_KEY, ClassInfo, ModelCard, read_card
from models.errors import ExportError
from models.export import OnnxHead, check_onnx, export_onnx
from models.hovernet import hovernet_fast

# A fast-mode HoVer-Net works at any multiple of 8 (out = in - 92): 128 keeps these tests cheap;
# the official 256 → 164 is exercised end to end in test_importer.
SIZE_IN, SIZE_OUT = 128, 36
PANNUKE_LIKE = tuple(
    ClassInfo(name=n, colour=(40 * i, 255 - 40 * i, 7 * i))
    for i, n in enumerate(["Background", "A", "B", "C", "D", "E"])
)


def random_weights(net: nn.Module, *, seed: int) -> nn.Module:
    """Weights in a range where activations neither vanish nor explode (see test_hovernet)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in net.state_dict().items():
        shape = tuple(value.shape)
        if key.endswith(("num_batches_tracked", "unpool_mat")):
            state[key] = value
        elif len(shape) == 4:
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith(("running_var", ".weight")):
            state[key] = 0.5 + torch.rand(shape, generator=gen)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=gen)
    net.load_state_dict(state)
    return net.eval()


def card_for(classes: tuple[ClassInfo, ...], *, size_in: int = SIZE_IN,
             size_out: int = SIZE_OUT) -> ModelCard:
    return ModelCard(
        name="test-net", architecture="hovernet-fast", input_size=size_in, output_size=size_out,
        mpp=0.25, classes=classes, postprocess={"np_threshold": 0.5},
    )


def random_image(batch: int, size: int, seed: int) -> Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255


def run_onnx(path: Path, image: Tensor) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": image.numpy()}), strict=True))


def expected_outputs(net: nn.Module, image: Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        logits = net(image)
    out = {
        "np_prob": torch.softmax(logits["np"], dim=1)[:, 1:2].numpy(),
        "hv": logits["hv"].numpy(),
    }
    if "tp" in logits:
        out["tp_prob"] = torch.softmax(logits["tp"], dim=1).numpy()
    return out


class Exported:
    """A network, its card, its ONNX file and one ONNX Runtime session on it."""

    def __init__(self, net: nn.Module, card: ModelCard, path: Path) -> None:
        self.net, self.card, self.path = net, card, path
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(self, image: Tensor) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(None, {"image": image.numpy()}), strict=True))


# The HoVer-Net exports skip export_onnx's own check run (the tests below do more); the
# check itself is exercised on TinyHover further down.
@pytest.fixture(scope="module")
def typed_export(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    net = random_weights(hovernet_fast(6), seed=11)
    card = card_for(PANNUKE_LIKE)
    path = export_onnx(net, card, tmp_path_factory.mktemp("typed") / "m.onnx", check=False)
    return Exported(net, card, path)


@pytest.fixture(scope="module")
def untyped_export(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    net = random_weights(hovernet_fast(None), seed=12)
    card = card_for(())
    path = export_onnx(net, card, tmp_path_factory.mktemp("untyped") / "m.onnx", check=False)
    return Exported(net, card, path)


# --------------------------------------------------------------------------- contract


def test_typed_graph_has_contract_names_and_dynamic_batch(typed_export: Exported) -> None:
    graph = onnx.load(str(typed_export.path), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["image"]
    assert [o.name for o in graph.output] == ["np_prob", "hv", "tp_prob"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == [3, SIZE_IN, SIZE_IN]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_typed_onnx_equals_pytorch_for_a_batch(typed_export: Exported) -> None:
    image = random_image(2, SIZE_IN, seed=5)  # batch 2: the batch axis is dynamic
    got, want = typed_export.run(image), expected_outputs(typed_export.net, image)
    assert set(got) == {"np_prob", "hv", "tp_prob"}
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-4)
    assert got["np_prob"].shape == (2, 1, SIZE_OUT, SIZE_OUT)
    assert got["hv"].shape == (2, 2, SIZE_OUT, SIZE_OUT)
    assert got["tp_prob"].shape == (2, 6, SIZE_OUT, SIZE_OUT)
    np.testing.assert_allclose(got["tp_prob"].sum(axis=1), 1.0, atol=1e-5)
    # a meaningful comparison: probabilities are spread, not saturated at 0 or 1
    np_prob = got["np_prob"]
    assert np_prob.std() > 0.05 and 0.01 < np_prob.min() < np_prob.max() < 0.99


def test_card_is_embedded_and_readable(typed_export: Exported) -> None:
    assert read_card(typed_export.path) == typed_export.card
    proto = onnx.load(str(typed_export.path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props[CARD_METADATA_KEY])["classes"][1]["name"] == "A"


def test_untyped_onnx_equals_pytorch(untyped_export: Exported) -> None:
    image = random_image(1, SIZE_IN, seed=8)
    got, want = untyped_export.run(image), expected_outputs(untyped_export.net, image)
    assert list(got) == ["np_prob", "hv"]
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-4)
    assert got["np_prob"].shape == (1, 1, SIZE_OUT, SIZE_OUT)
    assert read_card(untyped_export.path).classes == ()


def test_export_restores_training_flag(tmp_path: Path) -> None:
    net = TinyHover(types=0).train()
    export_onnx(net, card_for((), size_in=16, size_out=12), tmp_path / "t.onnx")
    assert net.training


# --------------------------------------------------------------------------- errors


class TinyHover(nn.Module):
    """A cheap network following the contract (valid 5×5 conv: 16 → 12)."""

    def __init__(self, *, types: int, drop: str | None = None, np_ch: int = 2) -> None:
        super().__init__()
        self.np = nn.Conv2d(3, np_ch, 5)
        self.hv = nn.Conv2d(3, 2, 5)
        self.tp = nn.Conv2d(3, types, 5) if types else None
        self.drop = drop

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        x = image / 255.0
        out = {"np": self.np(x), "hv": self.hv(x)}
        if self.tp is not None:
            out["tp"] = self.tp(x)
        if self.drop:
            del out[self.drop]
        return out


def test_generic_network_exports(tmp_path: Path) -> None:
    net = TinyHover(types=3).eval()
    classes = PANNUKE_LIKE[:3]
    card = card_for(classes, size_in=16, size_out=12)
    path = export_onnx(net, card, tmp_path / "t.onnx")
    assert set(check_onnx(path, card, batch=2)) == {"np_prob", "hv", "tp_prob"}
    image = random_image(3, 16, seed=1)
    got, want = run_onnx(path, image), expected_outputs(net, image)
    for name in ("np_prob", "hv", "tp_prob"):
        np.testing.assert_allclose(got[name], want[name], atol=1e-5)


def test_onnx_head_maps_logits_to_probabilities() -> None:
    net = TinyHover(types=3).eval()
    image = random_image(1, 16, seed=2)
    with torch.no_grad():
        np_prob, hv, tp_prob = OnnxHead(net, typed=True)(image)
        logits = net(image)
    torch.testing.assert_close(np_prob, torch.sigmoid(logits["np"][:, 1:2] - logits["np"][:, :1]))
    torch.testing.assert_close(hv, logits["hv"])
    torch.testing.assert_close(tp_prob.sum(dim=1), torch.ones(1, 12, 12))


def test_missing_head_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'np' and 'hv'"):
        export_onnx(TinyHover(types=0, drop="hv"), card_for((), size_in=16, size_out=12),
                    tmp_path / "t.onnx")


def test_card_and_model_must_agree_on_types(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="card is typed"):
        export_onnx(TinyHover(types=0), card_for(PANNUKE_LIKE[:3], size_in=16, size_out=12),
                    tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="card is untyped"):
        export_onnx(TinyHover(types=3), card_for((), size_in=16, size_out=12),
                    tmp_path / "b.onnx")


def test_check_rejects_outputs_that_disagree_with_the_card(tmp_path: Path) -> None:
    # the network yields 12×12 but the card promises 10×10
    with pytest.raises(ExportError, match="np_prob has shape"):
        export_onnx(TinyHover(types=0), card_for((), size_in=16, size_out=10),
                    tmp_path / "t.onnx")
    # four type channels, three classes on the card
    with pytest.raises(ExportError, match="tp_prob"):
        export_onnx(TinyHover(types=4), card_for(PANNUKE_LIKE[:3], size_in=16, size_out=12),
                    tmp_path / "u.onnx")


def test_check_rejects_an_unrunnable_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ExportError, match="ONNX Runtime"):
        check_onnx(bad, card_for((), size_in=16, size_out=12))


def test_missing_output_folder_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        export_onnx(TinyHover(types=0), card_for((), size_in=16, size_out=12),
                    tmp_path / "nowhere" / "t.onnx")


# --------------------------------------------------------------------------- test-time augmentation


def _tta_export(tmp_path: Path, tta: str) -> tuple[TinyHover, Path]:
    torch.manual_seed(5)
    net = TinyHover(types=3).eval()
    card = card_for(PANNUKE_LIKE[:3], size_in=16, size_out=12).model_copy(
        update={"test_time_augmentation": tta}
    )
    return net, export_onnx(net, card, tmp_path / f"{tta}.onnx")


def test_dihedral_tta_makes_the_model_equivariant(tmp_path: Path) -> None:
    # Averaging over the 8 symmetries of the square makes the prediction on a flipped or rotated
    # patch the flipped or rotated prediction, with HV distances mapped like vectors; a network
    # alone is not (TinyHover's kernels are random).
    _, path = _tta_export(tmp_path, "dihedral")
    image = random_image(2, 16, seed=3)
    base = run_onnx(path, image)
    flipped = run_onnx(path, image.flip(3))
    np.testing.assert_allclose(flipped["np_prob"], base["np_prob"][..., ::-1], atol=1e-5)
    np.testing.assert_allclose(flipped["tp_prob"], base["tp_prob"][..., ::-1], atol=1e-5)
    np.testing.assert_allclose(flipped["hv"][:, 0], -base["hv"][:, 0, :, ::-1], atol=1e-5)
    np.testing.assert_allclose(flipped["hv"][:, 1], base["hv"][:, 1, :, ::-1], atol=1e-5)
    transposed = run_onnx(path, image.transpose(2, 3).contiguous())
    np.testing.assert_allclose(transposed["np_prob"], base["np_prob"].swapaxes(2, 3), atol=1e-5)
    np.testing.assert_allclose(transposed["hv"][:, 0], base["hv"][:, 1].swapaxes(1, 2), atol=1e-5)
    np.testing.assert_allclose(transposed["hv"][:, 1], base["hv"][:, 0].swapaxes(1, 2), atol=1e-5)


def test_flip_tta_averages_the_four_flipped_predictions(tmp_path: Path) -> None:
    net, path = _tta_export(tmp_path, "flip")
    image = random_image(3, 16, seed=4)
    got = run_onnx(path, image)
    want = {"np_prob": 0.0, "hv": 0.0, "tp_prob": 0.0}
    for flip_x in (False, True):
        for flip_y in (False, True):
            axes = [3] * flip_x + [2] * flip_y
            out = expected_outputs(net, image.flip(axes) if axes else image)
            back = {k: np.flip(v, axes) if axes else v for k, v in out.items()}
            signs = np.array([-1 if flip_x else 1, -1 if flip_y else 1])
            back["hv"] = back["hv"] * signs[None, :, None, None]
            want = {k: want[k] + back[k] / 4 for k in want}
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5)
    assert read_card(path).test_time_augmentation == "flip"


def test_unknown_tta_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="tta"):
        OnnxHead(TinyHover(types=3), typed=True, tta="rotate")
