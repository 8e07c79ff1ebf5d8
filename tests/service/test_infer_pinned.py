"""``hoverserve infer`` writes exactly what it wrote before the job-model restructuring.

The hashes below were first recorded on 2026-12-02 from the code before the stages, the family
registry and the CLI package existed (commit 97c51c5), and held through that restructuring. A change
that moves one nucleus, one vertex, one measurement, one id or one class breaks them; a deliberate
change of the outputs must record new hashes here and say why in its commit.

Re-recorded in session 8 (issue 15, seams and patches), deliberately: the default card fixes the
edge-map normalisation (``edge_range``) instead of each region's min-max, so nuclei no longer
depend on the region size; and tiles beyond the slide's edge are no longer run (their maps were
predictions on padding), which renumbers nuclei within a region (the PNG's set of nuclei and every
measurement are unchanged by that part; only the table's order is); and the card's metrics gained
the edge_range numbers (the card's hash is part of the run key the nucleus ids come from).
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
        "4b9c6afe4e5e03dd0cef516404c89d31eb38bcd2e3d66a49bb28cba52a064b40",
        "205badf7176e1639463d548c5db5175e5a549dbe99208560afe5df08f06d2529",
        "dfde90d12ff5e48f4c8cca88210649a31ea91c276d4d922713fdfed502477bbe",
    ),
    "pathml_small_dicom.dcm": (
        ("--mpp", "0.5"),
        "b3e22baac04f54c816a08daedcfdd4da887f2f67cdceda569c23cfaa98d2efc1",
        "d37aa9027659e96f34e398434904371aced6be32e6567ff1c9b9f6fc4bf356fc",
        "478dc18254d18b2c1627c8c911d54db69ce0f0c1a9cc5909e0f66052e8883e8a",
    ),
    "tiles/high-nuclei-score-level0.png": (
        ("--mpp", "0.5"),
        "a5aec0173818a985e53a1acf8a534f3df5126b85f507ad46c1742b7014267632",
        "ef71e3151c25cdde2978e7b71460658414b89df6f58fb170d521f70a4607a7b3",
        "5180d8cb61dcacc492629249036471164235a03bfa22c158107b13929ee7c2f8",
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
