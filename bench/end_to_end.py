"""End-to-end throughput and memory of ``hoverserve infer`` on the real slides.

Each slide is run as its own ``hoverserve infer SLIDE --model M --out DIR -q`` subprocess. While it
runs, the resident memory (RSS) of the whole process tree (the CLI and its read/post-process
workers) is summed every 50 ms and the peak kept. Tissue throughput is the tissue area the run
reports (``counts.json``), in level-0 megapixels, over the wall time of the subprocess (start-up,
model load, tissue detection, reading, inference, post-processing, merging and writing).

Run ``python bench/end_to_end.py [--model M.onnx]``; results go to ``bench/results/end_to_end.json``.
Without ``--model`` the bundled default model is used (``models/zoo``); a build without one
stops with a message.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SLIDES = ROOT / ".." / "shared" / "data" / "slides"
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT))  # ``models`` when run as a script
sys.path.insert(0, str(BENCH))

from report import machine_facts  # noqa: E402

__all__ = ["DEFAULT_SLIDES", "SAMPLE_SECONDS", "Slide", "SlideRun", "measure", "run_slide", "tissue_mpx"]

SAMPLE_SECONDS = 0.05
"""Interval of the RSS sampling, seconds."""


@dataclass(frozen=True)
class Slide:
    """A slide to run and the extra options it needs."""

    path: Path
    options: tuple[str, ...] = ()


DEFAULT_SLIDES = (
    Slide(SLIDES / "CMU-1-Small-Region.svs"),
    Slide(SLIDES / "pathml_small_dicom.dcm", ("--mpp", "0.25")),  # no pixel spacing in the file
    Slide(SLIDES / "synthetic" / "boxes.tiff", ("--mpp", "0.25")),  # its TIFF resolution is bogus
    Slide(SLIDES / "tiles" / "high-nuclei-score-level0.png", ("--mpp", "0.25")),
)
"""The RGB slides of ``shared/data/slides`` (the ``not_he`` ones are meant to be refused)."""


@dataclass
class SlideRun:
    """What one run measured."""

    slide: str
    returncode: int
    wall_s: float
    peak_rss_mb: float
    peak_processes: int
    samples: int
    tissue_mm2: float | None = None
    tissue_mpx: float | None = None
    tissue_mpx_per_s: float | None = None
    slide_shape: list[int] | None = None
    slide_mpp: float | None = None
    nuclei: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    model_name: str = ""
    error: str = ""


def _tree_rss(process: psutil.Process) -> tuple[int, int]:
    """Summed RSS (bytes) of a process and all its descendants, and how many there were.

    Summing RSS counts shared pages (libraries) once per process, so it is an upper bound on
    the memory the tree really holds.
    """
    total, count = 0, 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for member in members:
        try:
            total += member.memory_info().rss
            count += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # a worker that ended between listing and reading
    return total, count


def measure(command: Sequence[str], *, interval: float = SAMPLE_SECONDS,
            cwd: Path | None = None) -> tuple[int, float, float, int, int, str]:
    """Run ``command``; return (exit status, wall seconds, peak tree RSS in MB, most processes
    seen at once, number of samples, tail of stderr)."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen(list(command), stdout=subprocess.DEVNULL, stderr=err, cwd=cwd)
        process = psutil.Process(child.pid)
        peak, most, samples = 0, 0, 0
        while child.poll() is None:
            rss, count = _tree_rss(process)
            peak, most, samples = max(peak, rss), max(most, count), samples + 1
            time.sleep(interval)
        wall = time.perf_counter() - start
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    return child.returncode, wall, peak / 2**20, most, samples, tail


def tissue_mpx(tissue_mm2: float, mpp: float) -> float:
    """Level-0 megapixels covering ``tissue_mm2`` at ``mpp`` µm per level-0 pixel."""
    if mpp <= 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    return tissue_mm2 / (mpp / 1000.0) ** 2 / 1e6


def _hoverserve() -> list[str]:
    script = Path(sys.executable).with_name("hoverserve")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "service.cli"]


def run_slide(slide: Slide, model: Path, out: Path, *, extra: Sequence[str] = ()) -> SlideRun:
    """Run ``hoverserve infer`` on one slide and read back what it wrote."""
    if out.exists():
        shutil.rmtree(out)
    command = [*_hoverserve(), "infer", str(slide.path), "--model", str(model), "--out", str(out),
               "-q", *slide.options, *extra]
    code, wall, peak, most, samples, err = measure(command, cwd=ROOT)
    run = SlideRun(slide=slide.path.name, returncode=code, wall_s=wall, peak_rss_mb=peak,
                   peak_processes=most, samples=samples)
    if code != 0:
        run.error = err.strip().splitlines()[-1] if err.strip() else f"exit status {code}"
        return run
    manifest = json.loads((out / "manifest.json").read_text())
    counts = json.loads((out / "counts.json").read_text())
    slide_info = manifest.get("slide", {})
    run.slide_mpp = float(slide_info["mpp"])
    run.slide_shape = list(slide_info.get("shape") or [slide_info["height"], slide_info["width"]])
    run.tissue_mm2 = float(counts["tissue_area_mm2"])
    run.tissue_mpx = tissue_mpx(run.tissue_mm2, run.slide_mpp)
    run.tissue_mpx_per_s = run.tissue_mpx / wall
    run.nuclei = int(counts["total"])
    run.timings = {k: float(v) for k, v in manifest.get("timings", {}).items()}
    run.model_name = str(manifest.get("model", {}).get("name", ""))
    return run


def _default_model() -> Path | None:
    from models.zoo import default_model

    return default_model()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="ONNX model (default: the bundled default model)")
    parser.add_argument("--slides", type=Path, nargs="+",
                        help="slides to run (default: the RGB slides of shared/data/slides)")
    parser.add_argument("--mpp", help="--mpp for every slide given with --slides")
    parser.add_argument("--repeats", type=int, default=1, help="runs per slide (the fastest is kept)")
    parser.add_argument("--out", type=Path, default=BENCH / "work" / "end_to_end")
    parser.add_argument("--results", type=Path, default=RESULTS / "end_to_end.json")
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. about the model)")
    parser.add_argument("extra", nargs=argparse.REMAINDER,
                        help="after --: more options for hoverserve infer (e.g. -- --workers 2)")
    args = parser.parse_args(argv)
    model = args.model or _default_model()
    if model is None:
        print("no bundled default model in models/zoo: pass --model MODEL.onnx", file=sys.stderr)
        return 2
    if args.slides:
        slides = [Slide(p, ("--mpp", args.mpp) if args.mpp else ()) for p in args.slides]
    else:
        slides = list(DEFAULT_SLIDES)
    extra = [a for a in args.extra if a != "--"]
    runs: list[SlideRun] = []
    for slide in slides:
        tries = [run_slide(slide, model.resolve(), args.out / slide.path.stem, extra=extra)
                 for _ in range(max(1, args.repeats))]
        best = min(tries, key=lambda r: (r.returncode != 0, r.wall_s))
        runs.append(best)
        if best.returncode:
            print(f"{best.slide}: failed ({best.error})")
        else:
            print(f"{best.slide}: {best.wall_s:.1f} s, {best.tissue_mpx:.2f} tissue Mpx, "
                  f"{best.tissue_mpx_per_s:.3f} Mpx/s, peak RSS {best.peak_rss_mb:.0f} MB, "
                  f"{best.nuclei} nuclei")
    document: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "model": str(model), "model_name": model.name,
        "extra_options": extra, "repeats": args.repeats, "note": args.note,
        "machine": machine_facts(), "sample_seconds": SAMPLE_SECONDS,
        "runs": [vars(r) for r in runs],
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.results}")
    return 0 if all(r.returncode == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
