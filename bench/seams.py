"""Seams: do two region sizes report the same nuclei? And where do they differ?

Runs the same slide through ``worker.pipeline.run_slide`` at several region sizes and, for every
pair, reports the share of each run's nuclei that the other run has too (best polygon IoU above
0.95: "identical"; at least 0.5: "matched"), and, for the smallest region size, the share of
non-identical nuclei by distance to the nearest region-core border — a seam effect shows as
disagreement concentrated near the borders, a region-wide effect (e.g. a normalisation over the
region's maps) as disagreement spread evenly.

Run ``python bench/seams.py [--slide S] [--model M.onnx] [--sizes 512 1024 2048]``; results go to
``bench/results/seams.json`` (``--out``) and a markdown table to stdout with ``--markdown``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from models.zoo import default_model  # noqa: E402
from worker.job import SlidePlan  # noqa: E402
from worker.nuclei import NucleusTable  # noqa: E402
from worker.options import InferenceOptions  # noqa: E402

SLIDE = BENCH.parent / ".." / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
IDENTICAL_IOU = 0.95
BORDER_BANDS_PX = (20, 50, 100, 200)


def best_iou(table: NucleusTable, other: NucleusTable) -> np.ndarray:
    """For each nucleus of ``table``, its highest polygon IoU with any nucleus of ``other``."""
    import shapely

    polys = [shapely.Polygon(table.polygon(i)).buffer(0) for i in range(len(table))]
    others = [shapely.Polygon(other.polygon(i)).buffer(0) for i in range(len(other))]
    tree = shapely.STRtree(others)
    best = np.zeros(len(polys))
    for i, poly in enumerate(polys):
        for j in tree.query(poly, predicate="intersects"):
            inter = poly.intersection(others[j]).area
            best[i] = max(best[i], inter / (poly.area + others[j].area - inter))
    return best


def border_distance(table: NucleusTable, plan: SlidePlan) -> np.ndarray:
    """Level-0 distance of each nucleus centroid to the nearest region-core border of ``plan``."""
    s = plan.grid.level0_per_model
    rows = np.array(sorted({b * s for r in plan.regions for b in (r.core.row0, r.core.row1)}))
    cols = np.array(sorted({b * s for r in plan.regions for b in (r.core.col0, r.core.col1)}))
    x, y = table.centroid[:, 0], table.centroid[:, 1]
    return np.minimum(np.abs(y[:, None] - rows[None]).min(axis=1),
                      np.abs(x[:, None] - cols[None]).min(axis=1))


def compare(runs: dict[int, tuple[NucleusTable, SlidePlan]]) -> dict[str, Any]:
    """The agreement of every pair of runs, and where the smallest run disagrees."""
    sizes = sorted(runs)
    pairs = []
    for i, a in enumerate(sizes):
        for b in sizes[i + 1:]:
            ab, ba = best_iou(runs[a][0], runs[b][0]), best_iou(runs[b][0], runs[a][0])
            pairs.append({"sizes": [a, b], "nuclei": [len(ab), len(ba)],
                          "identical": [float((ab > IDENTICAL_IOU).mean()),
                                        float((ba > IDENTICAL_IOU).mean())],
                          "matched": [float((ab >= 0.5).mean()), float((ba >= 0.5).mean())]})
    small, large = sizes[0], sizes[-1]
    table, plan = runs[small]
    differs = best_iou(table, runs[large][0]) <= IDENTICAL_IOU
    distance = border_distance(table, plan)
    bands = [{"within_px": band, "nuclei": int((distance < band).sum()),
              "not_identical": float(differs[distance < band].mean()) if (distance < band).any()
              else None} for band in BORDER_BANDS_PX]
    bands.append({"within_px": None, "nuclei": len(table), "not_identical": float(differs.mean())})
    return {"pairs": pairs, "regions": {str(k): len(v[1].regions) for k, v in runs.items()},
            "by_border_distance": {"run": small, "against": large, "bands": bands}}


def run(slide: Path, model: Path, sizes: Sequence[int], *, workers: int, work: Path,
        roi: tuple[int, int, int, int] | None = None, tissue: str = "auto") -> dict[str, Any]:
    import fsspec

    from worker.pipeline import run_slide

    runs = {}
    for size in sizes:
        options = InferenceOptions(model=model, region_size=size, workers=workers, roi=roi,
                                   tissue=tissue)  # type: ignore[arg-type]
        result = run_slide(slide, fs=fsspec.filesystem("file"), root=str(work / str(size)),
                           options=options)
        runs[size] = (result.table, result.plan)
    return {"slide": slide.name, "model": model.name, **compare(runs)}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| region sizes | nuclei | identical (IoU > 0.95) | matched (IoU ≥ 0.5) |",
             "| :--- | ---: | ---: | ---: |"]
    for p in result["pairs"]:
        a, b = p["sizes"]
        lines.append(f"| {a} vs {b} | {p['nuclei'][0]:,} / {p['nuclei'][1]:,} | "
                     f"{p['identical'][0]:.2%} / {p['identical'][1]:.2%} | "
                     f"{p['matched'][0]:.2%} / {p['matched'][1]:.2%} |")
    where = result["by_border_distance"]
    lines += ["", f"Nuclei of the {where['run']}-px run not identical in the {where['against']}-px "
              "run, by distance of their centroid to the nearest region-core border:", "",
              "| within (level-0 px) | nuclei | not identical |", "| ---: | ---: | ---: |"]
    for band in where["bands"]:
        share = "–" if band["not_identical"] is None else f"{band['not_identical']:.2%}"
        lines.append(f"| {band['within_px'] or 'anywhere'} | {band['nuclei']:,} | {share} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=SLIDE)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "seams.json")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    model = args.model or default_model()
    if model is None:
        print("bench/seams.py: no bundled default model; pass --model", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="hoverserve-seams-") as work:
        result = run(args.slide, Path(model), args.sizes, workers=args.workers, work=Path(work))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown(result) if args.markdown else f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
