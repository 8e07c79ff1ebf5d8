"""fp16 model variants: the card records the precision, the graph keeps float32 at its edges."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from models.card import ModelCard, read_card
from models.errors import ModelCardError
from models.precision import fp16_variant, output_differences, probability_outputs, save_model, to_fp16

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "models" / "zoo" / "hoverserve-conic-wide.onnx"


def _stored_card_json(path: Path) -> str:
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}["hoverserve.card"]


def test_a_card_written_before_the_field_existed_reads_as_fp32_and_writes_back_unchanged() -> None:
    stored = _stored_card_json(DEFAULT)
    assert "precision" not in json.loads(stored)
    card = ModelCard.from_json(stored)
    assert card.precision == "fp32"
    # Byte-identical JSON: the run key nucleus ids derive from hashes it.
    assert card.to_json() == stored
    assert "precision" not in card.model_dump()


def test_an_fp16_card_round_trips_and_a_bad_precision_is_refused() -> None:
    card = read_card(DEFAULT).model_copy(update={"precision": "fp16"})
    assert json.loads(card.to_json())["precision"] == "fp16"
    assert ModelCard.from_json(card.to_json()).precision == "fp16"
    bad = json.loads(card.to_json()) | {"precision": "int8"}
    with pytest.raises(ModelCardError, match="precision"):
        ModelCard.from_json(json.dumps(bad))


def test_conversion_makes_float16_weights_behind_float32_inputs_and_outputs() -> None:
    source = onnx.load(str(DEFAULT))
    converted = to_fp16(source)
    weights = {t.data_type for t in converted.graph.initializer if t.dims}
    assert onnx.TensorProto.FLOAT16 in weights and onnx.TensorProto.FLOAT not in weights
    edges = [v.type.tensor_type.elem_type for v in (*converted.graph.input, *converted.graph.output)]
    assert edges == [onnx.TensorProto.FLOAT] * len(edges)
    # The original is left as it was.
    assert {t.data_type for t in source.graph.initializer if t.dims} == {onnx.TensorProto.FLOAT}
    assert converted.ByteSize() < 0.6 * source.ByteSize()


def test_the_variant_carries_an_fp16_card_and_runs_on_the_cpu(tmp_path: Path) -> None:
    import onnxruntime as ort

    proto, card = fp16_variant(DEFAULT)
    assert card.precision == "fp16"
    out = tmp_path / "wide-fp16.onnx"
    save_model(proto, out)
    written = read_card(out)
    assert written.precision == "fp16"
    assert written.model_copy(update={"precision": "fp32"}).to_json() == _stored_card_json(DEFAULT)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(0).uniform(0, 255, (1, 3, card.input_size, card.input_size))
    outputs = session.run(None, {"image": batch.astype(np.float32)})
    assert all(o.dtype == np.float32 for o in outputs)
    with pytest.raises(ValueError, match="fp16 already"):
        fp16_variant(out)


def test_output_differences_are_the_largest_absolute_ones() -> None:
    a = {"np_prob": np.array([0.1, 0.5, 0.9]), "hv": np.zeros(3)}
    b = {"np_prob": np.array([0.1, 0.52, 0.89]), "hv": np.array([0.0, np.nan, 0.0])}
    got = output_differences(a, b)
    assert got["np_prob"] == pytest.approx(0.02)
    assert got["hv"] == float("inf")
    with pytest.raises(ValueError, match="different outputs"):
        output_differences(a, {"np_prob": a["np_prob"]})
    with pytest.raises(ValueError, match="shape"):
        output_differences(a, {"np_prob": a["np_prob"][:2], "hv": a["hv"]})
    assert probability_outputs(["np_prob", "hv", "tp_prob", "sem_prob"]) == ["np_prob", "tp_prob",
                                                                             "sem_prob"]
