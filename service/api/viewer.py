"""What the web viewer reads: the slide as DeepZoom tiles and the nuclei in a box, owner-only.

``GET /v1/jobs/{id}/slide.dzi``, ``GET /v1/jobs/{id}/slide_files/{level}/{col}_{row}.{format}``,
``GET /v1/jobs/{id}/nuclei?bbox=x0,y0,x1,y1`` and ``GET /v1/jobs/{id}/nuclei/density``. Like every
job resource, another key's job is a 404. Tiles never change for a job (slides are stored by
content), so they carry long-lived private caching headers and an ETag.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import OrderedDict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from service.api.jobs import _own_record
from service.deps import OwnerDep, Services, ServicesDep
from service.errors import InvalidOptions, JobNotFinished, ResultNotFound, ResultsExpired, SlideNotFound
from service.jobs import JobRecord, JobState
from service.schemas import ErrorBody
from worker.errors import SlideError
from worker.nuclei_index import MAX_LIMIT, NucleusIndex, build_index_from_results, open_index
from worker.tiles import FORMATS, DeepZoom, TileOutOfRange

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["viewer"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (401, 404, 409, 410, 422)}

TILE_FORMAT = "jpeg"
"""Format the descriptor announces (``png`` is served too)."""

_TILE_CACHE = "private, max-age=86400, immutable"
_CACHED = 8  # open slides and indexes kept per app


class _Cache:
    """A few expensive objects (open slides, opened indexes) by key, least recently used out.

    Evicted objects are not closed: a request may still be reading one; the garbage collector
    closes it once no request holds it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}

    def get(self, key: str, make: Any) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            building = self._building.setdefault(key, threading.Lock())
        with building:  # one request builds it, concurrent ones wait for it
            with self._lock:
                if key in self._items:
                    return self._items[key]
            value = make()
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
                self._building.pop(key, None)
            return value


def _cache(services: Services, name: str) -> _Cache:
    """The app's cache ``name`` (per app, not per process: two apps share no open slide)."""
    cache = services.caches.get(name)
    if cache is None:
        cache = services.caches.setdefault(name, _Cache(_CACHED))  # atomic: one cache wins
    return cache


def _zoom(services: Services, record: JobRecord) -> DeepZoom:
    from worker.slide import open_slide

    slide = record.slide

    def make() -> DeepZoom:
        try:
            path = services.store.local_slide(slide.sha256, slide.ext)
            return DeepZoom(open_slide(path, mpp=record.options.mpp))
        except (FileNotFoundError, SlideError) as exc:
            raise SlideNotFound(f"job {record.id}'s slide is no longer readable: {type(exc).__name__}") \
                from exc

    return _cache(services, "viewer.zooms").get(f"{slide.sha256}.{slide.ext}", make)


def _index(services: Services, record: JobRecord) -> NucleusIndex:
    if record.expired:
        raise ResultsExpired(f"job {record.id}'s results expired and were deleted")
    if record.state is not JobState.SUCCEEDED:
        raise JobNotFinished(f"job {record.id} is {record.state.value}; nuclei exist once it succeeded")
    store = services.store
    root = store.results_root(record.id)

    def make() -> NucleusIndex:
        try:
            return open_index(store.fs, root)
        except FileNotFoundError:
            # Jobs finished before the index existed (or whose build failed) get it now, once.
            logger.info("job %s: building the nuclei index on first use", record.id)
            build_index_from_results(store.fs, root)
            return open_index(store.fs, root)

    return _cache(services, "viewer.indexes").get(record.id, make)


@router.get(
    "/{job_id}/slide.dzi", responses={**_ERRORS, 200: {"content": {"application/xml": {}},
                                                         "description": "DeepZoom descriptor"}},
    summary="The slide's DeepZoom descriptor",
)
def get_dzi(job_id: str, services: ServicesDep, owner: OwnerDep) -> Response:
    """The slide's size at level 0, the tile size and overlap of its DeepZoom pyramid (tiles as
    openslide's ``DeepZoomGenerator`` defines them, ``limit_bounds=False``)."""
    zoom = _zoom(services, _own_record(services, job_id, owner))
    return Response(zoom.dzi(TILE_FORMAT), media_type="application/xml",
                    headers={"Cache-Control": _TILE_CACHE})


@router.get(
    "/{job_id}/slide_files/{level:int}/{col:int}_{row:int}.{format}",
    responses={**_ERRORS, 200: {"content": {"image/jpeg": {}, "image/png": {}},
                                "description": "the tile"}, 304: {"description": "unchanged"}},
    summary="One DeepZoom tile of the slide",
)
def get_tile(job_id: str, level: int, col: int, row: int, format: str, request: Request,
             services: ServicesDep, owner: OwnerDep) -> Response:
    """Tile ``col``, ``row`` of DeepZoom level ``level`` (``jpeg``, ``jpg`` or ``png``); 404 outside
    the pyramid. Cached privately for a day, with an ETag."""
    record = _own_record(services, job_id, owner)
    if format not in FORMATS:
        raise ResultNotFound(f"no tile format {format!r}; use one of {sorted(FORMATS)}",
                             code="tile_not_found")
    zoom = _zoom(services, record)
    etag = f'"{record.slide.sha256[:20]}-{level}-{col}-{row}-{format}"'
    headers = {"Cache-Control": _TILE_CACHE, "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    try:
        data = zoom.tile_bytes(level, col, row, format)
    except TileOutOfRange as exc:
        raise ResultNotFound(str(exc), code="tile_not_found") from exc
    return Response(data, media_type=FORMATS[format], headers=headers)


def _bbox(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise InvalidOptions(f"bbox must be four numbers x0,y0,x1,y1 (level-0 px), got {text!r}",
                             code="invalid_bbox")
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise InvalidOptions(f"bbox needs x0 < x1 and y0 < y1, got {text!r}", code="invalid_bbox")
    return x0, y0, x1, y1


@router.get(
    "/{job_id}/nuclei", responses={**_ERRORS, 200: {"content": {"application/geo+json": {}},
                                                      "description": "GeoJSON FeatureCollection"}},
    summary="The nuclei in a box",
)
def get_nuclei(
    job_id: str, services: ServicesDep, owner: OwnerDep,
    bbox: Annotated[str, Query(description="x0,y0,x1,y1 in level-0 px")],
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 5000,
) -> Response:
    """The GeoJSON features, exactly as the job's GeoJSON has them, of the nuclei whose centroid
    (of the polygon) lies in ``[x0, x1) × [y0, y1)``, at most ``limit`` of them; ``truncated``
    says whether more lay in the box. Served from a spatial index that reads only the part of the
    slide asked for."""
    box = _bbox(bbox)
    index = _index(services, _own_record(services, job_id, owner))
    result = index.query(*box, limit=limit)
    body = result.feature_collection(truncated=result.truncated, limit=limit, bbox=list(box))
    return Response(body, media_type="application/geo+json",
                    headers={"Cache-Control": "private, max-age=3600"})


@router.get("/{job_id}/nuclei/density", responses=_ERRORS, summary="Nuclei per class per grid cell")
def get_density(job_id: str, services: ServicesDep, owner: OwnerDep) -> Response:
    """Nuclei per class (unclassified first) in square cells of ``cell_um`` µm (``cell_px``
    level-0 px) binned by centroid: ``counts[class][row * cols + col]``. For overviews."""
    index = _index(services, _own_record(services, job_id, owner))
    return Response(json.dumps(index.density()), media_type="application/json",
                    headers={"Cache-Control": "private, max-age=3600"})
