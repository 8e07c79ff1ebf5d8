"""``hoverserve infer`` writes exactly what it wrote before the job-model restructuring.

The hashes below were recorded on 2026-12-02 from the code before the stages, the family registry
and the CLI package existed (commit 97c51c5). A change that moves one nucleus, one vertex, one
measurement, one id or one class breaks them; a deliberate change of the outputs must record new
hashes here and say why in its commit.
"""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.service._server import SLIDES

PINNED = {
    # slide: (extra CLI arguments, sha256 of the nucleus table, of the GeoJSON, of counts.json)
    "CMU-1-Small-Region.svs": (
        (),
        "28c0cc7677a9343d23d2b9eb9b8522bb0563dc549398f095907edda6a6fffbbf",
        "b33ed6f86f6032c850eb3815ddde785a2969e11fbebb59a2fe29be0fd1d8b583",
        "82ec2eb9b8c013425f57f5bfbed6875d07eb0168653cf4ea47ed74157f0f0d05",
    ),
    "pathml_small_dicom.dcm": (
        ("--mpp", "0.5"),
        "b2c1690496277eef277872253015aea72f16fb5428f5785ca2698f8a769f620d",
        "8e1ae5f599edf3056e924ca084ffb4b279a084a4cef2c0f7726dca4fe10ca71c",
        "000aa9a0cd46f9b9498c73985bf6f367059941c3e86cacab18df230f23a67da0",
    ),
    "tiles/high-nuclei-score-level0.png": (
        ("--mpp", "0.5"),
        "7f570972e48572590f7d353adb4b193b1e04d1be8e6f1d878df04d13aaf62ec6",
        "06a604e7e9abd278a7af80a1df2187918030c25971d4ecde93e0d4b852d52a5a",
        "0c17629db3c91813ff04fe91d0f556b308cd8202d37fe5bf63ace48cc18e28ae",
    ),
}


def table_digest(path: Path) -> str:
    """SHA-256 over every entry (name and bytes, in name order) of a ``nuclei.zarr.zip``: the zip's
    own timestamps do not count, every array chunk and attribute does."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(path) as archive:
        for name in sorted(archive.namelist()):
            digest.update(name.encode() + b"\0" + archive.read(name) + b"\0")
    return digest.hexdigest()


def geojson_digest(path: Path) -> str:
    """SHA-256 of the decompressed GeoJSON (gzip's header holds a timestamp)."""
    with gzip.open(path, "rb") as stream:
        return hashlib.sha256(stream.read()).hexdigest()


def infer_digests(slide: Path, args: tuple[str, ...], out: Path) -> tuple[str, str, str]:
    subprocess.run([str(Path(sys.executable).with_name("hoverserve")), "infer", str(slide), "--out", str(out),
                    "-q", *args], check=True, capture_output=True, timeout=600)
    return (table_digest(out / "nuclei.zarr.zip"), geojson_digest(out / "nuclei.geojson.gz"),
            hashlib.sha256((out / "counts.json").read_bytes()).hexdigest())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PINNED))
def test_infer_writes_the_pinned_nucleus_table_geojson_and_counts(name: str, tmp_path: Path) -> None:
    args, table, geojson, counts = PINNED[name]
    assert infer_digests(SLIDES / name, args, tmp_path / "out") == (table, geojson, counts)
