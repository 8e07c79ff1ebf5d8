"""The smoke config trains, writes a resumable checkpoint, and resuming continues from its step;
the held-out score is the injected validator's (the worker's, in ``hoverserve model train``), and
the best checkpoint is the step it scores highest."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from models.train.config import REPO_ROOT, TrainConfig, load_config
from models.train.data import Item
from models.train.loop import run_training, train
from worker.evaluation.validation import validate_training

SMOKE = REPO_ROOT / "configs" / "smoke.yaml"


def _config(tmp_path: Path, **update: object):
    config = load_config(SMOKE)
    data = config.data.model_copy(update={"holdout": ()})  # no evaluation: keeps the test quick
    return config.model_copy(update={"output_dir": tmp_path, "data": data, **update})


def test_smoke_config_trains_and_evaluates(tmp_path: Path) -> None:
    config = load_config(SMOKE).model_copy(update={"output_dir": tmp_path})
    checkpoint = run_training(config, device="cpu", progress=False, validate=validate_training)
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == config.steps
    assert "monuseg/pq" in state["metrics"]
    assert (checkpoint.parent / "best.pt").is_file()
    lines = (checkpoint.parent / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, config.steps + 1))


def test_without_a_validator_held_out_items_are_not_scored(tmp_path: Path) -> None:
    config = load_config(SMOKE).model_copy(update={"output_dir": tmp_path, "steps": 2})
    assert config.data.holdout
    checkpoint = run_training(config, device="cpu", progress=False)
    assert torch.load(checkpoint, weights_only=True)["metrics"] == {}
    assert not (checkpoint.parent / "best.pt").exists()
    assert not (checkpoint.parent / "eval.jsonl").exists()


def test_the_best_checkpoint_is_the_step_the_validator_scores_highest(tmp_path: Path) -> None:
    config = load_config(SMOKE).model_copy(update={"output_dir": tmp_path, "eval_every": 1})
    scores = iter([0.2, 0.9, 0.5, 0.1])  # step 2 is the best
    seen: list[tuple[bool, list[str], TrainConfig]] = []

    def validate(model: torch.nn.Module, items: Sequence[Item], given: TrainConfig) -> dict[str, float]:
        seen.append((model.training, sorted({item.group for item in items}), given))
        return {"held/pq": next(scores), "held/f1_d": float("nan")}

    checkpoint = run_training(config, device="cpu", progress=False, validate=validate)
    assert len(seen) == config.steps
    assert all(groups == list(config.data.holdout) and given == config for _, groups, given in seen)
    best = torch.load(checkpoint.parent / "best.pt", weights_only=True)
    assert best["step"] == 2 and best["best"] == pytest.approx(0.45)  # NaN counts as 0
    evaluated = [json.loads(line) for line in (checkpoint.parent / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evaluated] == [1, 2, 3, 4]
    assert torch.load(checkpoint, weights_only=True)["metrics"]["held/pq"] == 0.1


def test_resume_continues_from_the_checkpoint_step(tmp_path: Path) -> None:
    straight = run_training(_config(tmp_path / "a", steps=4), device="cpu", progress=False)
    run_training(_config(tmp_path / "b", steps=4, checkpoint_every=2), device="cpu", progress=False)
    # interrupt-and-resume: train 2 of 4 steps, then resume to the end
    half = _config(tmp_path / "c", steps=4, checkpoint_every=2)
    _stop_after(half, 2)
    assert torch.load(half.run_dir / "last.pt", weights_only=True)["step"] == 2
    resumed = run_training(half, resume=True, device="cpu", progress=False)
    a = torch.load(straight, weights_only=True)
    c = torch.load(resumed, weights_only=True)
    assert c["step"] == 4
    for key, value in a["model"].items():
        torch.testing.assert_close(c["model"][key], value, atol=1e-5, rtol=1e-4)


def _stop_after(config, steps: int) -> None:
    # same schedule (total steps unchanged) but the process stops early, as if killed
    import models.train.loop as loop

    original = loop.PatchSampler.batch

    def batch(self, step: int, batch_size: int):
        if step >= steps:
            raise KeyboardInterrupt
        return original(self, step, batch_size)

    loop.PatchSampler.batch = batch
    try:
        with pytest.raises(KeyboardInterrupt):
            run_training(config, device="cpu", progress=False)
    finally:
        loop.PatchSampler.batch = original


def test_existing_run_is_not_overwritten_without_resume(tmp_path: Path) -> None:
    config = _config(tmp_path, steps=2)
    run_training(config, device="cpu", progress=False)
    with pytest.raises(ValueError, match="exists"):
        run_training(config, device="cpu", progress=False)


def test_train_reads_a_config_file(tmp_path: Path) -> None:
    text = (
        SMOKE.read_text()
        .replace("output_dir: runs", f"output_dir: {tmp_path}")
        .replace("steps: 4", "steps: 1")
    )
    path = tmp_path / "smoke.yaml"
    path.write_text(text)
    assert train(path, device="cpu", progress=False) == tmp_path / "smoke" / "last.pt"


def test_init_from_starts_from_another_runs_weights(tmp_path: Path) -> None:
    first = run_training(_config(tmp_path / "a", steps=1), device="cpu", progress=False)
    tuned = _config(tmp_path / "b", steps=1, init_from=first, name="tuned")
    import models.train.loop as loop

    model = loop.build_model(tuned.model)
    model.load_state_dict(torch.load(first, weights_only=True)["model"])
    # with zero learning rate the fine-tuned weights are exactly the initial ones
    zero_lr = tuned.optim.model_copy(update={"lr": 1e-12, "weight_decay": 0.0})
    out = run_training(tuned.model_copy(update={"optim": zero_lr}), device="cpu", progress=False)
    state = torch.load(out, weights_only=True)["model"]
    for key, value in model.state_dict().items():
        if key.endswith("weight") and "bn" not in key:
            torch.testing.assert_close(state[key], value, atol=1e-6, rtol=0)


def test_loader_workers_train_on_exactly_the_same_batches(tmp_path: Path) -> None:
    # batch k depends only on (seed, k), so drawing batches in worker processes changes nothing
    inline = run_training(_config(tmp_path / "a", steps=3), device="cpu", progress=False)
    workers = run_training(_config(tmp_path / "b", steps=3, loader_workers=2), device="cpu", progress=False)
    a = torch.load(inline, weights_only=True)["model"]
    b = torch.load(workers, weights_only=True)["model"]
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, atol=0, rtol=0)


def test_bf16_autocast_trains_with_float32_losses(tmp_path: Path) -> None:
    checkpoint = run_training(
        _config(tmp_path, steps=2, mixed_precision="bf16"), device="cpu", progress=False
    )
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == 2
    assert all(v.dtype == torch.float32 for k, v in state["model"].items() if v.is_floating_point())
    record = json.loads((checkpoint.parent / "log.jsonl").read_text().splitlines()[-1])
    assert all(np.isfinite(v) for v in record.values())
