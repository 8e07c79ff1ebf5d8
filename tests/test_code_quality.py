"""The code base stays lint-clean (ruff) and type-consistent (mypy, settings in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def test_ruff_finds_nothing() -> None:
    run = _run("ruff", "check", ".")
    assert run.returncode == 0, run.stdout + run.stderr


def test_mypy_finds_nothing() -> None:
    run = _run("mypy", "--cache-dir", str(ROOT / ".mypy_cache"))
    assert run.returncode == 0, run.stdout + run.stderr
