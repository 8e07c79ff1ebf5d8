"""The command line: clear messages and non-zero exits for what the user can fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.cli import EXIT_USAGE, main

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
SLIDES = SHARED / "data" / "slides"


def test_missing_slide_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["infer", str(tmp_path / "nope.svs"), "--model", str(tmp_path / "m.onnx")]) == EXIT_USAGE
    assert "slide not found" in capsys.readouterr().err


def test_missing_model_file_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    slide = SLIDES / "CMU-1-Small-Region.svs"
    assert main(["infer", str(slide), "--model", str(tmp_path / "m.onnx")]) == EXIT_USAGE
    assert "--model" in capsys.readouterr().err


@pytest.mark.parametrize("roi", ["1,2,3", "a,b,c,d", "0,0,-5,5"])
def test_bad_roi_is_a_usage_error(roi: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["infer", "x.svs", "--roi", roi])
    assert exit_info.value.code == 2
    assert "--roi" in capsys.readouterr().err


def test_tissue_options_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    slide = SLIDES / "CMU-1-Small-Region.svs"
    code = main(["infer", str(slide), "--no-tissue-mask", "--tissue-mask", "m.png"])
    assert code == EXIT_USAGE
    assert "exclude" in capsys.readouterr().err


# --------------------------------------------------------------------------- every real slide

CHECKER = SHARED / "tools" / "qupath_geojson_check.py"

RGB_SLIDES = [
    ("CMU-1-Small-Region.svs", []),
    ("pathml_small_dicom.dcm", ["--mpp", "0.5"]),
    ("synthetic/boxes.tiff", ["--mpp", "0.5"]),
    ("synthetic/small.svs", []),
    ("synthetic/boxes_0.dcm", []),
    ("tiles/high-nuclei-score-level0.png", ["--mpp", "0.5"]),
    ("tiles/no-tissue.png", ["--mpp", "0.5"]),
    ("not_he/kidney-48-5.tif", ["--mpp", "0.5"]),
]

REFUSED = [
    ("not_he/pathml_smalltif.tif", ["--mpp", "0.5"], "uint16"),
    ("not_he/pathml_small_vectra.qptiff", ["--mpp", "0.5"], "channel"),
    ("pathml_small_dicom.dcm", [], "--mpp"),
    ("tiles/high-nuclei-score-level0.png", [], "--mpp"),
]


@pytest.fixture(scope="module")
def oracle_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests._synthetic import build_oracle, oracle_card

    path = tmp_path_factory.mktemp("model") / "oracle.onnx"
    return build_oracle(path, oracle_card(mpp=0.5))


@pytest.mark.parametrize(("name", "extra"), RGB_SLIDES, ids=[n for n, _ in RGB_SLIDES])
def test_infer_runs_on_every_rgb_slide(name: str, extra: list[str], oracle_model: Path,
                                       tmp_path: Path) -> None:
    import gzip
    import json
    import subprocess
    import sys

    from worker.slide import open_slide

    out = tmp_path / "out"
    code = main(["infer", str(SLIDES / name), "--model", str(oracle_model), "--out", str(out),
                 "--workers", "0", "--quiet", *extra])
    assert code == 0
    for result in ("counts.json", "manifest.json", "overlay.png", "nuclei.zarr.zip"):
        assert (out / result).is_file(), result
    files = sorted(out.glob("nuclei*.geojson.gz"))
    assert files
    check = subprocess.run([sys.executable, str(CHECKER), *map(str, files)],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "FAIL" not in check.stdout, check.stdout
    mpp = float(extra[1]) if extra else None
    with open_slide(SLIDES / name, mpp=mpp) as slide:
        height, width = slide.shape
    total = 0
    for path in files:
        features = json.loads(gzip.decompress(path.read_bytes()))["features"]
        total += len(features)
        for feature in features:
            ring = np.asarray(feature["geometry"]["coordinates"][0])
            assert (ring[:, 0] >= 0).all() and (ring[:, 0] <= width).all()
            assert (ring[:, 1] >= 0).all() and (ring[:, 1] <= height).all()
    counts = json.loads((out / "counts.json").read_text())
    assert counts["total"] == total


@pytest.mark.parametrize(("name", "extra", "message"), REFUSED, ids=[f"{n}{e}" for n, e, _ in REFUSED])
def test_infer_refuses_what_it_cannot_analyse(name: str, extra: list[str], message: str,
                                              oracle_model: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["infer", str(SLIDES / name), "--model", str(oracle_model),
                 "--out", str(tmp_path / "out"), "--quiet", *extra])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("hoverserve: error:") and message in err
    assert not (tmp_path / "out" / "nuclei.geojson.gz").exists()


def test_text_file_named_svs_is_refused(oracle_model: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "notes.svs"
    fake.write_text("this is not a slide\n")
    assert main(["infer", str(fake), "--model", str(oracle_model), "--quiet"]) == EXIT_USAGE
    assert "notes.svs" in capsys.readouterr().err


def test_roi_limits_the_work_to_a_box(oracle_model: Path, tmp_path: Path) -> None:
    import json

    out = tmp_path / "roi"
    box = (500, 600, 700, 500)
    assert main(["infer", str(SLIDES / "CMU-1-Small-Region.svs"), "--model", str(oracle_model),
                 "--out", str(out), "--roi", ",".join(map(str, box)), "--workers", "0",
                 "--quiet"]) == 0
    import zarr

    table = zarr.open_group(zarr.storage.ZipStore(out / "nuclei.zarr.zip", mode="r"), mode="r")
    centroid = np.asarray(table["centroid"])
    assert len(centroid) > 0
    x, y, w, h = box
    assert (centroid[:, 0] >= x).all() and (centroid[:, 0] < x + w).all()
    assert (centroid[:, 1] >= y).all() and (centroid[:, 1] < y + h).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["roi"] == list(box)


def test_bundled_models_are_named_without_a_path(tmp_path: Path) -> None:
    from models.card import read_card
    from models.zoo import list_models

    bundled = list_models()[0]
    out = tmp_path / "out"
    code = main(["infer", str(SLIDES / "CMU-1-Small-Region.svs"), "--model", bundled.stem,
                 "--roi", "0,0,300,300", "--out", str(out), "--quiet"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    card = read_card(bundled)
    assert (manifest["model"]["name"], manifest["model"]["version"]) == (card.name, card.version)
    assert manifest["model"]["test_time_augmentation"] == card.test_time_augmentation


def test_set_postprocess_writes_a_copy_with_the_new_options(oracle_model: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    from models.card import read_card

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"consep": {"pq": 0.5}}))
    out = tmp_path / "tuned.onnx"
    before = oracle_model.read_bytes()
    code = main(["model", "set-postprocess", str(oracle_model), "-o", str(out), "--upsample", "2",
                 "--marker-threshold", "0.45", "--metrics", str(metrics)])
    assert code == 0
    card = read_card(out)
    assert card.postprocess == {"upsample": 2, "marker_threshold": 0.45}
    assert card.metrics == {"consep": {"pq": 0.5}}
    assert read_card(oracle_model).postprocess == {}  # the source is left alone
    assert oracle_model.read_bytes() == before
    # Same graph and weights: only the card differs.
    a, b = onnx.load(str(oracle_model)), onnx.load(str(out))
    assert a.graph.SerializeToString() == b.graph.SerializeToString()
    # Bad values are refused before anything is written.
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["model", "set-postprocess", str(oracle_model), "-o", str(tmp_path / "x.onnx"),
              "--upsample", "9"])
    assert "from 1 to 4" in capsys.readouterr().err
    assert main(["model", "set-postprocess", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "y.onnx"),
                 "--upsample", "2"]) == EXIT_USAGE
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()


def test_cache_data_writes_what_training_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from models.train.data import load_items

    nuclei = SHARED / "data" / "nuclei"
    out = tmp_path / "cache"
    assert main(["model", "cache-data", str(out), "--data-root", str(nuclei), "--sources", "cpm15"]) == 0
    assert "wrote 15 images at 0.5 µm/px" in capsys.readouterr().out
    cached = load_items(out, mpp=0.5, sources=["cpm15"])
    assert [i.name for i in cached] == [i.name for i in load_items(nuclei, mpp=0.5, sources=["cpm15"])]


def test_cache_data_names_an_unknown_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "cache-data", str(tmp_path), "--sources", "pannuke"]) == EXIT_USAGE
    assert "unknown data source 'pannuke'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_commands_that_need_torch_say_how_to_get_it(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import models.train

    def no_torch(*args: object, **kwargs: object) -> None:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(models.train, "train", no_torch)
    assert main(["model", "train", "configs/smoke.yaml"]) == EXIT_USAGE
    assert "needs PyTorch: pip install -e '.[torch]'" in capsys.readouterr().err


# --------------------------------------------------------------------------- the client commands


def test_jobs_needs_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["jobs"])
    assert exit_info.value.code == EXIT_USAGE
    assert "list,status,download,cancel,retry,delete" in capsys.readouterr().err


def test_submit_names_a_missing_slide_before_calling_the_server(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(["submit", str(tmp_path / "nope.svs"), "--server", "http://127.0.0.1:9"])
    assert code == EXIT_USAGE
    assert capsys.readouterr().err.strip() == f"hoverserve: error: slide not found: {tmp_path / 'nope.svs'}"


@pytest.mark.parametrize("command", [["jobs", "list"], ["jobs", "status", "x"], ["jobs", "delete", "x"]])
def test_client_commands_refuse_a_server_without_scheme(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command, "--server", "localhost:8000"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must start with http:// or https://" in err


def test_point_data_evaluate_and_calibrate(oracle_model: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from models.card import read_card
    from tests.models.test_evaluate_points import _write_points

    data = tmp_path / "points"
    _write_points(data)
    scores = tmp_path / "scores.json"
    assert main(["model", "evaluate", str(oracle_model), str(data), "--split", "val",
                 "--json", str(scores)]) == 0
    result = json.loads(scores.read_text())[str(data)]
    assert result["detection"]["f1_d"] == 1.0 and result["split"] == "val"
    assert "mean F_c" in capsys.readouterr().out
    out = tmp_path / "calibrated.onnx"
    assert main(["model", "calibrate", str(oracle_model), str(data), "-o", str(out), "--bins", "2"]) == 0
    printed = capsys.readouterr().out
    assert "before (raw vote share)" in printed and "after calibration" in printed
    assert read_card(out).postprocess["class_prob_calibration"]
    assert main(["model", "evaluate", str(oracle_model), str(data), "--np-threshold", "0.4"]) == EXIT_USAGE
    assert "point labels" in capsys.readouterr().err


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    # `hoverserve model info NAME | true`: the reader is gone before the first write
    shell = subprocess.run(
        f"'{sys.executable}' -m service.cli model info hoverserve-conic-wide | true",
        shell=True, capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert shell.stderr == ""


def test_an_instance_models_options_are_set_and_swept_by_their_own_flags(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from models.card import read_card
    from tests._synthetic import CLASSES
    from tests._synthetic_instance import build_instance_oracle, draw_disks, encode_disk_slide

    detector = build_instance_oracle(tmp_path / "disks.onnx")
    out = tmp_path / "strict.onnx"
    assert main(["model", "set-postprocess", str(detector), "-o", str(out), "--score-threshold", "0.7",
                 "--mask-threshold", "0.4"]) == 0
    assert read_card(out).postprocess == {"score_threshold": 0.7, "mask_threshold": 0.4}
    # a hover option means nothing to a detector: refused by name, nothing written
    capsys.readouterr()
    assert main(["model", "set-postprocess", str(detector), "-o", str(tmp_path / "x.onnx"),
                 "--np-threshold", "0.6"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--np-threshold" in err and "instance" in err and not (tmp_path / "x.onnx").exists()
    # the sweep: the oracle scores 0.5 (top of an input) to 0.9 (bottom), so a 0.95 threshold
    # keeps no nucleus and 0.3 keeps every one
    shape = (96, 96)
    disks, classes = draw_disks(shape, 8, seed=3)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    inst = np.zeros(shape, np.int32)
    for label, (row, col, r) in enumerate(disks.tolist(), 1):
        inst[(rows - row) ** 2 + (cols - col) ** 2 <= r * r] = label
    data = tmp_path / "disks.npz"
    np.savez(data, images=encode_disk_slide(shape, disks, classes)[None], inst=inst[None],
             type_map=np.r_[0, classes][inst][None].astype(np.uint8), names=np.array(["disks"]),
             mpp=np.float32(0.25), class_names=np.array([c.name for c in CLASSES]))
    report = tmp_path / "sweep.json"
    assert main(["model", "evaluate", str(detector), str(data), "--score-threshold", "0.3", "0.95",
                 "--json", str(report)]) == 0
    loose, strict = json.loads(report.read_text())[str(data)]
    assert loose["postprocess"]["score_threshold"] == 0.3 and loose["detection"]["f1"] == 1.0
    assert strict["detection"]["tp"] == 0
