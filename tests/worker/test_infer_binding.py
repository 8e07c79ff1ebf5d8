"""GPU plumbing testable without a GPU: TensorRT's provider options, IO binding, pinned buffers."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort
import pytest

from models.card import read_card
from models.precision import fp16_variant, save_model
from tests._synthetic import build_oracle, oracle_card
from worker import binding
from worker.infer import load_model, provider_options

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "models" / "zoo" / "hoverserve-conic-wide.onnx"
TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


def test_tensorrt_gets_the_engine_cache_folder_and_fp16_and_the_others_nothing() -> None:
    got = provider_options([TRT, CUDA, CPU], trt_cache=Path("/var/cache/trt"), fp16=True)
    assert got == [
        (TRT, {"trt_fp16_enable": "True",
               "trt_engine_cache_enable": "True", "trt_engine_cache_path": "/var/cache/trt",
               "trt_timing_cache_enable": "True", "trt_timing_cache_path": "/var/cache/trt"}),
        (CUDA, {}),
        (CPU, {}),
    ]


def test_tensorrt_gets_one_shape_profile_for_every_batch_up_to_the_largest() -> None:
    ((name, got), _) = provider_options([TRT, CPU], batch=(8, 256))
    assert name == TRT
    assert got["trt_profile_min_shapes"] == "image:1x3x256x256"
    assert got["trt_profile_opt_shapes"] == got["trt_profile_max_shapes"] == "image:8x3x256x256"


def test_without_a_cache_folder_tensorrt_caches_nothing_and_fp16_is_off_unless_asked() -> None:
    assert provider_options([TRT, CPU]) == [(TRT, {"trt_fp16_enable": "False"}), (CPU, {})]
    assert provider_options([CPU], trt_cache="/tmp/x", fp16=True) == [(CPU, {})]


class _FakeSession:
    """Records what load_model asks ONNX Runtime for, then runs on the CPU."""

    seen: ClassVar[list[Any]] = []
    real = ort.InferenceSession

    def __new__(cls, path: str, sess_options: Any = None, providers: Any = None) -> Any:
        cls.seen.append(providers)
        return cls.real(path, sess_options=sess_options, providers=[CPU])


def _load_with_tensorrt(monkeypatch: pytest.MonkeyPatch, path: Path, **kwargs: Any) -> Any:
    _FakeSession.seen.clear()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", _FakeSession)
    load_model(path, device="cuda", **kwargs)
    (asked,) = _FakeSession.seen
    return dict(asked)


def test_load_model_passes_the_cache_folder_and_creates_it(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    oracle = build_oracle(tmp_path / "oracle.onnx", oracle_card())
    cache = tmp_path / "trt" / "engines"
    asked = _load_with_tensorrt(monkeypatch, oracle, trt_cache=cache, batch_size=4)
    assert asked[TRT]["trt_engine_cache_path"] == str(cache) and cache.is_dir()
    assert asked[TRT]["trt_profile_max_shapes"] == "image:4x3x272x272"  # the oracle card's input
    assert asked[TRT]["trt_fp16_enable"] == "False"
    assert list(asked) == [TRT, CUDA, CPU]
    assert _load_with_tensorrt(monkeypatch, oracle, trt_fp16=True)[TRT]["trt_fp16_enable"] == "True"


def test_an_fp16_card_turns_tensorrt_fp16_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    proto, _ = fp16_variant(DEFAULT)
    path = tmp_path / "wide-fp16.onnx"
    save_model(proto, path)
    assert read_card(path).precision == "fp16"
    assert _load_with_tensorrt(monkeypatch, path)[TRT]["trt_fp16_enable"] == "True"


def test_on_the_cpu_predict_keeps_session_run_unless_binding_is_asked() -> None:
    assert load_model(DEFAULT, device="cpu").bound is None
    assert load_model(DEFAULT, device="cpu", io_binding=True).bound is not None


@pytest.mark.slow
def test_the_bound_path_gives_exactly_what_session_run_gives() -> None:
    plain = load_model(DEFAULT, device="cpu", batch_size=3)
    bound = load_model(DEFAULT, device="cpu", batch_size=3, io_binding=True)
    size = plain.card.input_size
    # 5 patches in batches of 3: a full batch and a short one through the same buffer.
    patches = np.random.default_rng(7).uniform(0, 255, (5, 3, size, size)).astype(np.float32)
    expected, got = plain.predict(patches), bound.predict(patches)
    assert list(got) == list(expected) == list(plain.outputs)
    for name in expected:
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], expected[name])
    # The buffer is reused: a second call on other patches is not polluted by the first.
    again = patches[::-1].copy()
    np.testing.assert_array_equal(bound.predict(again)["np_prob"], plain.predict(again)["np_prob"])


def test_outputs_of_symbolic_shape_are_fetched_after_the_run(tmp_path: Path) -> None:
    # Outputs whose size the graph does not state are allocated by ONNX Runtime, then copied.
    import onnx

    card = oracle_card(input_size=48, output_size=32)
    proto = onnx.load(str(build_oracle(tmp_path / "o.onnx", card)))
    for value in (*proto.graph.input, *proto.graph.output):
        for dim in value.type.tensor_type.shape.dim[2:]:
            dim.dim_param = "side"
    path = tmp_path / "symbolic.onnx"
    onnx.save(proto, str(path))
    plain = load_model(path, batch_size=2)
    bound = load_model(path, batch_size=2, io_binding=True)
    assert bound.bound is not None and set(bound.bound._shapes.values()) == {None}
    patches = np.random.default_rng(3).uniform(0, 255, (3, 3, 48, 48)).astype(np.float32)
    expected, got = plain.predict(patches), bound.predict(patches)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


class _FakeCudart:
    """cudaHostAlloc/cudaFreeHost over ordinary memory, to test the buffer's life without CUDA."""

    def __init__(self) -> None:
        self.live: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self.freed: list[int] = []

    def cudaHostAlloc(self, pointer: Any, size: ctypes.c_size_t, flags: ctypes.c_uint) -> int:
        block = ctypes.create_string_buffer(size.value)
        self.live[ctypes.addressof(block)] = block
        pointer._obj.value = ctypes.addressof(block)  # byref() keeps the c_void_p as _obj
        return 0

    def cudaFreeHost(self, pointer: ctypes.c_void_p) -> int:
        assert pointer.value is not None
        self.freed.append(pointer.value)
        return 0


def test_a_pinned_buffer_is_a_writable_array_freed_with_cuda_free_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeCudart()
    monkeypatch.setattr(binding, "_cudart", lambda: fake)
    array = binding.pinned_empty((2, 3, 4))
    assert array is not None and array.shape == (2, 3, 4) and array.dtype == np.float32
    array[:] = 1.5
    assert float(array.sum()) == 1.5 * 24
    (address,) = fake.live
    assert array.ctypes.data == address and fake.freed == []
    del array
    gc.collect()
    assert fake.freed == [address]


def test_without_a_cuda_runtime_there_is_no_pinned_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(binding, "_cudart", lambda: None)
    assert binding.pinned_empty((4,)) is None
