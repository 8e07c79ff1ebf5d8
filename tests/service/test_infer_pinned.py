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

Re-keyed in session 12, not re-recorded for a change of the outputs: on an AVX2-only CPU the same
commit wrote other last bits in the float measurements than on the AVX-512 machine the hashes came
from (ONNX Runtime's and NumPy's kernels round differently), so the GeoJSON of two slides and every
table differed while counts, ids and geometry agreed. The digests now leave the measurement values
out (:data:`EXACT`, :func:`geojson_digest`); the new hashes are of the same commit's outputs.
"""

from __future__ import annotations

import gzip
import hashlib
import json
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
        "db65d1d5078495d97cfa119b0fabddeac86202ae9a18de1ecb56e34bfafd419d",
        "286b67a966ae42f32862d2e48ff0ddd491d944dca40a56845fc9541a93332255",
        "dfde90d12ff5e48f4c8cca88210649a31ea91c276d4d922713fdfed502477bbe",
    ),
    "pathml_small_dicom.dcm": (
        ("--mpp", "0.5"),
        "a1de8edac0f1ab8ba71819cc88305868538323d0e875ccf2b3c03ad51bf369f0",
        "b5841b428f69fe048f3246af4ddd518f28dc402020c59da0757bcffef085660d",
        "478dc18254d18b2c1627c8c911d54db69ce0f0c1a9cc5909e0f66052e8883e8a",
    ),
    "tiles/high-nuclei-score-level0.png": (
        ("--mpp", "0.5"),
        "96f1858f3c04bdc52e191bd5eff1fd9c99c9fa27bc36970b072eb8ac9fb91571",
        "0ae86c3ebe7d55fa6a5f1bdb7e3b5e8d7a0c04ccc15c151786bd94ce0727889d",
        "5180d8cb61dcacc492629249036471164235a03bfa22c158107b13929ee7c2f8",
    ),
}


EXACT = ("id", "type", "region", "offsets", "vertices", "bbox", "count_grid")
"""Table arrays pinned bit for bit: identity, class, region and geometry. The float measurements
(probabilities, intensities, shape features) differ in their last bits between CPUs (ONNX
Runtime's and NumPy's AVX-512 and AVX2 kernels round differently: seen in session 12), so they
are pinned through the GeoJSON, which writes them rounded."""


def table_digest(path: Path) -> str:
    """SHA-256 over a ``nuclei.zarr.zip``'s entry names, every metadata document and the chunks
    of the :data:`EXACT` arrays, in name order: the zip's own timestamps do not count."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(path) as archive:
        for name in sorted(archive.namelist()):
            exact = name.endswith("zarr.json") or name.split("/", 1)[0] in EXACT
            digest.update(name.encode() + b"\0" + (archive.read(name) if exact else b"") + b"\0")
    return digest.hexdigest()


def geojson_digest(path: Path) -> str:
    """SHA-256 of the decompressed GeoJSON with each nucleus's measurement values left out (their
    names stay): ids, geometry, classes and the document's layout are pinned bit for bit, the
    values, rounded to 4 decimals by the writer, flip in the last place between CPUs (see
    :data:`EXACT`)."""
    with gzip.open(path, "rb") as stream:
        document = json.loads(stream.read())
    for feature in document["features"]:
        properties = feature.get("properties", {})
        if "measurements" in properties:
            properties["measurements"] = sorted(properties["measurements"])
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


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
