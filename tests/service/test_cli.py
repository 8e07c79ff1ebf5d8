"""The command line: clear messages and non-zero exits for what the user can fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import EXIT_USAGE, main

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
SLIDES = SHARED / "data" / "slides"


def test_missing_slide_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["infer", str(tmp_path / "nope.svs"), "--model", str(tmp_path / "m.onnx")]) == EXIT_USAGE
    assert "slide not found" in capsys.readouterr().err


def test_missing_model_file_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    slide = SLIDES / "CMU-1-Small-Region.svs"
    assert main(["infer", str(slide), "--model", str(tmp_path / "m.onnx")]) == EXIT_USAGE
    assert "--model" in capsys.readouterr().err


@pytest.mark.parametrize("roi", ["1,2,3", "a,b,c,d", "0,0,-5,5"])
def test_bad_roi_is_a_usage_error(roi: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["infer", "x.svs", "--roi", roi])
    assert exit_info.value.code == 2
    assert "--roi" in capsys.readouterr().err


def test_tissue_options_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    slide = SLIDES / "CMU-1-Small-Region.svs"
    code = main(["infer", str(slide), "--no-tissue-mask", "--tissue-mask", "m.png"])
    assert code == EXIT_USAGE
    assert "exclude" in capsys.readouterr().err
