"""The pipeline around a simulated accelerator: what everything but the network costs, and how
many cores keep an accelerator of a given speed busy.

The real model runs once over the slide's patches (the *real run*, the pipeline unchanged); each
patch's outputs are kept, keyed by a hash of the patch's bytes. Then the same pipeline runs again
with :class:`SimulatedAccelerator` as its model: its ``predict`` looks every patch's outputs up
and sleeps a set latency per batch, so the reads, the post-processing, the merge and the writers
do their real work on the real maps while the "accelerator" costs exactly the latency. Each
simulated run's nuclei are checked against the real run's (same count, every column equal).

The driver (:func:`run_with_model`) mirrors :func:`worker.pipeline.run_slide` step for step
(``prepare`` → ``iterate_regions`` on an ``Executor`` pool → ``finish``) but takes a loaded
:class:`worker.infer.Model` instead of loading one.

Run ``python bench/simulated_accelerator.py`` (CMU-1-Small-Region, the bundled default model,
latencies 0 5 20 50 200 500 ms per batch of 8, ``--workers`` 1 and 2); results go to
``bench/results/simulated_accelerator.json`` (each configuration's fastest of ``--repeats``);
``--markdown`` prints the table for
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SLIDES = ROOT / ".." / "shared" / "data" / "slides"
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT))  # ``worker`` when run as a script

from worker.infer import Model, load_model  # noqa: E402
from worker.job import RegionResult, SlidePlan, Timings  # noqa: E402
from worker.nuclei import NucleusTable  # noqa: E402
from worker.options import InferenceOptions  # noqa: E402
from worker.regions import Executor, close_cached, iterate_regions  # noqa: E402
from worker.stages import finish, prepare  # noqa: E402

__all__ = ["DEFAULT_LATENCIES_MS", "DEFAULT_SLIDE", "RecordingModel", "SimulatedAccelerator",
           "SimulatedRun", "busy_fraction", "cores_to_keep_busy", "machine", "markdown", "patch_key",
           "real_batches", "run_with_model", "same_nuclei", "simulate", "summarise"]

DEFAULT_SLIDE = SLIDES / "CMU-1-Small-Region.svs"
DEFAULT_LATENCIES_MS = (0.0, 5.0, 20.0, 50.0, 200.0, 500.0)
"""Simulated accelerator latencies, milliseconds per batch."""

Outputs = dict[str, NDArray[np.float32]]


def patch_key(patch: NDArray[np.float32]) -> bytes:
    """A patch's identity: the BLAKE2 digest of its bytes (the pipeline's patches are exact
    copies of slide pixels, so the same patch always hashes the same)."""
    return hashlib.blake2b(np.ascontiguousarray(patch).tobytes(), digest_size=16).digest()


def _adopt(model: Model) -> dict[str, Any]:
    """The attributes of a loaded model, for a wrapper that behaves as it does apart from
    ``predict`` (card, runner, outputs, map specs, batch size, typed)."""
    return dict(vars(model))


class RecordingModel(Model):
    """The real model; keeps every patch's outputs (one array per contract output)."""

    def __init__(self, model: Model) -> None:
        self.__dict__.update(_adopt(model))
        self.recorded: dict[bytes, Outputs] = {}

    def predict(self, patches: NDArray[np.float32]) -> Outputs:
        out = super().predict(patches)
        for i, patch in enumerate(patches):
            self.recorded[patch_key(patch)] = {k: v[i].copy() for k, v in out.items()}
        return out


class SimulatedAccelerator(Model):
    """A model whose ``predict`` returns recorded outputs after ``latency_s`` per batch.

    ``busy_s`` sums the time spent in the latency sleeps, ``batches`` counts the batches,
    ``lookup_s`` the time spent hashing patches and copying outputs (work a real accelerator's
    host side does not do).
    """

    def __init__(self, model: Model, recorded: dict[bytes, Outputs], latency_s: float) -> None:
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s}")
        self.__dict__.update(_adopt(model))
        self.recorded = recorded
        self.latency_s = latency_s
        self.busy_s = 0.0
        self.lookup_s = 0.0
        self.batches = 0

    def __repr__(self) -> str:
        return f"SimulatedAccelerator({self.card.name!r}, {self.latency_s * 1000:g} ms/batch)"

    def predict(self, patches: NDArray[np.float32]) -> Outputs:
        chunks: dict[str, list[NDArray[np.float32]]] = {k: [] for k in self.outputs}
        for start in range(0, len(patches), self.batch_size):
            batch = patches[start:start + self.batch_size]
            looked = time.perf_counter()
            try:
                found = [self.recorded[patch_key(p)] for p in batch]
            except KeyError:
                raise ValueError("a patch the real run never saw: the plan differs from the "
                                 "recorded run's") from None
            stacked = {k: np.stack([f[k] for f in found]) for k in chunks}
            self.lookup_s += time.perf_counter() - looked
            if self.latency_s > 0:
                slept = time.perf_counter()
                time.sleep(self.latency_s)
                self.busy_s += time.perf_counter() - slept
            self.batches += 1
            for k, value in stacked.items():
                chunks[k].append(value)
        return {k: np.concatenate(v) for k, v in chunks.items()}


@dataclass(frozen=True)
class SimulatedRun:
    """One run of the pipeline: its nuclei, stage seconds, wall time and the accelerator's use."""

    latency_ms: float | None
    """None for the real run."""
    workers: int
    table: NucleusTable
    timings: dict[str, float]
    wall_s: float
    tissue_mm2: float
    regions: int
    batches: int
    busy_s: float
    lookup_s: float
    pool_cpu_s: float | None
    """CPU seconds of the pool's processes, start-up included (None without a pool)."""

    def record(self) -> dict[str, Any]:
        """JSON-ready summary (the table reduced to its size)."""
        return {"latency_ms": self.latency_ms, "workers": self.workers, "nuclei": len(self.table),
                "wall_s": self.wall_s, "tissue_mm2": self.tissue_mm2, "regions": self.regions,
                "batches": self.batches, "busy_s": self.busy_s, "lookup_s": self.lookup_s,
                "busy_fraction": busy_fraction(self.busy_s, self.wall_s),
                "busy_fraction_of_regions_wall": busy_fraction(
                    self.busy_s, self.timings.get("regions_wall", 0.0)),
                "pool_cpu_s": self.pool_cpu_s, "timings": self.timings}


def busy_fraction(busy_s: float, wall_s: float) -> float:
    """Share of ``wall_s`` the accelerator spent busy (0 for an empty run)."""
    if busy_s < 0 or wall_s < 0:
        raise ValueError(f"seconds must be >= 0, got busy {busy_s}, wall {wall_s}")
    return busy_s / wall_s if wall_s > 0 else 0.0


def cores_to_keep_busy(cpu_s_per_region: float, accelerator_s_per_region: float) -> float:
    """Cores whose read + post-processing keeps pace with an accelerator: a region's CPU
    seconds over the accelerator's seconds for it (infinite for a free accelerator)."""
    if cpu_s_per_region < 0 or accelerator_s_per_region < 0:
        raise ValueError("seconds per region must be >= 0")
    return cpu_s_per_region / accelerator_s_per_region if accelerator_s_per_region > 0 else float("inf")


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of this process' children that have ended and been waited for
    (a closed pool's processes, their start-up included)."""
    times = os.times()
    return times.children_user + times.children_system


def machine() -> dict[str, Any]:
    """What the figures depend on: cores, platform, Python, commit, load when the run started."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=False).stdout.strip()
    return {"logical_cores": os.cpu_count(), "os": platform.platform(),
            "python": platform.python_version(), "commit": commit or "unknown",
            "loadavg_1min": os.getloadavg()[0]}


def run_with_model(slide: str | Path, model: Model, options: InferenceOptions, *, root: Path,
                   latency_ms: float | None = None) -> SimulatedRun:
    """:func:`worker.pipeline.run_slide` with an already loaded (or simulated) ``model``; writes
    the outputs under ``root``."""
    import fsspec

    fs, root_path = fsspec.url_to_fs(str(root))
    fs.makedirs(root_path, exist_ok=True)
    t0 = time.perf_counter()
    plan: SlidePlan = prepare(slide, model.card, options)
    timings = Timings(load_model=0.0, plan=plan.plan_seconds)
    executor = Executor(min(options.workers, max(1, len(plan.regions))))
    results: list[RegionResult] = []
    children = _children_cpu_seconds()
    start = time.perf_counter()
    try:
        ahead = max(1, options.workers // 2)  # as run_slide: one read ahead per pair of workers
        results.extend(iterate_regions(plan, model, executor, prefetch=ahead, max_pending=ahead))
    finally:
        executor.close()
        close_cached()
    pool_cpu = _children_cpu_seconds() - children if options.workers > 0 else None
    timings = timings.with_(
        regions_wall=time.perf_counter() - start,
        read=sum(r.read_s for r in results), infer=sum(r.infer_s for r in results),
        postprocess=sum(r.postprocess_s for r in results))
    outputs = finish(plan, results, fs=fs, root=root_path, card=model.card,
                     parameters=options.parameters(), timings=timings)
    wall = time.perf_counter() - t0
    stages = outputs.timings.with_(total=wall).to_dict()
    return SimulatedRun(
        latency_ms=latency_ms, workers=options.workers, table=outputs.table, timings=stages,
        wall_s=wall, tissue_mm2=plan.tissue_area_mm2, regions=len(plan.regions),
        batches=getattr(model, "batches", 0), busy_s=getattr(model, "busy_s", 0.0),
        lookup_s=getattr(model, "lookup_s", 0.0), pool_cpu_s=pool_cpu)


def same_nuclei(a: NucleusTable, b: NucleusTable) -> bool:
    """Whether two tables hold the same nuclei: same count and every column equal."""
    if len(a) != len(b):
        return False
    for f in dataclasses.fields(NucleusTable):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, dict):
            if list(x) != list(y) or not all(
                    np.array_equal(x[k], y[k], equal_nan=True) for k in x):
                return False
        elif x is None or y is None:
            if x is not y:
                return False
        elif not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            return False
    return True


def simulate(slide: str | Path, model_path: Path, options: InferenceOptions, *,
             latencies_ms: Sequence[float], workers: Sequence[int], work: Path,
             model: Model | None = None, repeats: int = 1) -> tuple[SimulatedRun, list[SimulatedRun]]:
    """The real run (with ``options.workers``) and, per worker count and latency, the fastest of
    ``repeats`` simulated runs; every simulated run's nuclei are checked against the real run's.

    The repeats run in rounds (every configuration once per round), so background load on a
    shared machine falls on all of them alike.

    Raises
    ------
    ValueError
        A simulated run's nuclei differ from the real run's, or ``repeats`` < 1.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    loaded = model or load_model(model_path, device=options.device, batch_size=options.batch_size)
    recording = RecordingModel(loaded)
    real = run_with_model(slide, recording, options, root=work / "real")
    configurations = [(n, latency) for n in workers for latency in latencies_ms]
    best: dict[tuple[int, float], SimulatedRun] = {}
    for _ in range(repeats):
        for n, latency in configurations:
            simulated = SimulatedAccelerator(loaded, recording.recorded, latency / 1000.0)
            run = run_with_model(slide, simulated, dataclasses.replace(options, workers=n),
                                 root=work / f"w{n}_{latency:g}ms", latency_ms=latency)
            if not same_nuclei(run.table, real.table):
                raise ValueError(f"simulated run ({latency:g} ms, {n} workers) found "
                                 f"{len(run.table)} nuclei that differ from the real run's "
                                 f"{len(real.table)}")
            kept = best.get((n, latency))
            if kept is None or run.wall_s < kept.wall_s:
                best[(n, latency)] = run
    return real, [best[c] for c in configurations]


# --------------------------------------------------------------------------- the report


def summarise(real: SimulatedRun, runs: Sequence[SimulatedRun]) -> dict[str, Any]:
    """s/mm² per stage at latency 0, and cores to keep each latency's accelerator busy."""
    mm2 = real.tissue_mm2
    zero = [r for r in runs if r.latency_ms == 0]

    def per_mm2(run: SimulatedRun) -> dict[str, float]:
        t = run.timings
        write = sum(v for k, v in t.items() if k.startswith("write"))
        host = t.get("infer", 0.0) - run.busy_s - run.lookup_s  # patch stacking and stitching
        parts = {"whole_run": run.wall_s, "plan": t.get("plan", 0.0), "read": t.get("read", 0.0),
                 "postprocess": t.get("postprocess", 0.0), "merge_write": t.get("merge", 0.0) + write,
                 "inference_host": host, "regions_wall": t.get("regions_wall", 0.0)}
        return {k: v / mm2 if mm2 > 0 else float("nan") for k, v in parts.items()}

    # The cleanest CPU figure: the run where read + post-processing took least (least contended).
    cpu = min((r.timings.get("read", 0.0) + r.timings.get("postprocess", 0.0) for r in runs),
              default=0.0)
    host = min((r.timings.get("infer", 0.0) - r.busy_s - r.lookup_s for r in runs), default=0.0)
    regions = max(1, real.regions)
    cores = []
    for latency in sorted({r.latency_ms for r in runs if r.latency_ms}):
        accelerator = real_batches(runs) * latency / 1000.0
        cores.append({"latency_ms": latency, "accelerator_s_per_region": accelerator / regions,
                      "cpu_s_per_region": cpu / regions,
                      "cores": cores_to_keep_busy(cpu / regions, accelerator / regions),
                      "cores_with_inference_host": cores_to_keep_busy(
                          (cpu + host) / regions, accelerator / regions)})
    return {"tissue_mm2": mm2, "regions": real.regions, "batches": real_batches(runs),
            "s_per_mm2_at_latency_0": {f"workers_{r.workers}": per_mm2(r) for r in zero},
            "real_run_s_per_mm2": per_mm2(real),
            "read_postprocess_cpu_s": cpu, "inference_host_s": host, "cores": cores}


def real_batches(runs: Sequence[SimulatedRun]) -> int:
    """Batches per run (the same in every simulated run: one plan)."""
    return max((r.batches for r in runs), default=0)


def markdown(document: dict[str, Any]) -> str:
    """The tables of ``docs/benchmarks.md``'s "Simulated accelerator" section."""
    lines = ["| latency ms/batch | workers | wall s | s/mm² | regions wall s | accelerator busy s "
             "| busy / wall | busy / regions wall | nuclei |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    mm2 = document["summary"]["tissue_mm2"]
    for r in document["runs"]:
        lines.append(f"| {r['latency_ms']:g} | {r['workers']} | {r['wall_s']:.2f} | "
                     f"{r['wall_s'] / mm2:.2f} | {r['timings'].get('regions_wall', 0):.2f} | "
                     f"{r['busy_s']:.2f} | {r['busy_fraction']:.0%} | "
                     f"{r['busy_fraction_of_regions_wall']:.0%} | {r['nuclei']:,} |")
    lines += ["", "| s/mm² at 0 ms | whole run | plan | read | post-process | merge + write "
              "| inference host side | regions wall |",
              "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, p in document["summary"]["s_per_mm2_at_latency_0"].items():
        lines.append(f"| {name.replace('_', ' ')} | {p['whole_run']:.2f} | {p['plan']:.2f} | "
                     f"{p['read']:.2f} | {p['postprocess']:.2f} | {p['merge_write']:.2f} | "
                     f"{p['inference_host']:.2f} | {p['regions_wall']:.2f} |")
    lines += ["", "| accelerator ms/batch | accelerator s/region | read + post-process CPU s/region "
              "| cores to keep it busy | with the inference host side |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for c in document["summary"]["cores"]:
        lines.append(f"| {c['latency_ms']:g} | {c['accelerator_s_per_region']:.2f} | "
                     f"{c['cpu_s_per_region']:.2f} | {c['cores']:.1f} | "
                     f"{c['cores_with_inference_host']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--model", type=Path, help="ONNX model (default: the bundled default model)")
    parser.add_argument("--mpp", type=float, help="µm/px for a slide that carries none")
    parser.add_argument("--latencies-ms", type=float, nargs="+", default=list(DEFAULT_LATENCIES_MS))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2,
                        help="simulated runs per configuration; the fastest is kept")
    parser.add_argument("--region-size", type=int, help="region core side, model px")
    parser.add_argument("--work", type=Path, help="where the runs write (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=RESULTS / "simulated_accelerator.json")
    parser.add_argument("--markdown", action="store_true", help="print the tables for docs/")
    args = parser.parse_args(argv)
    from models.zoo import default_model

    model_path = args.model or default_model()
    if model_path is None:
        print("no bundled default model in models/zoo: pass --model MODEL.onnx", file=sys.stderr)
        return 2
    extra = {"region_size": args.region_size} if args.region_size else {}
    options = InferenceOptions(model=model_path, mpp=args.mpp, batch_size=args.batch_size,
                               workers=max(args.workers), **extra)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        real, runs = simulate(args.slide, model_path, options, latencies_ms=args.latencies_ms,
                              workers=args.workers, work=Path(work), repeats=args.repeats)
    document = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "slide": args.slide.name,
                "model": Path(model_path).name, "batch_size": args.batch_size,
                "repeats": args.repeats,
                "machine": machine(), "same_nuclei_as_real_run": True,
                "real_run": real.record(), "runs": [r.record() for r in runs],
                "summary": summarise(real, runs)}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.results}")
    if args.markdown:
        print(markdown(document))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
