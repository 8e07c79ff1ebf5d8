"""Inference: provider choice, model loading errors, tiling and stitching on the global grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from models.card import ModelCard
from tests._synthetic import build_oracle, oracle_card
from worker.errors import InferenceError
from worker.infer import load_model, predict_maps, select_providers
from worker.plan import Box


def test_providers_prefer_tensorrt_then_cuda_then_cpu() -> None:
    everything = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert select_providers("auto", everything) == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("cpu", everything) == ["CPUExecutionProvider"]
    assert select_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_cuda_without_a_gpu_provider_is_a_clear_error() -> None:
    with pytest.raises(InferenceError, match="onnxruntime-gpu"):
        select_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="device"):
        select_providers("tpu", ["CPUExecutionProvider"])  # type: ignore[arg-type]


def test_missing_file_and_cardless_model_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InferenceError, match="not found"):
        load_model(tmp_path / "nope.onnx")
    model = onnx.load(str(build_oracle(tmp_path / "oracle.onnx")))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(InferenceError, match="no HoVerServe model card"):
        load_model(tmp_path / "bare.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(InferenceError, match="cannot load"):
        load_model(tmp_path / "junk.onnx")


def test_a_card_with_bad_post_processing_options_is_refused_at_load(tmp_path: Path) -> None:
    # model_construct skips the checks a card's own copy would make: a file written by other code.
    card = ModelCard.model_construct(**{**dict(oracle_card()),
                                        "postprocess": {"np_threshold": 0.5, "upsample": 9}})
    with pytest.raises(InferenceError, match="upsample"):
        load_model(build_oracle(tmp_path / "bad.onnx", card))
    fine = oracle_card().model_copy(update={"postprocess": {"upsample": 2}})
    assert load_model(build_oracle(tmp_path / "fine.onnx", fine)).card.postprocess == {"upsample": 2}


def test_stitched_maps_equal_the_decoded_image(tmp_path: Path) -> None:
    card = oracle_card(input_size=48, output_size=32)
    model = load_model(build_oracle(tmp_path / "o.onnx", card), batch_size=3)
    maps_box = Box(32, 64, 128, 192)
    image_box = maps_box.grow(card.margin)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (image_box.height, image_box.width, 3), dtype=np.uint8)
    maps = predict_maps(model, image, image_box, maps_box)
    inner = image[card.margin : -card.margin, card.margin : -card.margin].astype(np.float32)
    np.testing.assert_allclose(maps["np_prob"], 1 - inner[..., 0] / 255, atol=1e-6)
    np.testing.assert_allclose(maps["hv"][0], inner[..., 1] / 127.5 - 1, atol=1e-6)
    assert maps.get("types") is not None and maps["types"].dtype == np.uint8


def test_tiles_without_tissue_are_skipped_and_stay_background(tmp_path: Path) -> None:
    card = oracle_card(input_size=48, output_size=32)
    model = load_model(build_oracle(tmp_path / "o.onnx", card))
    maps_box = Box(0, 0, 64, 64)
    image = np.zeros((64 + 2 * card.margin,) * 2 + (3,), np.uint8)  # red 0: nucleus everywhere
    maps = predict_maps(model, image, maps_box.grow(card.margin), maps_box,
                        tile_wanted=lambda tile: tile.col0 == 0)
    assert (maps["np_prob"][:, :32] == 1).all() and (maps["np_prob"][:, 32:] == 0).all()


def test_image_must_match_its_box(tmp_path: Path) -> None:
    card = oracle_card(input_size=48, output_size=32)
    model = load_model(build_oracle(tmp_path / "o.onnx", card))
    with pytest.raises(ValueError, match="grown by"):
        predict_maps(model, np.zeros((64, 64, 3), np.uint8), Box(0, 0, 64, 64), Box(0, 0, 64, 64))


def test_batches_run_on_the_inference_thread_and_its_errors_reach_the_caller(tmp_path: Path) -> None:
    import threading

    card = oracle_card(input_size=48, output_size=32)
    model = load_model(build_oracle(tmp_path / "o.onnx", card), batch_size=1)
    threads: list[str] = []
    real = model.predict

    def predict(patches: np.ndarray) -> dict[str, np.ndarray]:
        threads.append(threading.current_thread().name)
        if len(threads) == 3:
            raise InferenceError("the accelerator fell over")
        return real(patches)

    model.predict = predict  # type: ignore[method-assign]
    maps_box = Box(0, 0, 96, 96)  # 9 tiles: groups of 2
    image = np.zeros((96 + 2 * card.margin,) * 2 + (3,), np.uint8)
    with pytest.raises(InferenceError, match="fell over"):
        predict_maps(model, image, maps_box.grow(card.margin), maps_box)
    assert threads and all(name.startswith("inference") for name in threads)
    assert threading.current_thread().name not in threads
