"""``manifest.json``: provenance of a run — model card, parameters, software, timings, slide
identity, outputs and counts — so a result can be traced and reproduced."""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import logging
import platform
import sys
from typing import Any

import fsspec

from worker.writers._common import check_fs, join, prepare_root, write_json

__all__ = ["MANIFEST_NAME", "file_sha256", "software_versions", "write_manifest"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"

_DISTRIBUTIONS = ("hoverserve", "numpy", "scipy", "scikit-image", "opencv-python-headless",
                  "shapely", "zarr", "fsspec", "onnxruntime", "onnxruntime-gpu", "openslide-python",
                  "openslide-bin", "tifffile", "wsidicom", "pydicom", "pydantic")


def file_sha256(fs: fsspec.AbstractFileSystem, path: str, *, block_size: int = 1 << 20) -> str:
    """SHA-256 of a file in ``fs``, read in blocks so a multi-GB slide never sits in memory.

    Parameters
    ----------
    fs : fsspec.AbstractFileSystem
    path : str
    block_size : int
        Bytes per read.

    Returns
    -------
    str
        Lower-case hex digest.
    """
    check_fs(fs)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while block := fh.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def software_versions() -> dict[str, str]:
    """Versions of Python, the platform, the installed distributions HoVerServe uses (those not
    installed are left out) and the OpenSlide C library."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    openslide = sys.modules.get("openslide")  # only if already loaded: importing it costs time
    library = getattr(openslide, "__library_version__", None)
    if library:
        versions["openslide-library"] = str(library)
    return versions


def write_manifest(*, fs: fsspec.AbstractFileSystem, root: str, **sections: Any) -> str:
    """Write ``manifest.json`` under ``root``; returns its name.

    Each keyword becomes a top-level section (e.g. ``model``, ``parameters``, ``timings``,
    ``slide``, ``outputs``, ``nuclei``); values are made JSON-safe (numpy values, paths, pydantic
    models; NaN becomes null). ``software`` (default :func:`software_versions`) and ``created``
    (UTC, ISO 8601) are added when not given.
    """
    prepare_root(fs, root)
    document: dict[str, Any] = {"format": "hoverserve.manifest", "version": 1}
    document["created"] = sections.pop("created", None) or dt.datetime.now(dt.UTC).isoformat()
    document["software"] = sections.pop("software", None) or software_versions()
    document.update(sections)
    write_json(fs, join(root, MANIFEST_NAME), document)
    logger.info("manifest written under %s", root)
    return MANIFEST_NAME
