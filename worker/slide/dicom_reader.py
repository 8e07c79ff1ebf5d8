"""DICOM slides OpenSlide refuses: wsidicom first, then a frame-by-frame pydicom reader.

The pydicom reader exists for real-world conversions that the standard readers reject (no
ImageType, no functional groups, no pixel spacing). It needs only the total pixel matrix, the
frame (tile) size and the pixel data: frames are located once at open from the encapsulated
item headers, and a read decodes only the frames it overlaps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, parse_basic_offsets, parse_fragments
from pydicom.errors import InvalidDicomError

from worker.errors import NotRGBSlide, UnsupportedSlide
from worker.slide.base import (
    MAX_CHUNK_BYTES,
    ChunkCache,
    Slide,
    composite_on_white,
    resolve_mpp,
)

__all__ = ["DicomFrameSlide", "WsiDicomSlide", "quiet_dicom"]

logger = logging.getLogger(__name__)

_PIXEL_DATA = 0x7FE00010
_RGB_PHOTOMETRICS = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
_PIXEL_ATTRIBUTES = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


@contextlib.contextmanager
def quiet_dicom() -> Iterator[None]:
    """Silence pydicom's and wsidicom's warnings about non-conformant values (over-long UIDs…),
    which real slide conversions are full of and which say nothing about the pixels."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(pydicom|wsidicom)(\.|$)")
        yield


def _pixel_spacing_mpp(ds: Dataset) -> float | None:
    """µm/px from PixelSpacing (mm, row then column), top level or shared functional groups."""
    candidates: list[Any] = [ds.get("PixelSpacing")]
    with contextlib.suppress(AttributeError, IndexError, TypeError):
        shared = ds.SharedFunctionalGroupsSequence[0]
        candidates.append(shared.PixelMeasuresSequence[0].get("PixelSpacing"))
    for spacing in candidates:
        try:
            row_mm, col_mm = (float(v) for v in spacing)
        except (TypeError, ValueError):
            continue
        return (row_mm + col_mm) / 2 * 1000.0
    return None


class WsiDicomSlide(Slide):
    """A DICOM WSI (file or directory) read with wsidicom."""

    def __init__(self, path: Path, *, mpp: float | None = None) -> None:
        import wsidicom  # slow to import, rarely needed

        try:
            with quiet_dicom():
                wsi = wsidicom.WsiDicom.open(path)
        except Exception as exc:  # wsidicom raises many types for files it cannot use
            raise UnsupportedSlide(f"{path}: wsidicom cannot open it: {exc}") from exc
        self._wsi: Any = wsi
        try:
            self._setup(path, wsi, mpp)
        except BaseException:
            self.close()
            raise

    def _setup(self, path: Path, wsi: Any, override: float | None) -> None:
        levels = sorted(wsi.levels, key=lambda level: level.level)
        self._level_numbers = tuple(int(level.level) for level in levels)
        shapes = tuple((int(level.size.height), int(level.size.width)) for level in levels)
        height0, width0 = shapes[0]
        downsamples = tuple((height0 / h + width0 / w) / 2 for h, w in shapes)
        found = None
        if wsi.mpp is not None:
            found = (float(wsi.mpp.width) + float(wsi.mpp.height)) / 2
        mpp, source = resolve_mpp(found, override, path)
        properties = {"reader": "wsidicom", "mpp_source": source}
        if found is not None:
            properties["metadata_mpp"] = f"{found:.6g}"
        super().__init__(
            path,
            format="dicom",
            mpp=mpp,
            level_shapes=shapes,
            level_downsamples=downsamples,
            properties=properties,
        )

    def _read_inside(
        self, level: int, row: int, col: int, height: int, width: int
    ) -> NDArray[np.uint8]:
        if self._wsi is None:
            raise ValueError(f"{self.path}: the slide is closed")
        try:
            with quiet_dicom():
                pixels = self._wsi.read_region(
                    (col, row), self._level_numbers[level], (width, height), as_array=True
                )
        except Exception as exc:  # decoder and wsidicom errors alike
            raise UnsupportedSlide(
                f"{self.path}: cannot decode level {level} at row {row}, col {col}: {exc}"
            ) from exc
        return composite_on_white(np.asarray(pixels, dtype=np.uint8))

    def close(self) -> None:
        """Close the DICOM files (idempotent)."""
        if self._wsi is not None:
            self._wsi.close()
            self._wsi = None


class DicomFrameSlide(Slide):
    """A single-level tiled DICOM image read frame by frame with pydicom (the last resort).

    Frames are the tiles of the total pixel matrix, in row-major order (TILED_FULL), or placed
    by their per-frame plane positions when the file has them (TILED_SPARSE).
    """

    def __init__(self, path: Path, *, mpp: float | None = None) -> None:
        self._cache = ChunkCache()
        try:
            self._fh: BinaryIO | None = path.open("rb")
        except OSError as exc:
            raise UnsupportedSlide(f"{path}: cannot open it: {exc}") from exc
        try:
            self._setup(path, self._fh, mpp)
        except BaseException:
            self.close()
            raise

    def _setup(self, path: Path, fh: BinaryIO, override: float | None) -> None:
        file_size = path.stat().st_size
        try:
            with quiet_dicom():
                ds = pydicom.dcmread(fh, stop_before_pixels=True)
                self._meta = self._pixel_meta(path, ds)
        except (InvalidDicomError, ValueError, TypeError, OSError, EOFError) as exc:
            raise UnsupportedSlide(f"{path}: not a readable DICOM file: {exc}") from exc
        self._encapsulated = bool(ds.file_meta.TransferSyntaxUID.is_encapsulated)
        self._transfer_syntax = ds.file_meta.TransferSyntaxUID
        self._locate_frames(path, fh, file_size)
        self._place_tiles(path, ds)
        with quiet_dicom():
            found = _pixel_spacing_mpp(ds)
        mpp, source = resolve_mpp(found, override, path)
        properties = {
            "reader": "pydicom",
            "mpp_source": source,
            "transfer_syntax": str(self._transfer_syntax.name),
        }
        if found is not None:
            properties["metadata_mpp"] = f"{found:.6g}"
        super().__init__(
            path,
            format="dicom",
            mpp=mpp,
            level_shapes=((self._total_rows, self._total_cols),),
            level_downsamples=(1.0,),
            properties=properties,
        )

    def _pixel_meta(self, path: Path, ds: Dataset) -> dict[str, Any]:
        missing = [name for name in ("Rows", "Columns", "SamplesPerPixel") if name not in ds]
        if missing:
            raise UnsupportedSlide(f"{path}: DICOM file without image attributes {missing}")
        meta = {name: ds.get(name) for name in _PIXEL_ATTRIBUTES}
        meta["PlanarConfiguration"] = ds.get("PlanarConfiguration", 0)
        photometric = str(meta["PhotometricInterpretation"])
        if (
            meta["SamplesPerPixel"] != 3
            or meta["BitsAllocated"] != 8
            or photometric not in _RGB_PHOTOMETRICS
        ):
            raise NotRGBSlide(
                f"{path}: found {meta['SamplesPerPixel']} channel(s) of {meta['BitsAllocated']}-bit "
                f"samples (photometric {photometric}); HoVerServe needs an 8-bit RGB brightfield "
                "(H&E) image"
            )
        rows, cols = int(meta["Rows"]), int(meta["Columns"])
        if rows < 1 or cols < 1 or rows * cols * 3 > MAX_CHUNK_BYTES:
            raise UnsupportedSlide(
                f"{path}: frames of {cols}×{rows} px are empty or too large to decode safely"
            )
        self._frame_rows, self._frame_cols = rows, cols
        self._n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        self._total_rows = int(ds.get("TotalPixelMatrixRows", rows if self._n_frames == 1 else 0))
        self._total_cols = int(ds.get("TotalPixelMatrixColumns", cols if self._n_frames == 1 else 0))
        if self._total_rows < 1 or self._total_cols < 1:
            raise UnsupportedSlide(
                f"{path}: {self._n_frames} frames but no TotalPixelMatrixRows/Columns: "
                "not a tiled whole-slide image"
            )
        return meta

    def _locate_frames(self, path: Path, fh: BinaryIO, file_size: int) -> None:
        """Record the byte ranges of every frame (no pixel data is read)."""
        start = fh.tell()
        header = fh.read(8)
        if len(header) < 8 or (struct.unpack("<HH", header[:4]) != (0x7FE0, 0x0010)):
            raise UnsupportedSlide(f"{path}: DICOM file without pixel data")
        frame_bytes = self._frame_rows * self._frame_cols * 3
        if not self._encapsulated:
            # Explicit VR OB/OW: tag, VR, 2 reserved bytes, 4-byte length; implicit VR: tag, length.
            if header[4:6] in (b"OB", b"OW"):
                length = struct.unpack("<I", fh.read(4))[0]
                value_start = start + 12
            else:
                length = struct.unpack("<I", header[4:8])[0]
                value_start = start + 8
            needed = frame_bytes * self._n_frames
            if length < needed or value_start + needed > file_size:
                raise UnsupportedSlide(
                    f"{path}: truncated DICOM: {self._n_frames} frames need {needed:,} bytes of "
                    f"pixel data, the file holds {max(0, file_size - value_start):,}"
                )
            self._frames = [[(value_start + i * frame_bytes, frame_bytes)] for i in range(self._n_frames)]
            return
        fh.seek(start + 12)  # encapsulated: tag, "OB", reserved, undefined length
        try:
            offsets = parse_basic_offsets(fh)
            _, fragment_starts = parse_fragments(fh)
        except (ValueError, struct.error) as exc:
            raise UnsupportedSlide(f"{path}: damaged encapsulated pixel data: {exc}") from exc
        fragments = []
        for item in fragment_starts:
            fh.seek(item + 4)
            raw = fh.read(4)
            length = struct.unpack("<I", raw)[0] if len(raw) == 4 else file_size
            if item + 8 + length > file_size:
                raise UnsupportedSlide(
                    f"{path}: truncated DICOM: a frame needs bytes up to {item + 8 + length:,} "
                    f"but the file has {file_size:,}"
                )
            fragments.append((item + 8, length))
        self._frames = self._group_fragments(path, fragments, fragment_starts, offsets)

    def _group_fragments(
        self,
        path: Path,
        fragments: list[tuple[int, int]],
        fragment_starts: list[int],
        offsets: list[int],
    ) -> list[list[tuple[int, int]]]:
        if len(fragments) == self._n_frames:
            return [[fragment] for fragment in fragments]
        if self._n_frames == 1 and fragments:
            return [fragments]
        if len(offsets) == self._n_frames and fragment_starts:
            # Basic Offset Table: frame i starts at the fragment whose item begins at offset[i]
            # (relative to the first fragment's item tag).
            first = fragment_starts[0]
            frame_of = {first + offset: i for i, offset in enumerate(offsets)}
            frames: list[list[tuple[int, int]]] = []
            for item, fragment in zip(fragment_starts, fragments, strict=True):
                if item in frame_of:
                    frames.append([])
                if frames:
                    frames[-1].append(fragment)
            if len(frames) == self._n_frames:
                return frames
        raise UnsupportedSlide(
            f"{path}: cannot tell which of {len(fragments)} fragments belong to which of "
            f"{self._n_frames} frames"
        )

    def _place_tiles(self, path: Path, ds: Dataset) -> None:
        """Map (tile row, tile col) to frame numbers."""
        self._tiles_across = math.ceil(self._total_cols / self._frame_cols)
        tiles_down = math.ceil(self._total_rows / self._frame_rows)
        n_tiles = self._tiles_across * tiles_down
        positions = self._plane_positions(ds)
        if positions is not None:
            self._tile_frame = positions
            return
        if ds.get("DimensionOrganizationType") == "TILED_SPARSE":
            raise UnsupportedSlide(f"{path}: TILED_SPARSE DICOM without per-frame plane positions")
        if self._n_frames < n_tiles:
            raise UnsupportedSlide(
                f"{path}: {self._n_frames} frames cannot tile a {self._total_cols}×"
                f"{self._total_rows} matrix with {self._frame_cols}×{self._frame_rows} frames "
                f"({n_tiles} needed)"
            )
        if self._n_frames > n_tiles:
            logger.warning(
                "%s: %d frames for %d tiles (several focal planes or optical paths?); using the "
                "first %d",
                path, self._n_frames, n_tiles, n_tiles,
            )
        self._tile_frame = {
            (index // self._tiles_across, index % self._tiles_across): index
            for index in range(n_tiles)
        }

    def _plane_positions(self, ds: Dataset) -> dict[tuple[int, int], int] | None:
        try:
            groups = ds.PerFrameFunctionalGroupsSequence
        except AttributeError:
            return None
        placed: dict[tuple[int, int], int] = {}
        for index, group in enumerate(groups):
            try:
                position = group.PlanePositionSlideSequence[0]
                row = int(position.RowPositionInTotalImagePixelMatrix) - 1
                col = int(position.ColumnPositionInTotalImagePixelMatrix) - 1
            except (AttributeError, IndexError, TypeError, ValueError):
                return None
            if row % self._frame_rows or col % self._frame_cols:
                return None
            # The first frame at a position wins (later ones are other focal planes/paths).
            placed.setdefault((row // self._frame_rows, col // self._frame_cols), index)
        return placed

    def _decode_frame(self, index: int) -> NDArray[np.uint8]:
        if self._fh is None:
            raise ValueError(f"{self.path}: the slide is closed")
        parts = []
        for offset, length in self._frames[index]:
            self._fh.seek(offset)
            parts.append(self._fh.read(length))
        frame = Dataset()
        frame.file_meta = FileMetaDataset()
        frame.file_meta.TransferSyntaxUID = self._transfer_syntax
        for name, value in self._meta.items():
            setattr(frame, name, value)
        frame.NumberOfFrames = 1
        try:
            with quiet_dicom():
                frame.PixelData = encapsulate([b"".join(parts)]) if self._encapsulated else parts[0]
                pixels = frame.pixel_array
        except Exception as exc:  # decoder plugins raise their own types
            raise UnsupportedSlide(f"{self.path}: cannot decode frame {index}: {exc}") from exc
        return composite_on_white(np.asarray(pixels, dtype=np.uint8).reshape(
            self._frame_rows, self._frame_cols, 3
        ))

    def _read_inside(
        self, level: int, row: int, col: int, height: int, width: int
    ) -> NDArray[np.uint8]:
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        fr, fc = self._frame_rows, self._frame_cols
        for tile_row in range(row // fr, (row + height - 1) // fr + 1):
            for tile_col in range(col // fc, (col + width - 1) // fc + 1):
                index = self._tile_frame.get((tile_row, tile_col))
                if index is None:  # a sparse matrix's missing tile: background
                    continue
                tile = self._cache.get(index)
                if tile is None:
                    tile = self._decode_frame(index)
                    self._cache.put(index, tile)
                top, left = tile_row * fr, tile_col * fc
                r0, r1 = max(row, top), min(row + height, top + fr)
                c0, c1 = max(col, left), min(col + width, left + fc)
                out[r0 - row : r1 - row, c0 - col : c1 - col] = tile[
                    r0 - top : r1 - top, c0 - left : c1 - left
                ]
        return out

    def close(self) -> None:
        """Close the file and drop decoded frames (idempotent)."""
        self._cache.clear()
        if self._fh is not None:
            self._fh.close()
            self._fh = None
