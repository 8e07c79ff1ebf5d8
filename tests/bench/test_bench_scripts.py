"""bench/: the map generator makes maps HoVer-Net post-processing can read back, and the
comparison, timing and report code gives the right numbers on tiny inputs.

TIAToolbox is never installed here; its side script is only checked for the input layout it
builds (numpy only).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import _tiatoolbox_side  # noqa: E402
import end_to_end  # noqa: E402
import make_maps  # noqa: E402
import postprocess  # noqa: E402
import report  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"


# --------------------------------------------------------------------------- make_maps


def test_hv_targets_of_a_bar_and_a_square_are_exact() -> None:
    inst = np.zeros((5, 9), np.int32)
    inst[1, 0:5] = 1  # a 1×5 bar: centre column 2, no vertical extent
    inst[1:4, 6:9] = 2  # a 3×3 square: centre (2, 7)
    hv = make_maps.hv_targets(inst)
    assert hv.dtype == np.float32 and hv.shape == (2, 5, 9)
    np.testing.assert_array_equal(hv[0, 1, 0:5], [-1, -0.5, 0, 0.5, 1])
    np.testing.assert_array_equal(hv[1, 1, 0:5], 0)  # one row: nothing to normalise
    np.testing.assert_array_equal(hv[0, 1:4, 6:9], [[-1, 0, 1]] * 3)
    np.testing.assert_array_equal(hv[1, 1:4, 6:9], [[-1] * 3, [0] * 3, [1] * 3])
    assert not hv[:, inst == 0].any()


def test_hv_targets_of_an_asymmetric_shape_reach_both_ends() -> None:
    inst = np.zeros((4, 4), np.int32)
    inst[0, 0:4] = 3
    inst[1, 0] = 3  # centre of mass pulled left: x extents differ on each side
    hv = make_maps.hv_targets(inst)
    values = hv[0][inst == 3]
    assert values.min() == -1.0 and values.max() == 1.0
    assert not make_maps.hv_targets(np.zeros((3, 3), np.int32)).any()


def test_mosaic_tiles_patches_with_unique_consecutive_ids() -> None:
    insts = np.zeros((3, 4, 4), np.int32)
    insts[0, :2, :2] = 7
    insts[1, 2:, 2:] = 40
    insts[1, :1, :] = 41
    insts[2, 1:3, 1:3] = 5
    types = (insts > 0).astype(np.uint8) * np.array([1, 2, 3], np.uint8)[:, None, None]
    inst, type_map = make_maps.mosaic(insts, types, 8, seed=1)
    assert inst.shape == (8, 8) and inst.dtype == np.int32 and type_map.dtype == np.uint8
    # 4 patch slots, 3 patches: all three used once, one again; ids 1..n without gaps.
    ids = np.unique(inst[inst > 0])
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    assert len(ids) == 1 + 2 + 1 + {0: 1, 1: 2, 2: 1}[_fourth_patch(insts, inst)]
    assert not type_map[inst == 0].any() and type_map[inst > 0].all()


def _fourth_patch(insts: np.ndarray, inst: np.ndarray) -> int:
    corner = inst[4:, 4:] > 0
    return next(k for k in range(3) if np.array_equal(corner, insts[k] > 0))


def test_mosaic_crops_to_size_and_rejects_bad_input() -> None:
    insts = np.ones((2, 4, 4), np.int32)
    inst, _ = make_maps.mosaic(insts, insts.astype(np.uint8), 6)
    assert inst.shape == (6, 6) and inst.max() == 4
    with pytest.raises(ValueError, match="equal"):
        make_maps.mosaic(insts, insts[:1].astype(np.uint8), 6)
    with pytest.raises(ValueError, match="size"):
        make_maps.mosaic(insts, insts.astype(np.uint8), 0)


def test_noisy_maps_are_probabilities_that_threshold_back_to_the_nuclei() -> None:
    inst = np.zeros((64, 64), np.int32)
    inst[10:30, 10:30] = 1
    inst[35:55, 20:44] = 2
    type_map = np.where(inst == 1, 2, np.where(inst == 2, 4, 0)).astype(np.uint8)
    np_prob, hv, types = make_maps.noisy_maps(inst, type_map, seed=3)
    assert np_prob.dtype == np.float32 and np_prob.shape == (64, 64)
    assert hv.dtype == np.float32 and hv.shape == (2, 64, 64)
    assert types.dtype == np.uint8
    assert np_prob.min() >= 0 and np_prob.max() <= 1 and hv.min() >= -1 and hv.max() <= 1
    assert len(np.unique(np_prob)) > 1000  # a probability map, not a mask
    assert np.mean((np_prob >= 0.5) == (inst > 0)) > 0.97
    interior = np.zeros_like(inst, bool)
    interior[13:27, 13:27] = True
    assert np.mean(types[interior] == 2) > 0.95


def test_map_set_round_trips_through_disk(tmp_path: Path) -> None:
    insts = np.zeros((2, 32, 32), np.int32)
    insts[:, 4:14, 4:14] = 1
    insts[:, 18:28, 16:30] = 2
    folder = make_maps.write_map_set(tmp_path, 64, seed=0,
                                     patches=(insts, (insts > 0).astype(np.uint8) * 3))
    assert folder == tmp_path / "maps_64" and make_maps.map_set_complete(folder)
    maps = make_maps.load_map_set(folder)
    assert maps.shape == (64, 64) and maps.hv.shape == (2, 64, 64)
    assert maps.gt_inst.max() == maps.meta["gt_nuclei"] == 8
    assert maps.meta["size"] == 64 and maps.meta["mpp"] == 0.25
    (folder / "hv.npy").unlink()
    assert not make_maps.map_set_complete(folder)


def test_maps_from_the_real_annotations_segment_back_into_their_nuclei(tmp_path: Path) -> None:
    from worker.postprocess import hover_instances

    insts, types = make_maps.load_patches()
    assert insts.shape[1:] == (256, 256) and len(insts) >= 256
    maps = make_maps.load_map_set(make_maps.write_map_set(tmp_path, 512, patches=(insts, types)))
    result = hover_instances(maps.np_prob, maps.hv, maps.types, mpp=0.25)
    match = postprocess.match_instances(maps.gt_inst, result.labels)
    assert match.recall > 0.8 and match.precision > 0.9
    gt_type = {int(i): int(np.bincount(maps.gt_types[maps.gt_inst == i]).argmax())
               for i in match.pairs[:, 0]}
    our_type = {n.label: n.type for n in result.nuclei}
    agree = np.mean([gt_type[a] == our_type[b] for a, b in match.pairs])
    assert agree > 0.9


# --------------------------------------------------------------------------- comparison


def test_identical_labels_up_to_renumbering_match_completely() -> None:
    a = np.zeros((6, 6), np.int32)
    a[0:2, 0:2], a[3:6, 3:6] = 4, 9
    b = np.where(a == 4, 1, np.where(a == 9, 2, 0))
    match = postprocess.match_instances(a, b)
    assert (match.n_reference, match.n_candidate) == (2, 2)
    assert match.recall == match.precision == 1.0
    np.testing.assert_array_equal(match.iou, [1.0, 1.0])
    assert sorted(map(tuple, match.pairs.tolist())) == [(4, 1), (9, 2)]


def test_matching_uses_the_iou_threshold() -> None:
    a = np.zeros((4, 8), np.int32)
    a[:, 0:4] = 1  # 16 px
    b = np.zeros_like(a)
    b[:, 2:6] = 1  # overlaps 8 px: IoU 8 / 24 = 1/3
    match = postprocess.match_instances(a, b)
    assert len(match.pairs) == 0 and match.recall == 0.0
    b[:] = 0
    b[:, 1:5] = 1  # now 12 / 20 = 0.6
    match = postprocess.match_instances(a, b)
    assert len(match.pairs) == 1 and match.iou[0] == pytest.approx(0.6)
    assert math.isnan(postprocess.match_instances(np.zeros((2, 2), int), np.zeros((2, 2), int)).recall)
    with pytest.raises(ValueError, match="equal"):
        postprocess.match_instances(a, b[:2])


def test_compare_outputs_counts_type_disagreements_and_gt_recall() -> None:
    tia = np.zeros((4, 8), np.int32)
    tia[:, 0:3], tia[:, 5:8] = 1, 2
    ours = np.where(tia == 1, 5, np.where(tia == 2, 6, 0)).astype(np.int32)
    ours[0, 4] = 7  # an extra one-pixel nucleus of ours
    result = postprocess.compare_outputs(
        tia, np.array([1, 2]), np.array([3, 1]),
        ours, np.array([5, 6, 7]), np.array([3, 2, 1]),
        gt_labels=tia,
    )
    assert result["tia_nuclei"] == 2 and result["our_nuclei"] == 3
    assert result["tia_matched_by_ours"] == 1.0
    assert result["ours_matched_by_tia"] == pytest.approx(2 / 3)
    assert result["types_equal"] == 0.5
    assert result["identical_instances"] == 1.0
    assert result["foreground_agreement"] == pytest.approx(31 / 32)
    assert result["gt_nuclei"] == 2 and result["tia_recall_of_gt"] == result["our_recall_of_gt"] == 1.0


def test_speed_summary_ratio_and_throughput() -> None:
    s = postprocess.speed_summary([4.0, 3.0, 5.0], [1.0, 1.5, 2.0], 2_000_000, 1000)
    assert s["tia_min_s"] == 3.0 and s["our_min_s"] == 1.0
    assert s["ratio_min"] == 3.0 and s["ratio_median"] == pytest.approx(4.0 / 1.5)
    assert s["our_mpx_s"] == 2.0 and s["tia_ms_per_1k_nuclei"] == 3000.0
    assert "ratio_cpu_min" not in s
    with pytest.raises(ValueError, match="at least one"):
        postprocess.speed_summary([], [1.0], 1, 1)


def test_speed_summary_with_cpu_times() -> None:
    s = postprocess.speed_summary([2.0], [1.0], 10, 10, tia_cpu=[1.8, 1.5], our_cpu=[0.5, 0.6])
    assert s["tia_cpu_min_s"] == 1.5 and s["our_cpu_min_s"] == 0.5 and s["ratio_cpu_min"] == 3.0


def test_fast_map_sets_run_several_times_per_round() -> None:
    assert postprocess._inner_repeats(0.25, 1.0) == 4
    assert postprocess._inner_repeats(3.0, 1.0) == 1
    assert postprocess._inner_repeats(0.0001, 1.0) == 10


def test_tiatoolbox_side_feeds_postproc_the_layout_infer_batch_returns(tmp_path: Path) -> None:
    insts = np.zeros((1, 16, 16), np.int32)
    insts[0, 2:8, 2:8] = 1
    folder = make_maps.write_map_set(tmp_path, 16, patches=(insts, insts.astype(np.uint8)))
    np_map, hv_map, tp_map = _tiatoolbox_side.tia_inputs(folder)
    maps = make_maps.load_map_set(folder)
    assert np_map.shape == (16, 16, 1) and hv_map.shape == (16, 16, 2) and tp_map.shape == (16, 16, 1)
    assert np_map.dtype == hv_map.dtype == tp_map.dtype == np.float32
    np.testing.assert_array_equal(hv_map[..., 0], maps.hv[0])  # channel 0 = horizontal
    np.testing.assert_array_equal(hv_map[..., 1], maps.hv[1])
    np.testing.assert_array_equal(tp_map[..., 0], maps.types)


# --------------------------------------------------------------------------- end to end


def test_measure_reports_exit_status_wall_time_and_peak_memory() -> None:
    command = [sys.executable, "-c",
               "import time, sys; b = b'x' * (120 * 2**20); time.sleep(0.4); sys.exit(3)"]
    code, wall, peak_mb, processes, samples, _ = end_to_end.measure(command)
    assert code == 3 and wall >= 0.4 and processes >= 1 and samples >= 2
    assert 120 <= peak_mb < 1000


def test_tissue_megapixels_from_area_and_resolution() -> None:
    assert end_to_end.tissue_mpx(1.0, 0.25) == pytest.approx(16.0)  # 4000 × 4000 px per mm²
    assert end_to_end.tissue_mpx(0.0, 0.5) == 0.0
    with pytest.raises(ValueError, match="mpp"):
        end_to_end.tissue_mpx(1.0, 0.0)


def test_default_slides_exist_in_shared_data() -> None:
    for slide in end_to_end.DEFAULT_SLIDES:
        assert slide.path.is_file(), slide.path


# --------------------------------------------------------------------------- report


def _postprocess_results() -> dict:
    comparison = {"tia_nuclei": 10, "our_nuclei": 10, "tia_matched_by_ours": 1.0,
                  "ours_matched_by_tia": 1.0, "identical_instances": 1.0, "mean_iou": 1.0,
                  "types_equal": 1.0, "foreground_agreement": 1.0, "gt_nuclei": 11,
                  "tia_recall_of_gt": 0.9, "our_recall_of_gt": 0.9}
    entry = {"size": 64, "pixels": 4096, "gt_nuclei": 11,
             **postprocess.speed_summary([0.5, 0.6], [0.2, 0.25], 4096, 10,
                                         tia_cpu=[0.45], our_cpu=[0.3]),
             "comparison": comparison,
             "tia_stages": {"proc_np_hv": 0.3, "get_instance_info": 0.15, "other": 0.05},
             "our_stages": {"labels": 0.15, "measure": 0.05, "other": 0.0}}
    versions = {"python": "3.11", "numpy": "2"}
    return {"repeats": 2, "sets": {"maps_64": entry},
            "tiatoolbox": {"versions": {**versions, "tiatoolbox": "2.1.3"}, "peak_rss_mb": 1.0},
            "hoverserve": {"versions": versions, "peak_rss_mb": 1.0}}


def _end_to_end_results() -> dict:
    ok = {"slide": "a.svs", "returncode": 0, "wall_s": 10.0, "peak_rss_mb": 900.0,
          "peak_processes": 3, "samples": 200, "tissue_mm2": 1.0, "tissue_mpx": 4.0,
          "tissue_mpx_per_s": 0.4, "slide_shape": [2000, 3000], "slide_mpp": 0.5, "nuclei": 1234,
          "timings": {"infer": 6.0, "postprocess": 2.0}, "model_name": "m", "error": ""}
    failed = {**ok, "slide": "b.dcm", "returncode": 2, "error": "hoverserve: error: no mpp"}
    empty = {**ok, "slide": "c.tiff", "tissue_mm2": 0.0, "tissue_mpx": 0.0, "tissue_mpx_per_s": 0.0}
    return {"model_name": "m.onnx", "repeats": 1, "sample_seconds": 0.05, "extra_options": [],
            "note": "A stand-in model.", "runs": [ok, failed, empty]}


def test_report_renders_every_table_with_the_numbers() -> None:
    facts = report.machine_facts()
    assert facts["logical_cores"] >= 1 and facts["cpu"]
    text = report.render(_postprocess_results(), _end_to_end_results(), facts)
    # Wall 0.5 s against 0.2 s (median 0.55 against 0.225), CPU 0.45 s against 0.3 s.
    assert "| **2.5×** (2.4×) | 0.450 | 0.300 | **1.5×** |" in text
    assert "The ≥ 2× goal is missed at 64²." in text  # 1.5× in CPU time
    assert "| a.svs | 3,000×2,000 | 0.500 | 4.00 | 10.0 | **0.400** | 900 | 1,234 | 3 |" in text
    assert "failed: hoverserve: error: no mpp" in text
    assert "| c.tiff |" in text and "– (no tissue found)" in text
    assert "**Note.** A stand-in model." in text
    assert "ours is 2.0–2.0× faster there" in text  # 0.3 s against 0.15 s in the watershed half
    for line in text.splitlines():
        if line.startswith("|"):
            assert line.endswith("|")


def test_report_says_what_has_not_been_run() -> None:
    text = report.render(None, None, report.machine_facts())
    assert "python bench/postprocess.py" in text and "bench/end_to_end.py" in text


def test_markdown_table_checks_its_shape() -> None:
    assert report.markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n| :--- | ---: |\n| 1 | 2 |"
    with pytest.raises(ValueError, match="one entry per column"):
        report.markdown_table(["a", "b"], [[1]])


def test_results_json_written_by_the_benchmarks_render(tmp_path: Path) -> None:
    (tmp_path / "postprocess.json").write_text(json.dumps(_postprocess_results()))
    out = tmp_path / "benchmarks.md"
    assert report.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    assert out.read_text().startswith("# Benchmarks")


def test_report_says_when_only_cpu_time_meets_the_goal() -> None:
    results = _postprocess_results()
    entry = results["sets"]["maps_64"]
    entry.update(postprocess.speed_summary([0.3], [0.2], 4096, 10, tia_cpu=[0.45], our_cpu=[0.15]))
    text = report.render(results, None, report.machine_facts())
    assert "met at every size in CPU time; in wall time it is missed at 64²" in text


def test_report_keeps_the_sections_other_scripts_appended() -> None:
    rendered = "# Benchmarks\n\nintro\n\n## Post-processing\n\nnew table\n"
    previous = ("# Benchmarks\n\nold intro\n\n## Post-processing\n\nold table\n\n"
                "## GPU\n\nnot measured\n\n## Simulated accelerator\n\nits table\n")
    text = report.keep_other_sections(rendered, previous)
    assert "new table" in text and "old table" not in text and "old intro" not in text
    assert text.index("## GPU") < text.index("## Simulated accelerator")
    assert text.endswith("its table\n") and "not measured" in text
