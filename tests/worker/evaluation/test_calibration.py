"""Class outcomes for calibration, through the inference path: on point data and on classified
outline data the oracle's classes are all right at full vote share; with the classes flipped
none is; the card's own calibration is left out of raw outcomes and applied otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.card import read_card, replace_card
from tests._synthetic import build_oracle, draw_ellipses, encode_slide
from tests.models.test_evaluate_points import _write_points
from worker.evaluation.calibration import class_outcomes


def test_outcomes_from_the_inference_path(tmp_path: Path) -> None:
    oracle = build_oracle(tmp_path / "oracle.onnx")
    data = tmp_path / "points"
    n = _write_points(data)
    got = class_outcomes(oracle, data, split="val")
    assert got.scores.size == n and got.correct.all() and (got.scores == 1.0).all()
    flipped = tmp_path / "flipped"
    _write_points(flipped, flip_classes=True)
    assert not class_outcomes(oracle, flipped, split="val").correct.any()


def test_outline_data_gives_outcomes_per_annotated_nucleus(tmp_path: Path) -> None:
    oracle = build_oracle(tmp_path / "oracle.onnx")
    inst, classes = draw_ellipses((200, 240), 12, seed=4)
    np.savez(tmp_path / "one.npz", image=encode_slide(inst, classes), inst=inst,
             type_map=classes[inst].astype(np.uint8), mpp=np.float32(0.25))
    got = class_outcomes(oracle, tmp_path / "one.npz")
    assert got.scores.size == len(np.unique(inst[inst > 0]))
    assert got.correct.all() and (got.scores == 1.0).all()


def test_raw_outcomes_ignore_the_cards_calibration(tmp_path: Path) -> None:
    plain = build_oracle(tmp_path / "oracle.onnx")
    card = read_card(plain)
    calibrated = tmp_path / "calibrated.onnx"
    postprocess = {**card.postprocess, "class_prob_calibration": [[0.0, 0.1], [1.0, 0.6]]}
    replace_card(plain, calibrated, card.model_copy(update={"postprocess": postprocess}))
    data = tmp_path / "points"
    _write_points(data)
    assert (class_outcomes(calibrated, data, split="val").scores == 1.0).all()
    assert np.allclose(class_outcomes(calibrated, data, split="val", raw=False).scores, 0.6)
