"""Terminal tables of :mod:`models.evaluate` results: a summary of one evaluation and a table
of a post-processing sweep. Cells are strings; the CLI renders each as a ``rich.table.Table``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["summary_tables", "sweep_table"]


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


_OPTION_COLUMNS = (("np_threshold", "np"), ("marker_threshold", "marker"), ("upsample", "upsample"),
                   ("fg_threshold", "fg"), ("boundary_threshold", "boundary"),
                   ("score_threshold", "score"), ("mask_threshold", "mask"))
"""Post-processing option → sweep-table column; the hover family's three unless a result names
another family's options."""
_HOVER_COLUMNS = tuple(key for key, _ in _OPTION_COLUMNS[:3])


def sweep_table(results: Sequence[Mapping[str, Any]]) -> tuple[str, list[str], list[list[str]]]:
    """A terminal table of a threshold sweep: one row per post-processing setting (each result
    carries its ``postprocess``; the columns are its family's options), with the headline
    metrics; undefined values show as "–"."""
    used = {key for result in results for key in result["postprocess"]}
    keys = [k for k, _ in _OPTION_COLUMNS if k in used and k not in _HOVER_COLUMNS] or list(_HOVER_COLUMNS)
    labels = dict(_OPTION_COLUMNS)
    rows = []
    for result in results:
        inst, det = result["instance"]["per_image_mean"], result["detection"]
        f_c = [c["f1"] for c in result["classes"].values() if c["f1"] is not None]
        options = [str(result["postprocess"].get(k, 1 if k == "upsample" else "–")) for k in keys]
        rows.append([
            *options,
            _fmt(inst["pq"]), _fmt(inst["aji"]), _fmt(det["f1"]),
            _fmt(sum(f_c) / len(f_c) if f_c else None), _fmt(result["mpq_plus"]),
        ])
    header = [*(labels[k] for k in keys), "PQ", "AJI", "F_d", "mean F_c", "mPQ+"]
    return "post-processing options", header, rows


def summary_tables(result: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Tables for a terminal: ``(title, header, rows)`` with every cell a string.

    The CLI renders each as a ``rich.table.Table``; undefined values show as "–".
    """
    inst = result["instance"]
    det = result["detection"]
    overall = [
        [label, _fmt(inst["per_image_mean"][key]), _fmt(inst["pooled"][key])]
        for key, label in (
            ("dice", "Dice"),
            ("aji", "AJI"),
            ("aji_plus", "AJI+"),
            ("dq", "DQ"),
            ("sq", "SQ"),
            ("pq", "PQ"),
        )
    ]
    overall.append(["F1 detection", "", _fmt(det["f1"])])
    overall.append(["precision / recall", "", f"{_fmt(det['precision'])} / {_fmt(det['recall'])}"])
    if "type_accuracy" in det:
        overall.append(["type accuracy", "", _fmt(det["type_accuracy"])])
    title = f"{result['n_images']} images, pairing radius {result['radius_px']:.1f} px"
    tables = [(title, ["metric", "per-image mean", "pooled"], overall)]
    if result["classes"]:
        rows = [
            [
                name,
                _fmt(c["f1"]),
                _fmt(c["pq"]),
                _fmt(c["pq_image_mean"]),
                _fmt(c["r2"]),
                str(c["n_gt"]),
                str(c["n_pred"]),
            ]
            for name, c in result["classes"].items()
        ]
        rows.append(
            ["mean", "", _fmt(result["mpq_plus"]), _fmt(result["mpq_image_mean"]),
             _fmt(result["r2_mean"]), "", ""]
        )
        header = ["class", "F_c", "PQ (mPQ+)", "PQ per-image", "count R²", "GT", "pred"]
        tables.append(("per class", header, rows))
    return tables
