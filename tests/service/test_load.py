"""The load benchmark (bench/service_load.py) against one real API process: 5 concurrent uploads
and 50 concurrent status pollers without a single error, latencies reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_uploads_and_pollers_without_errors(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "service_load.py"), "--uploads", "5", "--pollers",
         "50", "--seconds", "4", "--roi", "0,0,300,300", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["errors"] == []
    assert result["uploads"]["n"] == 5 and len(result["states"]) == 5
    assert result["status"]["n"] >= 50
    assert 0 < result["status"]["p50_ms"] <= result["status"]["p99_ms"]
    assert "p99" in run.stdout and "p50" in run.stdout
