"""Specification of models.evaluate_tables: the terminal tables of an evaluation and of a sweep."""

from __future__ import annotations

import math

from models.evaluate import evaluate_dataset
from models.evaluate_tables import summary_tables, sweep_table
from tests.models._cases import CLASSES, images


def test_summary_tables() -> None:
    res = evaluate_dataset(images(), radius=12, class_names=CLASSES)
    tables = summary_tables(res)
    assert [t[0] for t in tables] == ["3 images, pairing radius 12.0 px", "per class"]
    _, header, rows = tables[0]
    assert header == ["metric", "per-image mean", "pooled"]
    assert rows[5] == ["PQ", "0.5000", "0.4000"]
    assert all(len(r) == len(header) for r in rows)
    _, header, rows = tables[1]
    assert rows[0][:3] == ["a", "1.0000", "1.0000"]
    assert rows[-1][0] == "mean" and all(len(r) == len(header) for r in rows)
    untyped = summary_tables(evaluate_dataset(images()[2:], radius=12))
    assert len(untyped) == 1 and untyped[0][2][0] == ["Dice", "–", "–"]
    assert not math.isnan(res["instance"]["pooled"]["pq"])


def test_sweep_table_has_a_row_per_setting() -> None:
    typed = evaluate_dataset(images(), radius=12, class_names=CLASSES)
    untyped = evaluate_dataset([(p, None, g, None) for p, _, g, _ in images()], radius=12)
    results = [{**typed, "postprocess": {"np_threshold": 0.5, "marker_threshold": 0.4}},
               {**untyped, "postprocess": {"np_threshold": 0.6}}]
    _, header, rows = sweep_table(results)
    assert header == ["np", "marker", "upsample", "PQ", "AJI", "F_d", "mean F_c", "mPQ+"]
    assert rows[0][:4] == ["0.5", "0.4", "1", "0.5000"]
    mean_f_c = sum(c["f1"] for c in typed["classes"].values()) / 2
    assert rows[0][6] == f"{mean_f_c:.4f}"
    assert rows[1][:2] == ["0.6", "–"] and rows[1][6:] == ["–", "–"]


def test_a_sweep_of_an_instance_model_shows_its_own_options() -> None:
    untyped = evaluate_dataset([(p, None, g, None) for p, _, g, _ in images()], radius=12)
    card = {"score_threshold": 0.6, "mask_threshold": 0.5, "min_unclaimed": 0.5}
    results = [{**untyped, "postprocess": {**card, "score_threshold": 0.4}},
               {**untyped, "postprocess": card}]
    _, header, rows = sweep_table(results)
    assert header == ["score", "mask", "PQ", "AJI", "F_d", "mean F_c", "mPQ+"]
    assert [row[:2] for row in rows] == [["0.4", "0.5"], ["0.6", "0.5"]]
