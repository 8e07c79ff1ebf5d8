"""The store: slides by content hash, job records, region results and outputs, through fsspec.

Layout under the store's root (a local directory or ``s3://bucket/prefix``)::

    slides/<sha256>.<ext>            uploaded slides, stored once per content (the first upload's ext)
    slide-refs/<sha256>/<owner digest>-<id>   empty: job <id> uses the slide (service.slides)
    jobs/<id>/job.json               the job record
    jobs/<id>/cancelled              marker: the job was cancelled (workers check it)
    jobs/<id>/plan.json, plan.npz    the planned slide (worker.plan_io's documented format)
    jobs/<id>/regions/<index>.npz    one region's nuclei (written atomically: retries are idempotent)
    jobs/<id>/done/<index>.<nuclei>  progress markers (one cheap listing gives regions and nuclei)
    jobs/<id>/tiles/<row>_<col>.npz  network tiles regions share, until their last region is done
    jobs/<id>/results/...            the outputs served by the API
    owners/<owner digest>/<created ms>-<id>   empty: one owner's jobs, listed without reading records
    owners/complete                  marker: every record has its entry (written by build_owner_index)

Names inside the store come only from hashes, job ids (checked hex) and integers, never from
client-supplied file names.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from service.errors import JobNotFound
from service.jobs import JobRecord, JobState, is_job_id
from worker.job import SlidePlan
from worker.nuclei import COLUMN_NAMES, NucleusTable
from worker.plan_io import dump_plan, load_plan

__all__ = ["SLIDE_EXTENSIONS", "Progress", "Store", "load_table", "owner_digest", "save_table"]

logger = logging.getLogger(__name__)

SLIDE_EXTENSIONS = frozenset({
    "svs", "tif", "tiff", "ndpi", "scn", "bif", "vms", "svslide", "qptiff", "dcm", "png", "jpg",
    "jpeg",
})
"""File-name extensions kept on stored slides (readers pick formats partly by extension)."""

_TABLE_COLUMNS = (*COLUMN_NAMES, "vertices", "offsets")


def owner_digest(owner: str) -> str:
    """The store's name for an owner (never the key or owner id itself): 32 hex digits."""
    return hashlib.sha256(owner.encode()).hexdigest()[:32]


def save_table(table: NucleusTable, **extra: Any) -> bytes:
    """A nucleus table (plus small ``extra`` metadata arrays) as ``.npz`` bytes."""
    buffer = io.BytesIO()
    arrays: dict[str, Any] = {name: getattr(table, name) for name in _TABLE_COLUMNS}
    # Measurements as one (n, k) block plus their names (an npz key cannot hold every name).
    names = list(table.measurements)
    arrays["measurement_names"] = np.array(names, dtype=str)
    arrays["measurement_values"] = (np.stack([table.measurements[k] for k in names], axis=1)
                                    if names else np.zeros((len(table), 0), np.float32))
    if table.cell_vertices is not None and table.cell_offsets is not None:
        arrays["cell_vertices"], arrays["cell_offsets"] = table.cell_vertices, table.cell_offsets
    arrays.update({f"meta_{k}": np.asarray(v) for k, v in extra.items()})
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def load_table(data: bytes) -> tuple[NucleusTable, dict[str, Any]]:
    """Inverse of :func:`save_table`: the table and its ``extra`` metadata."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        columns = {name: npz[name] for name in _TABLE_COLUMNS}
        if "measurement_names" in npz.files:  # tables saved before measurements lack them
            values = npz["measurement_values"]
            columns["measurements"] = {str(k): np.ascontiguousarray(values[:, i])
                                       for i, k in enumerate(npz["measurement_names"].tolist())}
        if "cell_offsets" in npz.files:
            columns["cell_vertices"] = npz["cell_vertices"]
            columns["cell_offsets"] = npz["cell_offsets"]
        table = NucleusTable(**columns)
        meta = {k.removeprefix("meta_"): npz[k].item() for k in npz.files if k.startswith("meta_")}
    return table, meta


class Progress:
    """Regions done and nuclei found so far, from the job's progress markers."""

    def __init__(self, done: dict[int, int]) -> None:
        self.done = done

    @property
    def regions(self) -> int:
        return len(self.done)

    @property
    def nuclei(self) -> int:
        return sum(self.done.values())


class Store:
    """Slides, job records and results under one fsspec URL.

    Parameters
    ----------
    url : str
        A local directory or any fsspec URL (``s3://bucket/prefix``...).
    cache_dir : Path
        Local folder for slides fetched from a remote store (readers need local files).
    storage_options : dict, optional
        Passed to fsspec (e.g. ``{"endpoint_url": ...}`` for S3).
    """

    def __init__(self, url: str, *, cache_dir: Path, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.fs, root = fsspec.url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self.cache_dir = Path(cache_dir)
        self.fs.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # ------------------------------------------------------------------ bytes

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` atomically (readers see the old object or the new one)."""
        path = self.path(key)
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def _fresh(self, path: str) -> None:
        """Forget cached listings: other processes write to a shared object store."""
        if not self.local:
            self.fs.invalidate_cache(path)

    def exists(self, key: str) -> bool:
        path = self.path(key)
        self._fresh(path)
        return self.fs.exists(path)

    def names(self, key: str) -> list[str]:
        """Base names of the entries directly under ``key`` (empty when missing)."""
        self._fresh(self.path(key))
        try:
            entries = self.fs.ls(self.path(key), detail=False)
        except FileNotFoundError:
            return []
        return [str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(key), recursive=True)

    # ------------------------------------------------------------------ slides

    @staticmethod
    def slide_key(sha256: str, ext: str) -> str:
        return f"slides/{sha256}.{ext}"

    def put_slide(self, local: Path, sha256: str, ext: str) -> bool:
        """Store a slide file once per content; False when the same content was already there."""
        key = self.slide_key(sha256, ext)
        if self.exists(key):
            return False
        if self.local:
            target = Path(self.path(key))
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            os.close(fd)
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)  # identical content: a concurrent twin upload may win, harmlessly
        else:
            self.fs.put_file(str(local), self.path(key))
        return True

    def local_slide(self, sha256: str, ext: str) -> Path:
        """A local file holding the slide: the store's own file, or a cached download."""
        key = self.slide_key(sha256, ext)
        if self.local:
            return Path(self.path(key))
        cached = self.cache_dir / f"{sha256}.{ext}"
        if not cached.is_file():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-")
            os.close(fd)
            self.fs.get_file(self.path(key), tmp)
            os.replace(tmp, cached)
        return cached

    # ------------------------------------------------------------------ job records

    @staticmethod
    def _job_key(job_id: str, *parts: str) -> str:
        if not is_job_id(job_id):
            raise JobNotFound(f"no job {job_id!r}")
        return "/".join(["jobs", job_id, *parts])

    @staticmethod
    def _owner_key(owner: str, *parts: str) -> str:
        return "/".join(["owners", owner_digest(owner), *parts])

    def _owner_entry(self, record: JobRecord) -> str:
        # Zero-padded creation time first: sorting the names sorts the jobs by age.
        return self._owner_key(record.owner, f"{round(record.created_at * 1000):013d}-{record.id}")

    def create_record(self, record: JobRecord) -> None:
        """Store a new job's record and its entry in the owner's index."""
        self.write_record(record)
        self.write_bytes(self._owner_entry(record), b"")

    def owner_jobs(self, owner: str) -> list[str]:
        """Ids of ``owner``'s jobs, newest first: one listing, no record read."""
        names = sorted(self.names(self._owner_key(owner)), reverse=True)
        return [job_id for _, _, job_id in (n.partition("-") for n in names) if is_job_id(job_id)]

    def build_owner_index(self) -> int:
        """Give every stored record its owner-index entry, once per store (stores written before the
        index existed); returns how many records were indexed, 0 when the index was complete."""
        if self.exists("owners/complete"):
            return 0
        count = 0
        for record in self.records():
            self.write_bytes(self._owner_entry(record), b"")
            count += 1
        self.write_bytes("owners/complete", b"")
        return count

    def write_record(self, record: JobRecord) -> None:
        self.write_bytes(self._job_key(record.id, "job.json"), record.model_dump_json().encode())

    def read_record(self, job_id: str) -> JobRecord:
        """The job's record (raises JobNotFound)."""
        try:
            data = self.read_bytes(self._job_key(job_id, "job.json"))
        except FileNotFoundError as exc:
            raise JobNotFound(f"no job {job_id!r}") from exc
        return JobRecord.model_validate_json(data)

    def update_record(self, job_id: str, change: Callable[[JobRecord], Any]) -> JobRecord:
        """Read, change in place and write back a record; a cancel marker always wins."""
        record = self.read_record(job_id)
        change(record)
        if self.exists(self._job_key(job_id, "cancelled")) and not record.finished:
            record.state = JobState.CANCELLED
        self.write_record(record)
        return record

    def records(self) -> Iterator[JobRecord]:
        """Every job record (order unspecified)."""
        for name in self.names("jobs"):
            if is_job_id(name):
                with contextlib.suppress(JobNotFound, ValueError):
                    yield self.read_record(name)

    def mark_cancelled(self, job_id: str) -> None:
        self.write_bytes(self._job_key(job_id, "cancelled"), b"")

    def is_cancelled(self, job_id: str) -> bool:
        return self.exists(self._job_key(job_id, "cancelled"))

    # ------------------------------------------------------------------ job data

    def job_key(self, job_id: str, *parts: str) -> str:
        return self._job_key(job_id, *parts)

    def has_plan(self, job_id: str) -> bool:
        # The JSON is written last: with it present, the arrays are complete.
        return self.exists(self._job_key(job_id, "plan.json"))

    def write_plan(self, job_id: str, plan: SlidePlan) -> None:
        """Store the job's plan (:mod:`worker.plan_io`: JSON plus arrays, never a pickle)."""
        plan_json, plan_npz = dump_plan(plan)
        self.write_bytes(self._job_key(job_id, "plan.npz"), plan_npz)
        self.write_bytes(self._job_key(job_id, "plan.json"), plan_json)

    def read_plan(self, job_id: str) -> SlidePlan:
        return load_plan(self.read_bytes(self._job_key(job_id, "plan.json")),
                         self.read_bytes(self._job_key(job_id, "plan.npz")))

    def has_region(self, job_id: str, index: int) -> bool:
        return self.exists(self._job_key(job_id, "regions", f"{index:06d}.npz"))

    def write_region(self, job_id: str, index: int, data: bytes, nuclei: int) -> None:
        self.write_bytes(self._job_key(job_id, "regions", f"{index:06d}.npz"), data)
        self.write_bytes(self._job_key(job_id, "done", f"{index:06d}.{nuclei}"), b"")

    def read_region(self, job_id: str, index: int) -> bytes:
        return self.read_bytes(self._job_key(job_id, "regions", f"{index:06d}.npz"))

    def progress(self, job_id: str) -> Progress:
        done: dict[int, int] = {}
        for name in self.names(self._job_key(job_id, "done")):
            index, _, nuclei = name.partition(".")
            if index.isdigit() and nuclei.isdigit():
                done[int(index)] = int(nuclei)
        return Progress(done)

    def results_root(self, job_id: str) -> str:
        return self.path(self._job_key(job_id, "results"))

    def tiles_root(self, job_id: str) -> str:
        """Where the job's regions keep the network tiles they share (worker.tile_cache)."""
        return self.path(self._job_key(job_id, "tiles"))

    def delete_tiles(self, job_id: str) -> None:
        self.delete(self._job_key(job_id, "tiles"))

    def result_key(self, job_id: str, name: str) -> str:
        return self._job_key(job_id, "results", name)

    def delete_job_data(self, job_id: str) -> None:
        """Remove a job's regions, plan and results (the record stays)."""
        for part in ("regions", "done", "tiles", "plan.json", "plan.npz", "results"):
            self.delete(self._job_key(job_id, part))

    def delete_job(self, record: JobRecord) -> None:
        """Remove a job entirely: its owner-index entry, record and data."""
        self.delete(self._owner_entry(record))
        self.delete(self._job_key(record.id))
