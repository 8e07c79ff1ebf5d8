"""Slides OpenSlide reads: Aperio, Hamamatsu, MIRAX, Leica, Philips, Ventana, generic tiled TIFF,
DICOM WSI."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import openslide
from numpy.typing import NDArray

from worker.errors import UnsupportedSlide
from worker.slide.base import MAX_CHUNK_BYTES, Slide, composite_on_white, resolve_mpp

__all__ = ["OpenSlideSlide", "openslide_vendor"]

logger = logging.getLogger(__name__)

_PROPERTY_NAMES = {
    "vendor": openslide.PROPERTY_NAME_VENDOR,
    "objective_power": openslide.PROPERTY_NAME_OBJECTIVE_POWER,
}


def openslide_vendor(path: Path) -> str | None:
    """OpenSlide's vendor name for ``path``, or ``None`` if OpenSlide does not recognise it."""
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError) as exc:
        logger.debug("%s: OpenSlide format detection failed: %s", path, exc)
        return None


def _float_property(props: Mapping[str, str], name: str) -> float | None:
    try:
        return float(props[name])
    except (KeyError, ValueError):
        return None


class OpenSlideSlide(Slide):
    """A slide read with OpenSlide (``openslide-bin``, no system library needed)."""

    def __init__(self, path: Path, *, mpp: float | None = None) -> None:
        try:
            osr = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as exc:
            raise UnsupportedSlide(f"{path}: OpenSlide cannot open it: {exc}") from exc
        self._osr: openslide.OpenSlide | None = osr
        try:
            self._setup(path, osr, mpp)
        except BaseException:
            self.close()
            raise

    def _setup(self, path: Path, osr: openslide.OpenSlide, override: float | None) -> None:
        props = osr.properties
        for level in range(osr.level_count):
            tile_w = _float_property(props, f"openslide.level[{level}].tile-width") or 0
            tile_h = _float_property(props, f"openslide.level[{level}].tile-height") or 0
            if tile_w * tile_h * 4 > MAX_CHUNK_BYTES:
                raise UnsupportedSlide(
                    f"{path}: level {level} claims {int(tile_w)}×{int(tile_h)} px tiles, too large "
                    "to decode safely (damaged header?)"
                )
        mpp_x = _float_property(props, openslide.PROPERTY_NAME_MPP_X)
        mpp_y = _float_property(props, openslide.PROPERTY_NAME_MPP_Y)
        found = None
        if mpp_x is not None and mpp_y is not None:
            if abs(mpp_x - mpp_y) > 0.01 * max(mpp_x, mpp_y):
                logger.warning("%s: anisotropic pixels (%g × %g µm); using the mean", path, mpp_x, mpp_y)
            found = (mpp_x + mpp_y) / 2
        mpp, source = resolve_mpp(found, override, path)
        vendor = props.get(openslide.PROPERTY_NAME_VENDOR, "openslide")
        properties = {"reader": "openslide", "mpp_source": source}
        for key, name in _PROPERTY_NAMES.items():
            if name in props and props[name].strip():
                properties[key] = props[name].strip()[:200]
        if found is not None:
            properties["metadata_mpp"] = f"{found:.6g}"
        super().__init__(
            path,
            format=vendor,
            mpp=mpp,
            level_shapes=tuple((h, w) for w, h in osr.level_dimensions),
            level_downsamples=tuple(osr.level_downsamples),
            properties=properties,
        )

    def _read_inside(
        self, level: int, row: int, col: int, height: int, width: int
    ) -> NDArray[np.uint8]:
        if self._osr is None:
            raise ValueError(f"{self.path}: the slide is closed")
        downsample = self.level_downsamples[level]
        # OpenSlide places regions in level-0 coordinates; for non-integer downsamples the
        # rounding shifts the region by under half a pixel of this level.
        location = (round(col * downsample), round(row * downsample))
        try:
            image = self._osr.read_region(location, level, (width, height))
        except openslide.OpenSlideError as exc:
            raise UnsupportedSlide(
                f"{self.path}: cannot decode level {level} at row {row}, col {col}: {exc}"
            ) from exc
        return composite_on_white(np.asarray(image))

    def close(self) -> None:
        """Release the OpenSlide handle (idempotent)."""
        if self._osr is not None:
            self._osr.close()
            self._osr = None
