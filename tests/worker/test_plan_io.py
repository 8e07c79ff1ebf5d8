"""The stored plan: JSON plus arrays, read back equal to what was planned, never a pickle."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest

from tests._synthetic import oracle_card
from tests.service._server import CMU1
from worker.job import SlidePlan
from worker.options import InferenceOptions
from worker.plan_io import VERSION, PlanFormatError, dump_plan, load_plan
from worker.stages import prepare


@pytest.fixture(scope="module")
def plan() -> SlidePlan:
    return prepare(CMU1, oracle_card(), InferenceOptions(model=Path("unused.onnx"), roi=(0, 0, 900, 700),
                                                         objects="cells", min_class_prob=0.3))


def assert_plans_equal(a: SlidePlan, b: SlidePlan) -> None:
    for f in dataclasses.fields(SlidePlan):
        left, right = getattr(a, f.name), getattr(b, f.name)
        if f.name == "thumbnail":
            assert left.dtype == right.dtype and np.array_equal(left, right)
        elif f.name == "tissue":
            assert (left is None) == (right is None)
            if left is not None:
                assert np.array_equal(left.mask, right.mask) and left.mask.dtype == right.mask.dtype
                assert (left.downsample, left.origin) == (right.downsample, right.origin)
        elif f.name == "stains":
            for name in ("hematoxylin", "eosin", "background"):
                assert getattr(left, name).tobytes() == getattr(right, name).tobytes()
            assert left.source == right.source
        else:
            assert left == right, f.name


def test_a_plan_reads_back_equal_in_every_field_and_bit(plan: SlidePlan) -> None:
    assert plan.tissue is not None and plan.regions and plan.stains.source == "macenko"
    assert_plans_equal(load_plan(*dump_plan(plan)), plan)


def test_a_plan_without_tissue_mask_reads_back_too(plan: SlidePlan) -> None:
    bare = dataclasses.replace(plan, tissue=None)
    assert load_plan(*dump_plan(bare)).tissue is None


def test_the_json_is_the_documented_format_and_the_arrays_need_no_pickle(plan: SlidePlan) -> None:
    plan_json, plan_npz = dump_plan(plan)
    record = json.loads(plan_json)
    assert record["format"] == "hoverserve.plan" and record["version"] == VERSION
    assert record["slide"]["name"] == CMU1.name and record["objects"] == "cells"
    assert len(record["regions"]) == len(plan.regions) and len(record["regions"][0]) == 9
    with np.load(io.BytesIO(plan_npz), allow_pickle=False) as arrays:
        assert set(arrays.files) == {"thumbnail", "tissue_mask", "hematoxylin", "eosin", "background"}


def test_pointing_a_plan_at_another_copy_leaves_the_original_alone(plan: SlidePlan) -> None:
    moved = plan.at(Path("/elsewhere/slide.svs"))
    assert moved.slide_path == Path("/elsewhere/slide.svs") and plan.slide_path == CMU1
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.regions = ()  # type: ignore[misc]


@pytest.mark.parametrize("change", [
    lambda r: {**r, "version": VERSION + 1},
    lambda r: {**r, "format": "something.else"},
    lambda r: {k: v for k, v in r.items() if k != "grid"},
    lambda r: {**r, "stains": {"source": "guessed"}},
])
def test_a_plan_of_another_version_or_damaged_is_refused_by_name(plan: SlidePlan, change) -> None:
    plan_json, plan_npz = dump_plan(plan)
    bad = json.dumps(change(json.loads(plan_json))).encode()
    with pytest.raises(PlanFormatError):
        load_plan(bad, plan_npz)
    with pytest.raises(PlanFormatError):
        load_plan(plan_json, plan_npz[: len(plan_npz) // 2])


def test_a_region_outside_the_plan_is_named(plan: SlidePlan) -> None:
    with pytest.raises(ValueError, match=f"no region {len(plan.regions)}"):
        plan.region(len(plan.regions))
