"""bench/seams.py: the comparison finds the oracle model's seams exact (the plan and merge are),
and a table's comparison with itself is total agreement."""

from __future__ import annotations

import sys
from pathlib import Path

from tests._synthetic import build_oracle, draw_ellipses, encode_slide, write_tiff

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import seams  # noqa: E402


def test_the_oracle_reports_the_same_nuclei_at_every_region_size(tmp_path: Path) -> None:
    # A slide whose pixels encode the exact maps of known nuclei, read by the oracle model.
    inst, classes = draw_ellipses((700, 800), 250, seed=3)
    slide = write_tiff(tmp_path / "slide.tif", encode_slide(inst, classes), mpp=0.25)
    model = build_oracle(tmp_path / "oracle.onnx")
    result = seams.run(slide, model, [256, 512], workers=0, work=tmp_path / "work",
                       tissue="none")
    assert result["regions"]["256"] > result["regions"]["512"] >= 1
    (pair,) = result["pairs"]
    assert pair["sizes"] == [256, 512] and min(pair["nuclei"]) > 10
    assert pair["identical"] == [1.0, 1.0] and pair["matched"] == [1.0, 1.0]
    assert result["by_border_distance"]["bands"][-1]["not_identical"] == 0.0
    assert "| 256 vs 512 |" in seams.markdown(result)
