"""``hoverserve export qupath``: a result table back to one QuPath file, at any size; and one
real run whose counts agree everywhere (counts.json, count grid, GeoJSON, CLI summary)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import ZipStore

from models.card import ClassInfo
from service.cli import EXIT_USAGE, main
from tests.service._server import CMU1
from worker.nuclei import NucleusTable
from worker.writers import ENTRY_BYTES, TableWriter, nucleus_ids
from worker.writers.table import zip_tree

ROOT = Path(__file__).resolve().parents[2]
CHECKER = ROOT / ".." / "shared" / "tools" / "qupath_geojson_check.py"
CLASSES = (ClassInfo(name="Background", colour=(0, 0, 0)),
           ClassInfo(name="Tumour", colour=(255, 0, 0)),
           ClassInfo(name="Immune", colour=(0, 200, 0)))
SHAPE = (60_000, 100_000)  # level-0 (height, width) of the made-up slide
KEY = "made-up-run-key"
MEASUREMENTS = ("Nucleus: Area µm^2", "Nucleus: Circularity", "Detection probability")


def square_chunk(lo: int, hi: int) -> NucleusTable:
    """Rows ``lo:hi`` of a grid of 6×6 px squares, 5 per 10 px, types 0, 1, 2 in turn."""
    rows = np.arange(lo, hi)
    x = 10.0 * (rows % 10_000) + 0.5
    y = 10.0 * (rows // 10_000) + 0.5
    corners = np.array([[0, 0], [6, 0], [6, 6], [0, 6]], np.float32)
    vertices = (np.stack([x, y], 1)[:, None, :].astype(np.float32) + corners).reshape(-1, 2)
    n = len(rows)
    return NucleusTable(
        centroid=np.stack([x + 3, y + 3], 1), bbox=np.stack([x, y, x + 6, y + 6], 1),
        area_um2=np.full(n, 9.0, np.float32), perimeter_um=np.full(n, 12.0, np.float32),
        solidity=np.ones(n, np.float32), eccentricity=np.zeros(n, np.float32),
        type=(rows % 3).astype(np.int16), type_prob=np.full(n, 0.75, np.float32),
        np_prob=np.full(n, 0.875, np.float32), vertices=vertices,
        offsets=np.arange(0, 4 * n + 1, 4, dtype=np.int64), region=np.zeros(n, np.int32),
        measurements={MEASUREMENTS[0]: np.full(n, 9.0, np.float32),
                      MEASUREMENTS[1]: np.full(n, 0.785, np.float32),
                      MEASUREMENTS[2]: np.full(n, 0.875, np.float32)},
    )


def write_made_up_table(path: Path, n: int, chunk: int) -> Path:
    """A ``nuclei.zarr.zip`` of ``n`` nuclei in the documented layout, written chunk by chunk."""
    store = path.with_suffix("")
    writer = TableWriter(store, classes=CLASSES, mpp=0.25, slide_shape=SHAPE,
                         measurements=MEASUREMENTS, ids={"key": KEY}, chunk_rows=chunk)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        writer.append(square_chunk(lo, hi), nucleus_ids(KEY, range(lo, hi)))
    writer.close()
    zip_tree(store, str(path))
    return path


def export(table: Path, out: Path, *options: str) -> tuple[int, int, str]:
    """Run the export in a fresh interpreter: (exit status, its peak RSS in bytes, stderr)."""
    # VmHWM is this process's own high-water mark: getrusage's ru_maxrss after fork + exec can
    # carry the forking parent's size (a test process of 2 GB made a 300 MB export read 2 GB).
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from service.cli import main\n"
        "status = main(sys.argv[1:])\n"
        "hwm = [l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM:')]\n"
        "print(int(hwm[0].split()[1]) * 1024)\n"
        "sys.exit(status)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, "export", "qupath", str(table),
                           "--out", str(out), "--quiet", *options],
                          capture_output=True, text=True, cwd=ROOT)
    lines = done.stdout.split()
    return done.returncode, int(lines[-1]) if lines else 0, done.stderr


def check_entries(path: Path, tmp: Path) -> int:
    """Run the checker on every entry of the zip (as plain files), two entries at a time (each
    checker holds its entry's parsed JSON, ~1 GB); returns the feature count."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        for name in names:
            archive.extract(name, tmp)
    reports = []
    for pair in (names[i : i + 2] for i in range(0, len(names), 2)):
        running = [subprocess.Popen([sys.executable, str(CHECKER), str(tmp / n)],
                                    stdout=subprocess.PIPE, text=True) for n in pair]
        for process in running:
            out, _ = process.communicate()
            assert process.returncode == 0
            reports.append(out)
    report = "".join(reports)
    assert "FAIL" not in report and "fatal" not in report and "warn" not in report, report
    assert report.count("OK") == len(names), report
    return sum(int(line.split("n=")[1].split()[0]) for line in report.splitlines()
               if line.startswith("OK"))


@pytest.mark.slow
def test_a_million_nuclei_export_to_one_zip_in_bounded_memory(tmp_path: Path) -> None:
    n = 1_000_000
    table = write_made_up_table(tmp_path / "nuclei.zarr.zip", n, chunk=125_000)
    status, rss, err = export(table, tmp_path / "out")

    assert status == 0, err
    assert rss < 1 << 30, f"export peak RSS {rss / 2**20:.0f} MiB"
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["nuclei-index.json", "nuclei.zip"]
    with zipfile.ZipFile(out / "nuclei.zip") as archive:
        infos = archive.infolist()
    assert len(infos) > 1 and all(i.file_size < ENTRY_BYTES for i in infos)
    assert [i.filename for i in infos] == [f"nuclei-{k:03d}.geojson"
                                           for k in range(1, len(infos) + 1)]
    index = json.loads((out / "nuclei-index.json").read_text())
    assert index["total"] == n and sum(e["count"] for e in index["entries"]) == n
    assert check_entries(out / "nuclei.zip", tmp_path / "entries") == n
    first = json.loads((tmp_path / "entries" / infos[0].filename).read_text())["features"][:3]
    assert [f["id"] for f in first] == nucleus_ids(KEY, range(3))
    assert "classification" not in first[0]["properties"]  # type 0
    assert first[1]["properties"]["classification"]["name"] == "Tumour"
    assert list(first[1]["properties"]["measurements"]) == [*MEASUREMENTS, "Perimeter µm",
                                                            "Solidity", "Eccentricity",
                                                            "Class probability"]


def test_export_options_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = write_made_up_table(tmp_path / "nuclei.zarr.zip", 50, chunk=16)
    out = tmp_path / "out"

    assert main(["export", "qupath", str(table), "--out", str(out),
                 "--measurements", "Nucleus: Circularity"]) == 0
    assert "wrote 50 detections" in capsys.readouterr().out
    features = json.loads(gzip.decompress((out / "nuclei.geojson.gz").read_bytes()))["features"]
    assert len(features) == 50
    assert {tuple(f["properties"]["measurements"]) for f in features} == {
        ("Nucleus: Circularity",)}
    for argv, message in (
        ([str(table), "--objects", "cells"], "no cell boundaries"),
        ([str(table), "--measurements", "Colour"], "unknown measurement"),
        ([str(tmp_path / "missing.zarr.zip")], "not found"),
        ([str(out / "nuclei.geojson.gz")], "not a zip"),
    ):
        assert main(["export", "qupath", *argv, "--out", str(tmp_path / "x")]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.startswith("hoverserve: error:") and message in err, err


# --------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests._synthetic import build_oracle, oracle_card

    return build_oracle(tmp_path_factory.mktemp("model") / "oracle.onnx", oracle_card(mpp=0.5))


def run(oracle: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    capsys.readouterr()
    assert main(["infer", str(CMU1), "--model", str(oracle), "--out", str(out),
                 "--workers", "0", *extra]) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_a_real_run_agrees_with_itself_everywhere(oracle: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    summary = run(oracle, tmp_path / "full", capsys)
    out = tmp_path / "full"
    counts = json.loads((out / "counts.json").read_text())
    features = json.loads(gzip.decompress((out / "nuclei.geojson.gz").read_bytes()))["features"]
    group = zarr.open_group(ZipStore(out / "nuclei.zarr.zip", mode="r"), mode="r")
    grid = group["count_grid"][...]

    # The table is written once, as the zip the service serves; no index for one file.
    assert not (out / "nuclei.zarr").exists() and not (out / "nuclei-index.json").exists()
    total = counts["total"]
    assert total > 50
    assert len(features) == total == int(grid.sum()) == group.attrs["n"]
    assert sum(counts["classes"].values()) + counts["unclassified"] == total
    planes = group["count_grid"].attrs["classes"]
    assert dict(zip(planes, grid.sum(axis=(1, 2)).tolist(), strict=True)) == {
        **counts["classes"], "unclassified": counts["unclassified"]}
    named = {}
    for f in features:
        name = f["properties"].get("classification", {}).get("name", "unclassified")
        named[name] = named.get(name, 0) + 1
    assert named == {k: v for k, v in {**counts["classes"],
                                       "unclassified": counts["unclassified"]}.items() if v}
    # The CLI summary: one row per class, then unclassified, adding up to the total row.
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 2 and cells[1].replace(",", "").isdigit():
            rows[cells[0]] = int(cells[1].replace(",", ""))
    assert rows.pop("total") == total
    assert rows == {**counts["classes"], "unclassified": counts["unclassified"]}
    # The export of the downloaded table gives the run's own file, byte for byte.
    assert main(["export", "qupath", str(out / "nuclei.zarr.zip"), "--out",
                 str(tmp_path / "again"), "--quiet"]) == 0
    assert (tmp_path / "again" / "nuclei.geojson.gz").read_bytes() == (
        out / "nuclei.geojson.gz").read_bytes()

    roi = run(oracle, tmp_path / "roi", capsys, "--roi", "500,600,700,500", "--quiet")
    assert roi == ""
    roi_features = json.loads(gzip.decompress(
        (tmp_path / "roi" / "nuclei.geojson.gz").read_bytes()))["features"]
    assert roi_features
    assert not {f["id"] for f in roi_features} & {f["id"] for f in features}
