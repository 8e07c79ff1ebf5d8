"""CPU end to end: HoVerServe against TIAToolbox's own pipeline, same checkpoint, same region.

Both sides get the same official-format HoVer-Net ``fast`` checkpoint (PanNuke layout, 6 types)
and the same region of the same slide (by default a 1024² box of tissue of the 40× test slide
that ``make_big_slide.py`` builds):

- **HoVerServe**: the checkpoint imported with ``hoverserve model import --types pannuke``, run
  by ``worker.pipeline.run_slide`` with ``roi`` set to the region and no tissue mask (the whole
  region is analysed), in a child process of this script.
- **TIAToolbox** 2.1.3: ``_tiatoolbox_pipeline.py`` in TIAToolbox's own venv (its full, normally
  resolved install): its ``HoVerNet`` loaded with the checkpoint and its ``MultiTaskSegmentor``
  engine in WSI mode with a mask that is exactly the region.

The sides never run at the same time; each round runs TIAToolbox then HoVerServe, so both see the
same background load. For each run: wall time of the child process (start-up, imports and model
load included), the RSS of its process tree sampled every 50 ms (peak), the patches the network
ran, the nuclei written. The ratio is TIAToolbox's fastest wall time over HoVerServe's, both
measured by the same invocation. Without ``--checkpoint`` a seeded random checkpoint is made
with its three 1×1 output heads fitted to real annotations (see :mod:`_hovernet_heads`;
``--random-heads`` keeps them random, whose maps are noise). Results:
``bench/results/tiatoolbox_end_to_end.json``; ``--markdown`` prints the table of
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))  # ``worker`` and ``models`` when run as a script
sys.path.insert(0, str(BENCH))

from end_to_end import measure  # noqa: E402
from postprocess import TIATOOLBOX_VERSION  # noqa: E402
from report import machine_facts  # noqa: E402

__all__ = [
    "DEFAULT_ROI",
    "ENGINE_VENV",
    "TIATOOLBOX_SPEC",
    "ensure_engine_venv",
    "match_centroids",
    "official_state_dict",
    "roi_area_mm2",
    "summarise",
]

ENGINE_VENV = BENCH / ".venv-tiatoolbox-engine"
"""TIAToolbox's venv with its whole pipeline (git-ignored; about 6.5 GB, about 3 minutes)."""

TIATOOLBOX_SPEC = f"tiatoolbox=={TIATOOLBOX_VERSION}"  # the version the post-processing bench runs
WORK = BENCH / "work" / "tiatoolbox_end_to_end"
RESULTS = BENCH / "results" / "tiatoolbox_end_to_end.json"
KEYS = ROOT / ".." / "shared" / "docs" / "hovernet_official_keys_fast.json"
DEFAULT_ROI = (4352, 3200, 1024, 1024)
"""x, y, w, h (level-0 px) of the default region: dermis and epidermis, no background."""
MPP = 0.25
SEED = 15


# --------------------------------------------------------------------------- set-up


def ensure_engine_venv(venv: Path = ENGINE_VENV) -> Path:
    """Create TIAToolbox's full venv if missing (``pip install tiatoolbox==2.1.3``, resolved
    normally: torch, torchvision, dask, zarr, ... within its own pins); return its python."""
    python = venv / "bin" / "python"
    probe = "import tiatoolbox.models.engine.multi_task_segmentor"
    if python.is_file() and subprocess.run([str(python), "-c", probe], capture_output=True,
                                           check=False).returncode == 0:
        return python
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", TIATOOLBOX_SPEC], check=True)
    return python


def official_state_dict(seed: int) -> dict[str, Any]:
    """A random state_dict with exactly the keys and shapes of an official ``fast`` PanNuke
    checkpoint (the test suite's weights: unit-gain conv kernels, BN scales near 1)."""
    from tests.models._hovernet_weights import manifest, random_state_dict

    return random_state_dict(manifest("fast"), seed=seed)


def make_model_files(work: Path, *, seed: int, heads: bool, checkpoint: Path | None) -> tuple[Path, Path]:
    """The checkpoint both sides load and HoVerServe's import of it (made once, then reused)."""
    import torch

    work.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        checkpoint = work / f"hovernet_fast_seed{seed}{'_heads' if heads else ''}.tar"
        if not checkpoint.is_file():
            state = official_state_dict(seed)
            if heads:
                from _hovernet_heads import fit_heads

                state = fit_heads(state)
            torch.save({"desc": state}, checkpoint)
    onnx = work / (checkpoint.stem + ".onnx")
    if not onnx.is_file():
        subprocess.run([sys.executable, "-m", "service.cli", "model", "import", str(checkpoint),
                        "-o", str(onnx), "--types", "pannuke"], cwd=ROOT, check=True)
    return checkpoint, onnx


# --------------------------------------------------------------------------- the HoVerServe side


def hoverserve_side(slide: Path, model: Path, roi: tuple[int, int, int, int], *, workers: int,
                    batch_size: int, out: Path, result: Path) -> None:
    """Run ``worker.pipeline.run_slide`` on ``roi`` and write what it did to ``result`` (JSON)."""
    started = time.perf_counter()
    import fsspec

    import worker.pipeline as pipeline
    from worker.options import InferenceOptions

    patches = [0]
    iterate = pipeline.iterate_regions

    def counted(*args: Any, **kwargs: Any) -> Any:  # counts the patches of every region
        for region in iterate(*args, **kwargs):
            patches[0] += region.patches
            yield region

    pipeline.iterate_regions = counted
    options = InferenceOptions(model=model, roi=roi, tissue="none", workers=workers,
                               batch_size=batch_size, device="cpu")
    run = pipeline.run_slide(slide, fs=fsspec.filesystem("file"), root=str(out), options=options)
    points = np.asarray(run.table.centroid, dtype=np.float64).reshape(-1, 2).tolist()  # x, y
    manifest = json.loads((out / "manifest.json").read_text())
    result.write_text(json.dumps({
        "side": "hoverserve", "patches": patches[0], "nuclei": len(run.table), "centroids": points,
        "manifest_patches": manifest.get("parameters", {}).get("patches"),
        "seconds": {**run.timings, "total_in_process": time.perf_counter() - started},
        "workers": workers, "batch_size": batch_size,
    }) + "\n")


# --------------------------------------------------------------------------- measuring


def roi_area_mm2(roi: Sequence[int], mpp: float = MPP) -> float:
    """Area of a level-0 box ``(x, y, w, h)`` in mm² at ``mpp`` µm/px."""
    if mpp <= 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    return roi[2] * roi[3] * (mpp / 1000.0) ** 2


def match_centroids(a: NDArray[np.floating], b: NDArray[np.floating], radius: float) -> int:
    """How many points of ``a`` have a point of ``b`` within ``radius`` (one-to-one, greedy by
    distance)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 2)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if not len(a) or not len(b):
        return 0
    from scipy.spatial import cKDTree

    pairs = cKDTree(a).sparse_distance_matrix(cKDTree(b), radius, output_type="ndarray")
    order = np.argsort(pairs["v"], kind="stable")
    used_a, used_b, matched = set(), set(), 0
    for i, j in zip(pairs["i"][order], pairs["j"][order], strict=True):
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            matched += 1
    return matched


def _inside(points: list[list[float]], roi: Sequence[int]) -> NDArray[np.float64]:
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    x, y, w, h = roi
    keep = (p[:, 0] >= x) & (p[:, 0] < x + w) & (p[:, 1] >= y) & (p[:, 1] < y + h)
    return p[keep]


JEMALLOC = "/lib/x86_64-linux-gnu/libjemalloc.so.2"


def _env_prefix(threads: int, allocator: str) -> list[str]:
    """``env VAR=... `` in front of a command (``env`` execs it: the measured pid is the child)."""
    prefix = ["env", f"OMP_NUM_THREADS={threads}"]
    if allocator == "jemalloc":
        prefix.append(f"LD_PRELOAD={JEMALLOC}")
    return prefix


def run_side(side: str, args: argparse.Namespace, python: Path, checkpoint: Path, onnx: Path,
             round_: int) -> dict[str, Any]:
    """One measured run of one side, in its own process."""
    out = args.work / f"{side}-{round_}"
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result = Path(handle.name)
    if side == "tiatoolbox":
        command = [str(python), str(BENCH / "_tiatoolbox_pipeline.py"), "--slide", str(args.slide),
                   "--checkpoint", str(checkpoint), "--roi", *map(str, args.roi), "--threads",
                   str(args.threads), "--batch-size", str(args.batch_size), "--work", str(out),
                   "--result", str(result)]
    else:
        command = [sys.executable, str(Path(__file__)), "--hoverserve-side", str(result),
                   "--slide", str(args.slide), "--model", str(onnx), "--roi", *map(str, args.roi),
                   "--workers", str(args.workers), "--batch-size", str(args.batch_size),
                   "--work", str(out)]
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    code, wall, peak, most, _samples, err = measure([*_env_prefix(args.threads, args.allocator),
                                                    *command], cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU time of the whole tree (every descendant is waited for by its parent before the child
    # exits), which a loaded machine's waiting for a core does not inflate.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    record: dict[str, Any] = {"side": side, "round": round_, "returncode": code, "wall_s": wall,
                              "cpu_s": cpu, "peak_rss_mb": peak, "peak_processes": most,
                              "loadavg_1min": load}
    if code == 0:
        record.update(json.loads(result.read_text()))
    else:
        record["error"] = err.strip().splitlines()[-1] if err.strip() else f"exit status {code}"
    result.unlink(missing_ok=True)
    return record


def summarise(runs: list[dict[str, Any]], roi: Sequence[int], radius: float = 3.0) -> dict[str, Any]:
    """Fastest run per side, s/mm², patches, peak RSS, the wall-time ratio and nucleus agreement."""
    area = roi_area_mm2(roi)
    sides: dict[str, Any] = {}
    for side in ("tiatoolbox", "hoverserve"):
        done = [r for r in runs if r["side"] == side and r["returncode"] == 0]
        if not done:
            continue
        best = min(done, key=lambda r: r["wall_s"])
        sides[side] = {
            "runs": len(done), "wall_s_min": best["wall_s"],
            "cpu_s_min": min((r["cpu_s"] for r in done if "cpu_s" in r), default=None),
            "wall_s_all": [r["wall_s"] for r in done], "s_per_mm2": best["wall_s"] / area,
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in done), "patches": best["patches"],
            "nuclei": best["nuclei"], "nuclei_in_roi": len(_inside(best["centroids"], roi)),
            "seconds": best["seconds"], "manifest_patches": best.get("manifest_patches"),
        }
    summary: dict[str, Any] = {"roi_mm2": area, "sides": sides}
    if len(sides) == 2:
        tia, ours = sides["tiatoolbox"], sides["hoverserve"]
        summary["ratio_wall"] = tia["wall_s_min"] / ours["wall_s_min"]
        summary["ratio_patches"] = ours["patches"] / max(1, tia["patches"])
        if tia["cpu_s_min"] and ours["cpu_s_min"]:
            summary["ratio_cpu"] = tia["cpu_s_min"] / ours["cpu_s_min"]
        a = _inside(next(r for r in runs if r["side"] == "tiatoolbox" and r["returncode"] == 0
                         and r["wall_s"] == tia["wall_s_min"])["centroids"], roi)
        b = _inside(next(r for r in runs if r["side"] == "hoverserve" and r["returncode"] == 0
                         and r["wall_s"] == ours["wall_s_min"])["centroids"], roi)
        summary["matched_within_px"] = radius
        summary["matched"] = match_centroids(a, b, radius)
    return summary


def markdown(document: dict[str, Any]) -> str:
    """The table of the docs/benchmarks.md section."""
    s = document["summary"]
    lines = ["| side | runs | wall s (min) | s/mm² (wall) | CPU s (min) | network patches | "
             "peak RSS MB | nuclei in region |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for side, name in (("tiatoolbox", "TIAToolbox 2.1.3"), ("hoverserve", "HoVerServe")):
        v = s["sides"].get(side)
        if v:
            cpu = f"{v['cpu_s_min']:.0f}" if v.get("cpu_s_min") else "–"
            lines.append(f"| {name} | {v['runs']} | {v['wall_s_min']:.1f} | {v['s_per_mm2']:.0f} | "
                         f"{cpu} | {v['patches']} | {v['peak_rss_mb_max']:.0f} | {v['nuclei_in_roi']} |")
    if "ratio_wall" in s:
        lines.append("")
        cpu_ratio = f" (CPU time {s['ratio_cpu']:.2f}×)" if s.get("ratio_cpu") else ""
        lines.append(f"TIAToolbox / HoVerServe wall time: **{s['ratio_wall']:.2f}×**{cpu_ratio}; "
                     f"HoVerServe runs {s['ratio_patches']:.2f}× TIAToolbox's patches; "
                     f"{s['matched']} nuclei matched within {s['matched_within_px']:.0f} px.")
        patches = s["sides"]["hoverserve"].get("manifest_patches")
        if patches:
            lines.append(f"HoVerServe's manifest: {patches['inferred']} patches inferred, covering "
                         f"minimum {patches['covering_minimum']} (ratio {patches['ratio']:.2f}).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=BENCH / "work" / "big_slide_40x.tiff",
                        help="a 0.25 µm/px slide (default: make_big_slide.py's, built if missing)")
    parser.add_argument("--roi", type=int, nargs=4, default=list(DEFAULT_ROI),
                        metavar=("X", "Y", "W", "H"), help="level-0 px, multiples of 16")
    parser.add_argument("--checkpoint", type=Path, help="an official HoVer-Net fast PanNuke checkpoint "
                        "(default: a seeded random one)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--random-heads", action="store_true",
                        help="leave the random checkpoint's output heads random (noise maps) instead "
                        "of fitting them to real annotations")
    parser.add_argument("--repeats", type=int, default=2, help="rounds (each runs both sides)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="HoVerServe's read/post-process processes")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--allocator", choices=("default", "jemalloc"), default="default",
                        help="memory allocator of both sides (jemalloc via LD_PRELOAD)")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--markdown", action="store_true", help="print the table of --results")
    parser.add_argument("--hoverserve-side", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    roi = tuple(args.roi)
    if args.hoverserve_side:
        hoverserve_side(args.slide, args.model, roi, workers=args.workers, batch_size=args.batch_size,
                        out=args.work, result=args.hoverserve_side)
        return 0
    if args.markdown:
        print(markdown(json.loads(args.results.read_text())))
        return 0
    python = ensure_engine_venv()
    if not args.slide.is_file():
        from make_big_slide import build_slide

        build_slide(args.slide)
    checkpoint, onnx = make_model_files(args.work, seed=args.seed, heads=not args.random_heads,
                                        checkpoint=args.checkpoint)
    runs: list[dict[str, Any]] = []
    machine = machine_facts()
    document: dict[str, Any] = {}
    for round_ in range(max(1, args.repeats)):
        for side in ("tiatoolbox", "hoverserve"):
            run = run_side(side, args, python, checkpoint, onnx, round_)
            runs.append(run)
            print(f"round {round_} {side}: {run['wall_s']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB, "
                  f"{run.get('patches', '?')} patches, {run.get('nuclei', '?')} nuclei"
                  + (f" (failed: {run['error']})" if run["returncode"] else ""), flush=True)
        # Written after every round, so a run stopped early keeps the rounds it finished.
        document = {
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine,
            "slide": str(args.slide), "roi": list(roi), "checkpoint": str(checkpoint),
            "seed": None if args.checkpoint else args.seed,
            "heads_fitted": args.checkpoint is None and not args.random_heads,
            "threads": args.threads, "workers": args.workers, "batch_size": args.batch_size,
            "allocator": args.allocator, "rounds_done": round_ + 1, "summary": summarise(runs, roi),
            "runs": [{k: v for k, v in r.items() if k != "centroids"} for r in runs],
        }
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(document, indent=1) + "\n")
    print(markdown(document))
    print(f"wrote {args.results}")
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
