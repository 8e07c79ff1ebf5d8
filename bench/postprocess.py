"""Post-processing throughput: HoVerServe's ``hover_instances`` against TIAToolbox's HoVer-Net.

Both sides read the same map sets from disk (``bench/make_maps.py``), run one after the other on
the same machine in the same run, and their outputs are compared instance by instance so the
speed ratio is for the same result.

TIAToolbox runs in a virtual environment of its own, ``bench/.venv-tiatoolbox`` (made on first
use, see :func:`ensure_tiatoolbox_venv` and ``bench/README.md``), through
``bench/_tiatoolbox_side.py``. HoVerServe runs in this process.

Run ``python bench/postprocess.py`` (``--help`` for the options); results go to
``bench/results/postprocess.json`` and the raw outputs to ``bench/work/postprocess/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))  # the repository root, for ``worker`` when run as a script
sys.path.insert(0, str(BENCH))

from make_maps import load_map_set, map_set_complete, write_map_set  # noqa: E402

__all__ = [
    "BASELINE_CASES",
    "TIATOOLBOX_PACKAGES",
    "TIATOOLBOX_VERSION",
    "Match",
    "baseline_inputs",
    "baseline_table",
    "compare_outputs",
    "ensure_tiatoolbox_venv",
    "match_instances",
    "run_baseline",
    "speed_summary",
]

VENV = BENCH / ".venv-tiatoolbox"
"""TIAToolbox's own virtual environment (git-ignored)."""

WORK = BENCH / "work"
RESULTS = BENCH / "results"

TIATOOLBOX_VERSION = "2.1.3"
"""The TIAToolbox release benchmarked (installed with ``--no-deps``)."""

TORCH_SPEC = "torch==2.13.0"
"""The one pin of TIAToolbox not honoured: it asks for torch<2.13; 2.13.0 (CPU) is the wheel on
this machine's disk. ``hovernet.py`` imports torch but its post-processing never calls it."""

TIATOOLBOX_PACKAGES = (
    # What the post-processing import chain (hovernet.py, architecture/utils.py, models_abc.py,
    # utils/misc.py, annotation/storage.py) needs, within TIAToolbox 2.1.3's own pins.
    "numpy>=2.0.0,<2.4.4",
    "scipy>=1.8,<1.17.1",
    "scikit-image>=0.26.0,<0.26.1",
    "opencv-python-headless>=4.6.0,<5.0.0",  # same cv2 as its opencv-python pin, without GUI libs
    "pandas>=2.0.0,<3.0.3",
    "dask>=2026.1.2,<2026.7.1",
    "click>=8.2.0,<8.4.2",
    "pyyaml>=6.0,<6.0.3",
    "tqdm>=4.64.1,<4.69.0",
    "joblib>=1.1.1,<1.5.3",
    "matplotlib>=3.10.0,<3.11.1",
    "requests>=2.28.1,<2.34.2",
    "charset-normalizer",
    "zarr>=3.0.8,<3.2.0",
    "shapely>=2.0.0,<=2.1.2",
    "tifffile>=2025.5.21,<2026.3.3",
    "filelock>=3.9.0,<3.29.0",
    "pillow>=9.3.0,<12.2.0",
    "psutil",
)


# --------------------------------------------------------------------------- TIAToolbox's venv


def _venv_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def _venv_ready(venv: Path) -> bool:
    """Whether the venv's python imports TIAToolbox's HoVerNet the way the side script does."""
    python = _venv_python(venv)
    if not python.is_file():
        return False
    probe = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r}); import tiatoolbox, _tiatoolbox_side; "
        f"_tiatoolbox_side.import_hovernet(); "
        f"sys.exit(tiatoolbox.__version__ != {TIATOOLBOX_VERSION!r})"
    )
    return subprocess.run([str(python), "-c", probe], capture_output=True, check=False).returncode == 0


def ensure_tiatoolbox_venv(venv: Path = VENV, *, log: Callable[[str], None] = print) -> Path:
    """Create TIAToolbox's venv if missing; return its python.

    Steps: a venv on this interpreter's Python; ``torch==2.13.0``; :data:`TIATOOLBOX_PACKAGES`,
    resolved normally; then ``tiatoolbox`` itself with ``--no-deps`` (its full dependency tree is
    several GB: CUDA torch, torchvision, transformers, jupyterlab, sphinx, ...).
    """
    python = _venv_python(venv)
    if _venv_ready(venv):
        return python
    log(f"creating {venv} (TIAToolbox {TIATOOLBOX_VERSION}, post-processing dependencies only)")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH_SPEC], check=True)
    subprocess.run([*pip, *TIATOOLBOX_PACKAGES], check=True)
    subprocess.run([*pip, "--no-deps", f"tiatoolbox=={TIATOOLBOX_VERSION}"], check=True)
    if not _venv_ready(venv):
        raise RuntimeError(f"{venv} was created but TIAToolbox's HoVerNet does not import there")
    return python


# --------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Match:
    """Instances of a reference label image matched by a candidate at IoU >= a threshold."""

    n_reference: int
    n_candidate: int
    pairs: NDArray[np.int64]  # (k, 2): reference id, candidate id
    iou: NDArray[np.float64]  # (k,)

    @property
    def recall(self) -> float:
        """Share of reference instances matched (NaN with none)."""
        return len(self.pairs) / self.n_reference if self.n_reference else float("nan")

    @property
    def precision(self) -> float:
        """Share of candidate instances matched (NaN with none)."""
        return len(self.pairs) / self.n_candidate if self.n_candidate else float("nan")


def match_instances(
    reference: NDArray[np.integer], candidate: NDArray[np.integer], *, threshold: float = 0.5
) -> Match:
    """One-to-one matching of two (H, W) label images (0 background) at IoU >= ``threshold``.

    Above 0.5 a match is unique by construction; at exactly 0.5 the best pair per instance wins.
    """
    if reference.shape != candidate.shape or reference.ndim != 2:
        raise ValueError(f"label images must be equal (H, W), got {reference.shape} and {candidate.shape}")
    ref = reference.astype(np.int64, copy=False)
    cand = candidate.astype(np.int64, copy=False)
    ref_ids, cand_ids = np.unique(ref), np.unique(cand)
    n_ref, n_cand = int((ref_ids > 0).sum()), int((cand_ids > 0).sum())
    ref_area = np.bincount(ref.ravel())
    cand_area = np.bincount(cand.ravel())
    both = (ref > 0) & (cand > 0)
    stride = int(cand.max()) + 1
    keys, inter = np.unique(ref[both] * stride + cand[both], return_counts=True)
    a, b = np.divmod(keys, stride)
    iou = inter / (ref_area[a] + cand_area[b] - inter)
    keep = iou >= threshold
    a, b, iou = a[keep], b[keep], iou[keep]
    order = np.argsort(-iou, kind="stable")
    _, first_a = np.unique(a[order], return_index=True)
    order = order[np.sort(first_a)]
    _, first_b = np.unique(b[order], return_index=True)
    order = order[np.sort(first_b)]
    pairs = np.stack([a[order], b[order]], axis=1) if order.size else np.zeros((0, 2), np.int64)
    return Match(n_ref, n_cand, pairs.astype(np.int64), iou[order].astype(np.float64))


def _lookup(ids: NDArray[np.integer], values: NDArray[np.integer], query: NDArray[np.integer]) -> NDArray:
    table = dict(zip(ids.tolist(), values.tolist(), strict=True))
    return np.array([table.get(int(q), -1) for q in query], dtype=np.int64)


def compare_outputs(
    tia_labels: NDArray[np.integer],
    tia_ids: NDArray[np.integer],
    tia_types: NDArray[np.integer],
    our_labels: NDArray[np.integer],
    our_ids: NDArray[np.integer],
    our_types: NDArray[np.integer],
    *,
    gt_labels: NDArray[np.integer] | None = None,
) -> dict[str, Any]:
    """How closely HoVerServe's output reproduces TIAToolbox's (and both the annotation).

    Returns a JSON-ready dict: instance counts, the share of TIAToolbox's instances matched by
    ours at IoU >= 0.5 and the reverse, how many matches are pixel-identical, their mean IoU,
    the share of matched pairs with equal types, foreground pixel agreement and, given
    ``gt_labels``, each side's recall of the annotated nuclei at IoU >= 0.5.
    """
    match = match_instances(tia_labels, our_labels)
    tia_t = _lookup(tia_ids, tia_types, match.pairs[:, 0])
    our_t = _lookup(our_ids, our_types, match.pairs[:, 1])
    same_fg = (tia_labels > 0) == (our_labels > 0)
    out: dict[str, Any] = {
        "tia_nuclei": match.n_reference,
        "our_nuclei": match.n_candidate,
        "tia_matched_by_ours": match.recall,
        "ours_matched_by_tia": match.precision,
        "identical_instances": float(np.mean(match.iou == 1.0)) if len(match.iou) else float("nan"),
        "mean_iou": float(match.iou.mean()) if len(match.iou) else float("nan"),
        "types_equal": float(np.mean(tia_t == our_t)) if len(tia_t) else float("nan"),
        "foreground_agreement": float(same_fg.mean()),
    }
    if gt_labels is not None:
        out["gt_nuclei"] = int(len(np.unique(gt_labels)) - (1 if (gt_labels == 0).any() else 0))
        out["tia_recall_of_gt"] = match_instances(gt_labels, tia_labels).recall
        out["our_recall_of_gt"] = match_instances(gt_labels, our_labels).recall
    return out


def speed_summary(
    tia_seconds: Sequence[float],
    our_seconds: Sequence[float],
    pixels: int,
    nuclei: int,
    *,
    tia_cpu: Sequence[float] = (),
    our_cpu: Sequence[float] = (),
) -> dict[str, float]:
    """Best-of-N and median wall times of both sides, throughput and the speed ratio (TIA / ours);
    with process CPU times given, their best-of-N and ratio too."""
    if not tia_seconds or not our_seconds:
        raise ValueError("both sides need at least one timing")
    tia_min, our_min = min(tia_seconds), min(our_seconds)
    tia_med, our_med = statistics.median(tia_seconds), statistics.median(our_seconds)
    out = {
        "tia_min_s": tia_min, "tia_median_s": tia_med, "tia_runs": len(tia_seconds),
        "our_min_s": our_min, "our_median_s": our_med, "our_runs": len(our_seconds),
        "tia_mpx_s": pixels / 1e6 / tia_min, "our_mpx_s": pixels / 1e6 / our_min,
        "tia_ms_per_1k_nuclei": 1e6 * tia_min / max(nuclei, 1),
        "our_ms_per_1k_nuclei": 1e6 * our_min / max(nuclei, 1),
        "ratio_min": tia_min / our_min, "ratio_median": tia_med / our_med,
    }
    if tia_cpu and our_cpu:
        out.update({"tia_cpu_min_s": min(tia_cpu), "our_cpu_min_s": min(our_cpu),
                    "ratio_cpu_min": min(tia_cpu) / min(our_cpu)})
    return out


# --------------------------------------------------------------------------- our side


class _OurStages:
    """Times the watershed and measurement halves of ``hover_instances`` by wrapping the two
    module functions it calls (when they exist under these names)."""

    # The frozen baseline defines the private names; today's worker.postprocess imports the public
    # ``instance_labels`` (worker.watershed) and ``measure`` (worker.instances).
    NAMES: ClassVar[dict[str, str]] = {"_instance_labels": "labels", "_measure": "measure",
                                       "instance_labels": "labels", "measure": "measure"}

    def __init__(self, module: Any) -> None:
        self.seconds: dict[str, float] = {}
        for attr, stage in self.NAMES.items():
            fn = getattr(module, attr, None)
            if fn is not None:
                setattr(module, attr, self._wrap(fn, stage))

    def _wrap(self, fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        return timed


def run_ours(folders: Sequence[Path], out: Path, repeats: Sequence[int]) -> dict[str, Any]:
    """Time ``hover_instances`` ``repeats[i]`` times on map set ``i`` (wall and process CPU time);
    save labels and types like the TIA side."""
    from importlib.metadata import version

    import cv2
    import scipy

    import worker.postprocess as post

    stages = _OurStages(post)
    warm = load_map_set(folders[0])
    post.hover_instances(warm.np_prob[:256, :256], warm.hv[:, :256, :256], warm.types[:256, :256],
                         mpp=0.25)
    report: dict[str, Any] = {"side": "hoverserve", "sets": {}, "versions": {
        "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
        "scikit-image": version("scikit-image"), "opencv": cv2.__version__,
    }}
    for folder, count in zip(folders, repeats, strict=True):
        maps = load_map_set(folder)
        seconds, cpu, stage_list, result = [], [], [], None
        for _ in range(count):
            stages.seconds = {}
            start, start_cpu = time.perf_counter(), time.process_time()
            result = post.hover_instances(maps.np_prob, maps.hv, maps.types, mpp=0.25)
            seconds.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            stage_list.append(dict(stages.seconds))
        if result is None:
            raise ValueError(f"repeats must be >= 1, got {count}")
        ids = np.array([n.label for n in result.nuclei], np.int64)
        kinds = np.array([n.type for n in result.nuclei], np.int64)
        np.save(out / f"{folder.name}_labels.npy", result.labels)
        np.savez(out / f"{folder.name}_types.npz", ids=ids, types=kinds)
        report["sets"][folder.name] = {"shape": list(maps.shape), "seconds": seconds,
                                       "cpu_seconds": cpu, "stages": stage_list, "nuclei": len(ids)}
        print(f"hoverserve {folder.name}: {min(seconds):.3f} s (min of {len(seconds)}), "
              f"{len(ids)} nuclei", flush=True)
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


# --------------------------------------------------------------------------- against the baseline


BASELINE_CASES = ("x1", "half-up2")
"""``x1``: ``hover_instances`` on the 0.25 µm/px maps. ``half-up2``: the maps averaged down to
0.5 µm/px, then ``segment_maps`` with the 20× default card's ``upsample=2`` (what the pipeline
runs for the default model)."""


def baseline_inputs(maps: Any, case: str) -> tuple[NDArray, NDArray, NDArray, float, int]:
    """(np_prob, hv, types, mpp, upsample) of one baseline case of a map set."""
    import cv2

    if case == "x1":
        return maps.np_prob, maps.hv, maps.types, 0.25, 1
    if case != "half-up2":
        raise ValueError(f"unknown case {case!r}; expected one of {BASELINE_CASES}")
    h, w = maps.shape[0] // 2, maps.shape[1] // 2
    coarse = cv2.resize(maps.np_prob, (w, h), interpolation=cv2.INTER_AREA)
    hv = np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_AREA) for c in maps.hv])
    return coarse, hv, np.ascontiguousarray(maps.types[::2, ::2]), 0.5, 2


def _baseline_cases(folder: Path, cases: Sequence[str]) -> list[tuple[str, tuple]]:
    """The inputs of each case of one folder: generated map sets get ``cases``; a real model's
    maps (``make_maps.py --model-maps``) run at the model's resolution, ``native`` without and
    ``card`` with its card's upsampling."""
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("source") != "model":
        maps = load_map_set(folder)
        return [(case, baseline_inputs(maps, case)) for case in cases]
    np_prob, hv, types = (np.load(folder / f"{n}.npy") for n in ("np_prob", "hv", "types"))
    mpp = float(meta["mpp"])
    return [("native", (np_prob, hv, types, mpp, 1)),
            (f"card-up{meta['upsample']}", (np_prob, hv, types, mpp, int(meta["upsample"])))]


def run_baseline(folders: Sequence[Path], *, repeats: int, cases: Sequence[str]) -> dict[str, Any]:
    """CPU time of today's ``segment_maps`` against the frozen baseline
    (``bench/_postprocess_reference.py``) on the same maps, alternating, in this process; and
    whether their label images are identical.

    One core: OpenCV's thread pool is set to 1 here; run with ``OMP_NUM_THREADS=1``.
    """
    import _postprocess_reference as baseline
    import cv2

    import worker.postprocess as post

    cv2.setNumThreads(1)
    sides = {"baseline": baseline, "today": post}
    stages = {name: _CpuStages(module) for name, module in sides.items()}
    rows: dict[str, Any] = {}
    for folder in folders:
        for case, (np_prob, hv, types, mpp, factor) in _baseline_cases(folder, cases):
            cpu: dict[str, list[float]] = {name: [] for name in sides}
            split: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
            labels: dict[str, NDArray] = {}
            for module in sides.values():  # warm-up, untimed
                module.segment_maps(np_prob[:256, :256], hv[:, :256, :256], types[:256, :256],
                                    mpp=mpp, options=_options(module, factor))
            for _ in range(repeats):
                for name, module in sides.items():
                    stages[name].seconds = {}
                    start = time.process_time()
                    result = module.segment_maps(np_prob, hv, types, mpp=mpp,
                                                 options=_options(module, factor))
                    cpu[name].append(time.process_time() - start)
                    split[name].append(dict(stages[name].seconds))
                    labels[name] = result.labels
            base, today = min(cpu["baseline"]), min(cpu["today"])
            rows[f"{folder.name} {case}"] = {
                "fine_shape": list(labels["today"].shape), "nuclei": int(labels["today"].max()),
                "baseline_cpu_s": cpu["baseline"], "today_cpu_s": cpu["today"],
                "ratio": base / today,
                "baseline_stages": split["baseline"][int(np.argmin(cpu["baseline"]))],
                "today_stages": split["today"][int(np.argmin(cpu["today"]))],
                "labels_identical": bool(np.array_equal(labels["baseline"], labels["today"])),
            }
            r = rows[f"{folder.name} {case}"]
            print(f"{folder.name} {case}: baseline {base:.3f} s, today {today:.3f} s CPU "
                  f"→ {r['ratio']:.2f}×, labels identical: {r['labels_identical']}", flush=True)
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "repeats": repeats,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows}


class _CpuStages(_OurStages):
    """:class:`_OurStages` in process CPU time."""

    def _wrap(self, fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.process_time() - start
        return timed


def baseline_table(result: dict[str, Any]) -> str:
    """The baseline comparison as a markdown table (labels = steps 1-7, the watershed half;
    measure = the per-nucleus records; the rest is upsampling and input checks)."""
    lines = ["| maps | fine grid | nuclei | baseline CPU s | today CPU s | speed-up | labels: baseline / "
             "today s | measure: baseline / today s | labels identical |",
             "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for name, r in result["rows"].items():
        h, w = r["fine_shape"]
        b, t = r.get("baseline_stages", {}), r.get("today_stages", {})
        lines.append(f"| {name} | {h}×{w} | {r['nuclei']:,} | {min(r['baseline_cpu_s']):.3f} | "
                     f"{min(r['today_cpu_s']):.3f} | **{r['ratio']:.2f}×** | "
                     f"{b.get('labels', math.nan):.3f} / {t.get('labels', math.nan):.3f} | "
                     f"{b.get('measure', math.nan):.3f} / {t.get('measure', math.nan):.3f} | "
                     f"{'yes' if r['labels_identical'] else 'NO'} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the run


def _folders(maps_dir: Path, sizes: Sequence[int]) -> list[Path]:
    folders = []
    for size in sizes:
        folder = maps_dir / f"maps_{size}"
        if not map_set_complete(folder):
            print(f"writing map set {folder}", flush=True)
            write_map_set(maps_dir, size)
        folders.append(folder)
    return folders


def _merge_round(total: dict[str, Any], part: dict[str, Any]) -> None:
    """Append one round's timings to the accumulated ones of a side."""
    for name, entry in part["sets"].items():
        acc = total["sets"].setdefault(name, {**entry, "seconds": [], "cpu_seconds": [], "stages": []})
        acc["seconds"] += entry["seconds"]
        acc["cpu_seconds"] += entry["cpu_seconds"]
        acc["stages"] += entry["stages"]
        acc["nuclei"] = entry["nuclei"]
    total["versions"] = part["versions"]
    total["peak_rss_mb"] = max(total.get("peak_rss_mb", 0.0), part["peak_rss_mb"])


def _inner_repeats(first_seconds: float, min_seconds: float) -> int:
    """Runs per round that make a round of one map set last about ``min_seconds`` (1..10)."""
    return max(1, min(10, math.ceil(min_seconds / max(first_seconds, 1e-3))))


def run(sizes: Sequence[int], *, repeats: int, maps_dir: Path, out: Path,
        tia_max_seconds: float, round_seconds: float = 1.0) -> dict[str, Any]:
    """The whole benchmark: maps, then ``repeats`` rounds of TIAToolbox's side (a subprocess)
    followed by ours on every map set, then the comparison of the outputs.

    Alternating rounds expose both sides to the same background load on a shared machine. After
    the first round (one run each), a map set that takes less than ``round_seconds`` is run
    several times per round, so fast map sets get more samples. A map set whose first
    TIAToolbox run times ``repeats`` exceeds ``tia_max_seconds`` is run by TIAToolbox in the
    first and the last round only.
    """
    from report import machine_facts

    folders = _folders(maps_dir, sizes)
    python = ensure_tiatoolbox_venv()
    tia_out, our_out = out / "tiatoolbox", out / "hoverserve"
    our_out.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    tia: dict[str, Any] = {"sets": {}}
    ours: dict[str, Any] = {"sets": {}}
    tia_plan = [(f, 1) for f in folders]
    our_plan = [(f, 1) for f in folders]
    slow: list[Path] = []
    loads = []
    for round_index in range(repeats):
        loads.append(round(os.getloadavg()[0], 2))
        print(f"round {round_index + 1}/{repeats} (load average {loads[-1]})", flush=True)
        if tia_plan:
            # Never both sides at once: TIAToolbox's subprocess ends before ours starts.
            subprocess.run([str(python), str(BENCH / "_tiatoolbox_side.py"),
                            *(str(f) for f, _ in tia_plan), "--out", str(tia_out),
                            "--repeats", *(str(n) for _, n in tia_plan)], check=True)
            _merge_round(tia, json.loads((tia_out / "tiatoolbox.json").read_text()))
        _merge_round(ours, run_ours([f for f, _ in our_plan], our_out, [n for _, n in our_plan]))
        if round_index == 0:
            first_tia = {f: tia["sets"][f.name]["seconds"][0] for f in folders}
            slow = [f for f in folders if first_tia[f] * repeats > tia_max_seconds]
            tia_plan = [(f, _inner_repeats(first_tia[f], round_seconds)) for f in folders
                        if f not in slow]
            our_plan = [(f, _inner_repeats(ours["sets"][f.name]["seconds"][0], round_seconds))
                        for f in folders]
        if round_index == repeats - 2 and slow:
            # The slow map sets get a second TIAToolbox run, in the last round.
            tia_plan += [(f, 1) for f in slow]
    sets = {}
    for folder in folders:
        name = folder.name
        maps = load_map_set(folder)
        tia_types = np.load(tia_out / f"{name}_types.npz")
        our_types = np.load(our_out / f"{name}_types.npz")
        comparison = compare_outputs(
            np.load(tia_out / f"{name}_labels.npy"), tia_types["ids"], tia_types["types"],
            np.load(our_out / f"{name}_labels.npy"), our_types["ids"], our_types["types"],
            gt_labels=maps.gt_inst,
        )
        pixels = int(np.prod(maps.shape))
        t, o = tia["sets"][name], ours["sets"][name]
        speed = speed_summary(t["seconds"], o["seconds"], pixels, t["nuclei"],
                              tia_cpu=t["cpu_seconds"], our_cpu=o["cpu_seconds"])
        sets[name] = {"size": maps.shape[0], "pixels": pixels, "gt_nuclei": maps.meta["gt_nuclei"],
                      **speed, "comparison": comparison,
                      "tia_stages": _stage_min(tia["sets"][name]),
                      "our_stages": _stage_min(ours["sets"][name])}
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "repeats": repeats, "machine": facts,
            "loadavg_per_round": loads, "sets": sets,
            "tiatoolbox": {"versions": tia["versions"], "peak_rss_mb": tia["peak_rss_mb"]},
            "hoverserve": {"versions": ours["versions"], "peak_rss_mb": ours["peak_rss_mb"]}}


def _stage_min(entry: dict[str, Any]) -> dict[str, float]:
    """Stage seconds of the fastest run."""
    best = int(np.argmin(entry["seconds"]))
    stages = dict(entry["stages"][best]) if entry["stages"] else {}
    stages["other"] = entry["seconds"][best] - sum(stages.values())
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds; each runs both sides on every map set (best and median)")
    parser.add_argument("--round-seconds", type=float, default=1.0,
                        help="map sets faster than this run several times per round")
    parser.add_argument("--tia-max-seconds", type=float, default=300.0,
                        help="a TIAToolbox map set whose first run × repeats exceeds this runs "
                        "in the first and last rounds only")
    parser.add_argument("--maps", type=Path, default=WORK / "maps")
    parser.add_argument("--out", type=Path, default=WORK / "postprocess")
    parser.add_argument("--results", type=Path, default=RESULTS / "postprocess.json")
    parser.add_argument("--setup-only", action="store_true", help="only create TIAToolbox's venv")
    parser.add_argument("--baseline", action="store_true",
                        help="instead: today's code against bench/_postprocess_reference.py "
                        "(CPU time, one core) on the map sets and any real model maps "
                        "(make_maps.py --model-maps), results to bench/results/postprocess_baseline.*")
    parser.add_argument("--cases", nargs="+", default=list(BASELINE_CASES), choices=BASELINE_CASES)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.baseline:
        model_maps = sorted(f for f in args.maps.glob("model_*") if (f / "meta.json").is_file())
        result = run_baseline([*_folders(args.maps, args.sizes), *model_maps], repeats=args.repeats,
                              cases=args.cases)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "postprocess_baseline.json").write_text(json.dumps(result, indent=2) + "\n")
        table = baseline_table(result)
        (RESULTS / "postprocess_baseline.md").write_text(table)
        print(table)
        return 0 if all(r["labels_identical"] for r in result["rows"].values()) else 1
    if args.setup_only:
        print(ensure_tiatoolbox_venv())
        return 0
    result = run(args.sizes, repeats=args.repeats, maps_dir=args.maps, out=args.out,
                 tia_max_seconds=args.tia_max_seconds, round_seconds=args.round_seconds)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    for name, entry in result["sets"].items():
        c = entry["comparison"]
        print(f"{name}: TIAToolbox {entry['tia_min_s']:.3f} s, HoVerServe {entry['our_min_s']:.3f} s "
              f"→ {entry['ratio_min']:.2f}× (CPU {entry['ratio_cpu_min']:.2f}×); "
              f"TIA instances matched {c['tia_matched_by_ours']:.4f}, types equal {c['types_equal']:.4f}")
    print(f"wrote {args.results}")
    return 0


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _options(module: Any, factor: int) -> Any:
    """The hover options of ``module``: today's code takes them from the model families, the
    frozen reference still defines its own."""
    from models.families import HoverOptions

    return getattr(module, "PostprocessOptions", HoverOptions)(upsample=factor)


if __name__ == "__main__":
    raise SystemExit(main())
