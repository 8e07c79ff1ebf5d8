"""bench/gpu.py: on a machine without a GPU it says so in one line and exits non-zero; its
sampling, parsing and table code give the right output on fake inputs (nvidia-smi and results).

The benchmark itself needs a CUDA machine; see bench/README.md.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime as ort
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import gpu  # noqa: E402

SCRIPT = BENCH / "gpu.py"
_GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}


def _fake_nvidia_smi(folder: Path) -> Path:
    """An ``nvidia-smi`` that lists one GPU at 37 % and 512 MiB."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        '  *name,memory.total*) echo "Fake GPU, 1000 MiB, 1.0";;\n'
        '  *) echo "37, 512";;\n'
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


def _run(out: Path, path: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path}
    return subprocess.run([sys.executable, str(SCRIPT), str(out), *args], capture_output=True,
                          text=True, env=env, timeout=60, check=False)


def test_without_a_gpu_it_says_so_in_one_line_and_exits_non_zero(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    done = _run(tmp_path / "out", str(empty), "--wheels", str(tmp_path))
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (tmp_path / "out").exists()  # nothing written, nothing installed


@pytest.mark.skipif(bool(_GPU_PROVIDERS & set(ort.get_available_providers())),
                    reason="this onnxruntime has a GPU provider: the CPU-only message cannot occur")
def test_a_gpu_without_a_cuda_onnxruntime_is_one_line_too(tmp_path: Path) -> None:
    fake = _fake_nvidia_smi(tmp_path / "bin")
    done = _run(tmp_path / "out", f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert done.returncode == 4
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA/TensorRT provider" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_wheels_folder_is_one_line(tmp_path: Path) -> None:
    fake = _fake_nvidia_smi(tmp_path / "bin")
    done = _run(tmp_path / "out", f"{fake}{os.pathsep}{os.environ['PATH']}",
                "--wheels", str(tmp_path / "nowhere"))
    assert done.returncode == 5
    assert done.stderr.strip().splitlines() == [
        f"bench/gpu.py: --wheels {tmp_path / 'nowhere'}: no such folder"]


def test_detect_gpu_reads_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu.detect_gpu() == []
    monkeypatch.setenv("PATH", f"{_fake_nvidia_smi(tmp_path / 'bin')}{os.pathsep}/bin:/usr/bin")
    assert gpu.detect_gpu() == ["Fake GPU, 1000 MiB, 1.0"]


def test_parse_gpu_sample_takes_the_first_gpu_and_refuses_na() -> None:
    assert gpu.parse_gpu_sample("37, 512\n90, 1024\n") == (37.0, 512.0)
    assert gpu.parse_gpu_sample("[N/A], [N/A]\n") is None
    assert gpu.parse_gpu_sample("") is None


def test_sampler_collects_utilisation_while_running(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{_fake_nvidia_smi(tmp_path / 'bin')}{os.pathsep}/bin:/usr/bin")
    with gpu.GpuSampler(interval=0.1) as sampler:
        deadline = time.monotonic() + 10
        while len(sampler.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(sampler.samples) >= 3
    assert sampler.summary() == {"gpu_util_mean": 37.0, "gpu_util_max": 37.0,
                                 "gpu_mem_max_mib": 512.0}
    assert gpu.GpuSampler().summary()["gpu_util_mean"] is None
    with pytest.raises(ValueError, match="interval"):
        gpu.GpuSampler(interval=0)


def _fake_result() -> dict[str, object]:
    ok = gpu.ModelRun(model="hoverserve-conic-wide", returncode=0, wall_s=120.0, tissue_mm2=8.0,
                      s_per_mm2=15.0, infer_s_per_mm2=1.25, nuclei=123_456, peak_rss_mb=1500.0,
                      gpu_util_mean=41.5, gpu_util_max=99.0, gpu_mem_max_mib=2048.0,
                      gpu_samples=240)
    failed = gpu.ModelRun(model="hovernet-fast", returncode=1, wall_s=3.0, error="out of memory")
    return {"date": "2026-12-02 02:00 UTC", "gpus": ["NVIDIA H200, 143771 MiB, 550.0"],
            "device": "cuda", "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
            "slide": {"name": "big_slide_40x.tiff", "height": 20000, "width": 20000, "mpp": 0.25},
            "runs": [vars(ok), vars(failed)]}


def test_write_report_writes_the_table_and_the_json(tmp_path: Path) -> None:
    result = _fake_result()
    json_path, md_path = gpu.write_report(result, tmp_path / "table")
    assert json.loads(json_path.read_text()) == result
    table = md_path.read_text()
    assert table.startswith("## GPU: `hoverserve infer --device cuda` on a 40× slide")
    assert "NVIDIA H200" in table and "20000×20000 px at 0.25 µm/px" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 4  # header, alignment and two runs
    assert rows[2].split(" | ")[1:5] == ["8.00", "123,456", "120.0", "**15.000**"]
    assert "| 1.250 | 42 | 99 | 2,048 | 1,500 |" in rows[2]
    assert rows[3].startswith("| hovernet-fast | failed: out of memory |")


def test_missing_figures_show_as_dashes() -> None:
    result = _fake_result()
    runs = result["runs"]
    assert isinstance(runs, list)
    runs[0].update(gpu_util_mean=None, gpu_util_max=None, gpu_mem_max_mib=None)
    row = gpu.markdown_table(result).splitlines()[-2]
    assert row.endswith("| – | – | – | 1,500 |")
