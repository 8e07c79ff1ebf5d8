"""Importing official HoVer-Net checkpoints: layouts, variant detection, classes, ONNX files."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import Tensor

from models.card import ClassInfo, read_card
from models.errors import CheckpointError
from models.importer import (
    HOVER_POSTPROCESS,
    PRESETS,
    default_preset,
    detect_variant,
    import_to_onnx,
    load_official_checkpoint,
    load_preset,
    resolve_classes,
)
from tests.models._hovernet_weights import manifest, random_state_dict


def write_checkpoint(path: Path, state: dict[str, Tensor], *, prefix: bool = False,
                     counters: bool = True) -> Path:
    desc = {
        ("module." if prefix else "") + key: value
        for key, value in state.items()
        if counters or not key.endswith("num_batches_tracked")
    }
    torch.save({"desc": desc}, path)
    return path


@pytest.fixture(scope="module")
def fast_state() -> dict[str, Tensor]:
    return random_state_dict(manifest("fast"), seed=21)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    ("prefix", "counters"), [(False, True), (True, True), (False, False), (True, False)],
    ids=["plain", "module-prefix", "converted-from-tf", "prefix-and-no-counters"],
)
def test_official_layouts_load(
    tmp_path: Path, fast_state: dict[str, Tensor], prefix: bool, counters: bool
) -> None:
    path = write_checkpoint(tmp_path / "x.tar", fast_state, prefix=prefix, counters=counters)
    model, mode, nr_types = load_official_checkpoint(path)
    assert (mode, nr_types) == ("fast", 6)
    assert not model.training
    loaded = model.state_dict()
    assert list(loaded) == list(manifest("fast"))
    for key in ("conv0./.weight", "d2.units.3.conv2/bn.running_var", "decoder.tp.u0.conv.bias",
                "decoder.hv.u3.dense.units.7.conv2.weight", "upsample2x.unpool_mat"):
        assert torch.equal(loaded[key], fast_state[key]), key


def test_original_typed_is_detected(tmp_path: Path) -> None:
    state = random_state_dict(manifest("original"), seed=22)
    model, mode, nr_types = load_official_checkpoint(write_checkpoint(tmp_path / "o.tar", state))
    assert (mode, nr_types) == ("original", 5)
    assert model.spec.input_size == 270 and model.spec.output_size == 80
    assert torch.equal(model.state_dict()["decoder.np.u3.conva.weight"],
                       state["decoder.np.u3.conva.weight"])


@pytest.mark.parametrize("mode", ["fast", "original"])
def test_untyped_is_detected(tmp_path: Path, mode: str) -> None:
    state = random_state_dict(manifest(mode, typed=False), seed=23)
    model, got_mode, nr_types = load_official_checkpoint(
        write_checkpoint(tmp_path / "u.tar", state, counters=False))
    assert (got_mode, nr_types) == (mode, None)
    assert list(model.decoder) == ["np", "hv"]


def test_bare_state_dict_loads(tmp_path: Path, fast_state: dict[str, Tensor]) -> None:
    torch.save(fast_state, tmp_path / "bare.pth")
    assert load_official_checkpoint(tmp_path / "bare.pth")[1:] == ("fast", 6)


def test_detect_variant_reads_shapes_only() -> None:
    def fake(shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}

    fast3 = {"decoder.np.u3.conva.weight": (256, 1024, 3, 3)}
    orig5 = {"decoder.np.u3.conva.weight": (256, 1024, 5, 5)}
    assert detect_variant(fake(fast3)) == ("fast", None)
    assert detect_variant(fake(orig5 | {"decoder.tp.u0.conv.weight": (5, 64, 1, 1)})) == (
        "original", 5)
    with pytest.raises(CheckpointError, match=r"\(256, 1024, 7, 7\)"):
        detect_variant(fake({"decoder.np.u3.conva.weight": (256, 1024, 7, 7)}))
    with pytest.raises(CheckpointError, match=r"not a HoVer-Net checkpoint.*conv1\.weight"):
        detect_variant(fake({"conv1.weight": (64, 3, 7, 7)}))


# --------------------------------------------------------------------------- bad checkpoints


def test_wrong_shape_is_reported_with_its_key(tmp_path: Path, fast_state: dict[str, Tensor]
                                              ) -> None:
    state = dict(fast_state)
    state["d1.units.2.conv2.weight"] = torch.zeros(128, 128, 5, 5)
    with pytest.raises(CheckpointError, match=r"wrong shapes: d1\.units\.2\.conv2\.weight"):
        load_official_checkpoint(write_checkpoint(tmp_path / "w.tar", state))


def test_unknown_and_missing_keys_are_listed(tmp_path: Path, fast_state: dict[str, Tensor]
                                             ) -> None:
    state = {k: v for k, v in fast_state.items() if not k.startswith("d3.units.1.")}
    state["classifier.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as info:
        load_official_checkpoint(write_checkpoint(tmp_path / "k.tar", state))
    message = str(info.value)
    assert "unexpected keys: classifier.weight" in message
    assert "missing keys: d3.units.1." in message and "more)" in message


def test_type_head_disagreeing_with_its_branch_is_rejected(
    tmp_path: Path, fast_state: dict[str, Tensor]
) -> None:
    state = dict(fast_state)
    state["decoder.tp.u0.conv.weight"] = torch.zeros(4, 64, 1, 1)  # bias still has 6
    with pytest.raises(CheckpointError, match=r"decoder\.tp\.u0\.conv\.bias \(6,\)"):
        load_official_checkpoint(write_checkpoint(tmp_path / "t.tar", state))


def test_unreadable_files_are_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_official_checkpoint(tmp_path / "missing.tar")
    (tmp_path / "junk.tar").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_official_checkpoint(tmp_path / "junk.tar")
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "nodesc.tar")
    with pytest.raises(CheckpointError, match=r"'desc'.*epoch, optimizer"):
        load_official_checkpoint(tmp_path / "nodesc.tar")


def test_pickled_objects_need_trust(tmp_path: Path) -> None:
    state = random_state_dict(manifest("fast", typed=False), seed=24)
    path = tmp_path / "p.tar"
    torch.save({"desc": state, "config": PurePosixPath("/data/pannuke")}, path)
    with pytest.raises(CheckpointError, match="trusted=True"):
        load_official_checkpoint(path)
    assert load_official_checkpoint(path, trusted=True)[1:] == ("fast", None)


# --------------------------------------------------------------------------- classes


def test_presets_follow_the_official_type_maps() -> None:
    names = {p: [c.name for c in load_preset(p)[0]] for p in PRESETS}
    assert names["pannuke"] == ["Background", "Neoplastic", "Inflammatory", "Connective",
                                "Dead", "Non-Neoplastic Epithelial"]
    assert names["consep"] == ["Background", "Miscellaneous", "Inflammatory", "Epithelial",
                               "Spindle-Shaped"]
    assert names["monusac"] == ["Background", "Epithelial", "Lymphocyte", "Macrophage",
                                "Neutrophil"]
    for preset in PRESETS:
        classes, training_data = load_preset(preset)
        colours = [c.colour for c in classes]
        assert len(set(colours)) == len(colours), preset
        assert training_data
    with pytest.raises(ValueError, match="preset"):
        load_preset("kumar")


@pytest.mark.parametrize(
    ("mode", "nr_types", "preset"),
    [("fast", 6, "pannuke"), ("original", 6, "pannuke"), ("original", 5, "consep"),
     ("fast", 5, "monusac"), ("fast", 3, None)],
)
def test_default_preset_rule(mode: str, nr_types: int, preset: str | None) -> None:
    assert default_preset(mode, nr_types) == preset


def test_default_classes() -> None:
    classes, data = resolve_classes(None, nr_types=5, mode="original")
    assert classes == load_preset("consep")[0] and "CoNSeP" in data
    generic, _ = resolve_classes(None, nr_types=4, mode="fast")
    assert [c.name for c in generic] == ["Background", "Type 1", "Type 2", "Type 3"]
    assert len({c.colour for c in generic}) == 4
    assert resolve_classes(None, nr_types=None, mode="fast") == ((), "")


def test_types_from_json_file(tmp_path: Path) -> None:
    path = tmp_path / "types.json"
    path.write_text(json.dumps({"classes": [
        {"name": "Background", "colour": [0, 0, 0]},
        {"name": "Tumour", "colour": [200, 0, 0]},
        {"name": "Immune", "colour": [0, 200, 0]},
    ]}))
    classes, data = resolve_classes(path, nr_types=3, mode="fast")
    assert classes[1] == ClassInfo(name="Tumour", colour=(200, 0, 0))
    assert data == ""
    assert resolve_classes(str(path), nr_types=3, mode="fast")[0] == classes


def test_class_count_mismatch_names_both_numbers() -> None:
    with pytest.raises(CheckpointError, match=r"6 types.*'consep' lists 5 classes"):
        resolve_classes("consep", nr_types=6, mode="fast")
    with pytest.raises(CheckpointError, match="no type head"):
        resolve_classes("pannuke", nr_types=None, mode="fast")


def test_bad_types_argument(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="presets"):
        resolve_classes("pannuk", nr_types=6, mode="fast")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read types file"):
        resolve_classes(broken, nr_types=6, mode="fast")
    bad_colour = tmp_path / "colour.json"
    bad_colour.write_text(json.dumps({"classes": [{"name": "Background", "colour": [0, 0, 0]},
                                                  {"name": "X", "colour": [300, 0, 0]}]}))
    with pytest.raises(ValueError, match="invalid class entry"):
        resolve_classes(bad_colour, nr_types=2, mode="fast")


def test_import_checks_types_before_exporting(tmp_path: Path, fast_state: dict[str, Tensor]
                                              ) -> None:
    ckpt = write_checkpoint(tmp_path / "x.tar", fast_state)
    with pytest.raises(CheckpointError, match="6 types"):
        import_to_onnx(ckpt, tmp_path / "x.onnx", types="monusac")
    assert not (tmp_path / "x.onnx").exists()


# --------------------------------------------------------------------------- import end to end


def _onnx_outputs(path: Path, image: Tensor) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": image.numpy()}), strict=True))


def _assert_onnx_equals_pytorch(ckpt: Path, onnx_path: Path, size_in: int, size_out: int
                                ) -> None:
    model, _, _ = load_official_checkpoint(ckpt)
    image = torch.rand(1, 3, size_in, size_in, generator=torch.Generator().manual_seed(9)) * 255
    with torch.no_grad():
        logits = model(image)
    got = _onnx_outputs(onnx_path, image)
    want = {
        "np_prob": torch.softmax(logits["np"], dim=1)[:, 1:2].numpy(),
        "hv": logits["hv"].numpy(),
        "tp_prob": torch.softmax(logits["tp"], dim=1).numpy(),
    }
    assert set(got) == set(want)
    assert got["np_prob"].shape == (1, 1, size_out, size_out)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-4, err_msg=name)
    assert 0.0 < got["np_prob"].min() < got["np_prob"].max() < 1.0  # not saturated


@pytest.mark.slow
def test_import_fast_pannuke_end_to_end(tmp_path: Path, fast_state: dict[str, Tensor]) -> None:
    ckpt = write_checkpoint(tmp_path / "hovernet_fast_pannuke_type_tf2pytorch.tar", fast_state,
                            prefix=True, counters=False)
    out = tmp_path / "pannuke.onnx"
    card = import_to_onnx(ckpt, out, check=False)  # the comparison below is stricter
    assert read_card(out) == card
    assert card.name == "hovernet_fast_pannuke_type_tf2pytorch"
    assert (card.family, card.architecture) == ("hover", "hovernet-fast")
    assert (card.input_size, card.output_size, card.mpp) == (256, 164, 0.25)
    assert [c.name for c in card.classes] == [c.name for c in load_preset("pannuke")[0]]
    assert card.postprocess == HOVER_POSTPROCESS
    assert "checkpoint" in card.licence and "CC BY-NC-SA" in card.licence
    _assert_onnx_equals_pytorch(ckpt, out, 256, 164)


@pytest.mark.slow
def test_import_original_consep_end_to_end(tmp_path: Path) -> None:
    state = random_state_dict(manifest("original"), seed=25)
    ckpt = write_checkpoint(tmp_path / "hovernet_original_consep_type_tf2pytorch.tar", state)
    out = tmp_path / "consep.onnx"
    card = import_to_onnx(ckpt, out, name="consep-official", check=False)
    assert read_card(out) == card
    assert (card.name, card.architecture) == ("consep-official", "hovernet-original")
    assert (card.input_size, card.output_size) == (270, 80)
    assert card.classes == load_preset("consep")[0]
    _assert_onnx_equals_pytorch(ckpt, out, 270, 80)
