"""The accelerator options on the command line: `--device cuda`, `--trt-cache`, `model fp16`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from models.card import read_card
from service.cli import EXIT_USAGE, main
from service.settings import Settings
from tests._synthetic import build_oracle, oracle_card
from tests.service._server import SHARED, SLIDES

SLIDE = SLIDES / "CMU-1-Small-Region.svs"
TISSUE = SHARED / "data" / "nuclei" / "tnbc" / "images" / "tnbc_01_1.png"


@pytest.fixture(scope="module")
def oracle_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_oracle(tmp_path_factory.mktemp("model") / "oracle.onnx", oracle_card(mpp=0.5))


def test_device_cuda_without_cuda_is_one_line_and_exit_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], oracle_model: Path,
        tmp_path: Path) -> None:
    # Whatever this machine has, the CLI sees an onnxruntime without a GPU provider.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    code = main(["infer", str(SLIDE), "--model", str(oracle_model), "--device", "cuda",
                 "--out", str(tmp_path / "out"), "-q"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("hoverserve: error: device 'cuda' requested")
    assert "--device cpu" in err and "onnxruntime-gpu" in err


def test_trt_options_reach_the_run(monkeypatch: pytest.MonkeyPatch, oracle_model: Path,
                                   tmp_path: Path) -> None:
    import worker.pipeline

    seen: dict[str, Any] = {}

    def fake_run(slide: Path, *, options: Any, **kwargs: Any) -> None:
        seen["options"] = options

    monkeypatch.setattr(worker.pipeline, "run_slide", fake_run)
    cache = tmp_path / "engines"
    assert main(["infer", str(SLIDE), "--model", str(oracle_model), "--trt-cache", str(cache),
                 "--trt-fp16", "--out", str(tmp_path / "out"), "-q"]) == 0
    options = seen["options"]
    assert (options.trt_cache, options.trt_fp16) == (cache, True)
    assert options.parameters()["trt_cache"] == str(cache)
    assert main(["infer", str(SLIDE), "--model", str(oracle_model), "--out", str(tmp_path / "o2"),
                 "-q"]) == 0
    assert (seen["options"].trt_cache, seen["options"].trt_fp16) == (None, False)


def test_the_service_reads_the_trt_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HOVERSERVE_TRT_CACHE", raising=False)
    monkeypatch.delenv("HOVERSERVE_TRT_FP16", raising=False)
    assert (Settings().trt_cache, Settings().trt_fp16) == (None, False)
    monkeypatch.setenv("HOVERSERVE_TRT_CACHE", str(tmp_path))
    monkeypatch.setenv("HOVERSERVE_TRT_FP16", "true")
    settings = Settings()
    assert (settings.trt_cache, settings.trt_fp16) == (tmp_path, True)


@pytest.mark.slow
def test_model_fp16_writes_a_checked_variant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "wide-fp16.onnx"
    assert main(["model", "fp16", "hoverserve-conic-wide", "-o", str(out), "--image", str(TISSUE),
                 "--image-mpp", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "check passed" in printed
    assert read_card(out).precision == "fp16"
    # A variant of a variant is refused, in one line.
    assert main(["model", "fp16", str(out), "-o", str(tmp_path / "again.onnx"),
                 "--image", str(TISSUE)]) == EXIT_USAGE
    assert "fp16 already" in capsys.readouterr().err
    assert not (tmp_path / "again.onnx").exists()


def test_model_fp16_names_an_unreadable_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    assert main(["model", "fp16", "hoverserve-conic-wide", "-o", str(tmp_path / "x.onnx"),
                 "--image", str(junk)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--image" in err and "junk.png" in err and len(err.strip().splitlines()) == 1
