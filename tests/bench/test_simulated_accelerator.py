"""bench/simulated_accelerator.py: the simulated accelerator gives the pipeline the real model's
outputs, so a simulated run finds exactly the nuclei a real run finds; its busy share of the wall
time lies in 0..1 and grows with its latency."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest

from tests._synthetic import build_oracle, oracle_card
from worker.infer import load_model
from worker.pipeline import InferenceOptions, run_slide

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import simulated_accelerator as sim  # noqa: E402

CMU1 = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_oracle(tmp_path_factory.mktemp("model") / "oracle.onnx", oracle_card(mpp=0.5))


def _options(model: Path, workers: int) -> InferenceOptions:
    # A small ROI of real H&E, several regions so seams are settled as on a slide.
    return InferenceOptions(model=model, roi=(600, 800, 480, 400), region_size=256,
                            workers=workers, tissue="none")


@pytest.mark.slow
def test_simulated_runs_find_the_real_runs_nuclei_and_busy_share_grows(
        oracle: Path, tmp_path: Path) -> None:
    fs, root = fsspec.url_to_fs(str(tmp_path / "pipeline"))
    reference = run_slide(CMU1, fs=fs, root=root, options=_options(oracle, 0))
    assert len(reference.table) > 10

    real, runs = sim.simulate(CMU1, oracle, _options(oracle, 0), latencies_ms=[0, 10, 40],
                              workers=[0], work=tmp_path / "work")
    assert real.regions > 1
    assert sim.same_nuclei(real.table, reference.table)  # the bench driver is run_slide's pipeline
    for run in runs:
        assert sim.same_nuclei(run.table, reference.table)
        assert run.batches == sim.real_batches(runs) > 0
    shares = [sim.busy_fraction(r.busy_s, r.wall_s) for r in runs]
    assert shares[0] == 0.0
    assert all(0.0 < s < 1.0 for s in shares[1:])
    assert shares[0] < shares[1] < shares[2]
    # Each batch slept at least its latency.
    assert runs[2].busy_s >= runs[2].batches * 0.040


@pytest.mark.slow
def test_a_simulated_run_on_a_worker_pool_finds_the_same_nuclei(oracle: Path, tmp_path: Path) -> None:
    real, runs = sim.simulate(CMU1, oracle, _options(oracle, 1), latencies_ms=[5], workers=[1],
                              work=tmp_path / "work")
    assert len(real.table) > 10 and sim.same_nuclei(runs[0].table, real.table)
    assert runs[0].pool_cpu_s is not None and runs[0].pool_cpu_s > 0
    summary = sim.summarise(real, runs)
    assert summary["cores"][0]["latency_ms"] == 5
    assert summary["cores"][0]["cores"] > 0
    document = {"runs": [r.record() for r in runs], "summary": summary}
    text = sim.markdown(document)
    assert "| 5 | 1 |" in text and "cores to keep it busy" in text


def test_an_unrecorded_patch_is_refused(oracle: Path) -> None:
    model = load_model(oracle)
    accelerator = sim.SimulatedAccelerator(model, {}, 0.0)
    patches = np.zeros((1, 3, model.card.input_size, model.card.input_size), np.float32)
    with pytest.raises(ValueError, match="never saw"):
        accelerator.predict(patches)
    with pytest.raises(ValueError, match="latency"):
        sim.SimulatedAccelerator(model, {}, -1.0)


def test_recorded_outputs_come_back_per_patch_in_any_batching(oracle: Path) -> None:
    model = load_model(oracle, batch_size=2)
    rng = np.random.default_rng(0)
    size = model.card.input_size
    patches = rng.integers(0, 256, (5, 3, size, size)).astype(np.float32)
    recording = sim.RecordingModel(model)
    expected = recording.predict(patches)
    assert len(recording.recorded) == 5
    accelerator = sim.SimulatedAccelerator(model, recording.recorded, 0.001)
    got = accelerator.predict(patches[::-1].copy())
    assert accelerator.batches == 3 and accelerator.busy_s >= 0.003
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value[::-1])


def test_cores_and_busy_share_arithmetic() -> None:
    assert sim.cores_to_keep_busy(3.4, 1.0) == pytest.approx(3.4)
    assert math.isinf(sim.cores_to_keep_busy(1.0, 0.0))
    assert sim.busy_fraction(1.0, 4.0) == 0.25 and sim.busy_fraction(0.0, 0.0) == 0.0
    with pytest.raises(ValueError):
        sim.busy_fraction(-1.0, 1.0)
    with pytest.raises(ValueError):
        sim.cores_to_keep_busy(-1.0, 1.0)
