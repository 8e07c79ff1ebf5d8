"""Network tiles shared between regions, so that every patch of the slide-wide grid runs once.

A region's maps cover its core and a halo of whole tiles; the halo tiles are other regions' core
tiles. Without sharing, each region re-infers its halo ring (about twice the network work at the
default region size). Here the region that first infers a tile some other region also needs
stores the tile's maps (exactly what the family runner cut from the network's output, so a
region reading it gets bit-identical maps), and the others read it instead of running it.

Tiles live on an fsspec filesystem (a local temporary folder for a local run, the job's folder
in the store for queued regions), never in memory: what is kept is bounded by the disk, and a
region's memory stays bounded by the region whatever the slide's width.
"""

from __future__ import annotations

import contextlib
import io
import logging
import uuid
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from fsspec.implementations.local import LocalFileSystem
from numpy.typing import NDArray

from worker.plan import Box, Region, tile_boxes

__all__ = ["TileCache", "TileUsers"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileUsers:
    """Which regions' maps hold each tile that more than one region needs.

    ``users`` maps a tile's origin ``(row0, col0)`` to the indices of the regions holding it,
    ascending (the plan's order); ``tile`` is the side of the slide-wide grid's tiles.
    """

    users: Mapping[tuple[int, int], tuple[int, ...]]
    tile: int

    @classmethod
    def of(cls, regions: Sequence[Region], tile: int) -> TileUsers:
        """The shared tiles of a plan's regions (maps boxes on the slide-wide grid of ``tile``)."""
        holders: dict[tuple[int, int], list[int]] = {}
        for region in regions:
            for t in tile_boxes(region.maps, tile=tile):
                holders.setdefault((t.row0, t.col0), []).append(region.index)
        return cls({key: tuple(sorted(v)) for key, v in holders.items() if len(v) > 1}, tile)

    def shared(self, tile: Box) -> bool:
        """Whether another region also needs this tile."""
        return (tile.row0, tile.col0) in self.users

    def neighbours(self, region: Region) -> set[int]:
        """The regions sharing a tile with ``region`` (itself included when it shares any)."""
        return {i for t in tile_boxes(region.maps, tile=self.tile)
                for i in self.users.get((t.row0, t.col0), ())}

    def finished(self, region: Region, done: Iterable[int]) -> list[Box]:
        """The shared tiles of ``region`` that no region outside ``done`` still needs."""
        finished = set(done)
        return [t for t in tile_boxes(region.maps, tile=self.tile)
                if (t.row0, t.col0) in self.users
                and finished.issuperset(self.users[(t.row0, t.col0)])]


class TileCache:
    """Tile maps stored as one uncompressed ``.npz`` per tile under ``root`` on ``fs``.

    Writes are atomic (a reader sees a whole tile or none); a damaged or missing tile reads as
    None and is simply inferred again, so the cache can never change a result, only save work.
    """

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.local = isinstance(fs, LocalFileSystem)
        self.fs.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"TileCache({self.root!r})"

    def _path(self, tile: Box) -> str:
        return f"{self.root}/{tile.row0}_{tile.col0}.npz"

    def get(self, tile: Box) -> dict[str, NDArray] | None:
        """The maps stored for ``tile``, or None."""
        try:
            data = self.fs.cat_file(self._path(tile))
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                return {name: arrays[name] for name in arrays.files}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # torn: infer again
            logger.warning("tile cache %s: unreadable %s (%s); inferring it again", self.root,
                           self._path(tile), exc)
            return None

    def put(self, tile: Box, maps: Mapping[str, NDArray]) -> None:
        """Store the maps of ``tile`` (the family runner's tile arrays)."""
        buffer = io.BytesIO()
        arrays: dict[str, Any] = {name: np.ascontiguousarray(a) for name, a in maps.items()}
        np.savez(buffer, **arrays)
        path = self._path(tile)
        if self.local:
            tmp = f"{self.root}/.tmp-{uuid.uuid4().hex}"
            self.fs.pipe_file(tmp, buffer.getvalue())
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, buffer.getvalue())  # object stores put whole objects

    def discard(self, tiles: Iterable[Box]) -> None:
        """Forget these tiles (missing ones are fine)."""
        for tile in tiles:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(tile))

    def clear(self) -> None:
        """Remove every stored tile and the folder."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.root, recursive=True)
