"""PNG and JPEG images as one-level slides (Pillow).

These formats cannot be decoded region by region, so the image is decoded once, at open, and
kept; Pillow's decompression-bomb limit (about 179 Mpx) bounds that memory.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from worker.errors import NotRGBSlide, UnsupportedSlide
from worker.slide.base import Slide, composite_on_white, resolve_mpp

__all__ = ["IMAGE_FORMATS", "ImageSlide"]

IMAGE_FORMATS = ("PNG", "JPEG")
"""Pillow format names read as one-level slides."""

_RGB_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "YCbCr"}
_GREY_DESCRIPTION = {
    "1": "1 channel of 1-bit",
    "L": "1 channel of uint8",
    "LA": "1 channel of uint8 with alpha",
    "I": "1 channel of int32",
    "I;16": "1 channel of uint16",
    "I;16B": "1 channel of uint16",
    "F": "1 channel of float32",
    "CMYK": "4 channels of uint8 (CMYK)",
}


def _dpi_mpp(image: Image.Image) -> float | None:
    dpi = image.info.get("dpi")
    if dpi is None:
        return None
    try:
        x_dpi, y_dpi = (float(v) for v in dpi)
    except (TypeError, ValueError):
        return None
    if x_dpi <= 0 or y_dpi <= 0:
        return None
    return (25_400.0 / x_dpi + 25_400.0 / y_dpi) / 2


class ImageSlide(Slide):
    """A PNG or JPEG image read as a one-level slide (decoded once, at open)."""

    def __init__(self, path: Path, *, mpp: float | None = None) -> None:
        try:
            with warnings.catch_warnings():
                # Our own size limit applies below; Pillow's warning would only repeat it.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise UnsupportedSlide(
                f"{path}: image too large to decode whole ({exc}); convert it to a tiled "
                "pyramidal TIFF"
            ) from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UnsupportedSlide(f"{path}: not a readable image: {exc}") from exc
        self._image: Image.Image | None = image
        self._pixels: NDArray[np.uint8] | None = None
        try:
            self._setup(path, image, mpp)
        except BaseException:
            self.close()
            raise

    def _setup(self, path: Path, image: Image.Image, override: float | None) -> None:
        if image.format not in IMAGE_FORMATS:
            raise UnsupportedSlide(
                f"{path}: {image.format} images are not supported (use PNG, JPEG or TIFF)"
            )
        if image.mode not in _RGB_MODES:
            found = _GREY_DESCRIPTION.get(image.mode, f"Pillow mode {image.mode}")
            raise NotRGBSlide(
                f"{path}: found {found}; HoVerServe needs an 8-bit RGB brightfield (H&E) image"
            )
        found_mpp = _dpi_mpp(image)
        mpp, source = resolve_mpp(found_mpp, override, path, what="its dpi metadata")
        properties = {"reader": "pillow", "mpp_source": source, "image_format": str(image.format)}
        if found_mpp is not None:
            properties["metadata_mpp"] = f"{found_mpp:.6g}"
        width, height = image.size
        super().__init__(
            path,
            format="image",
            mpp=mpp,
            level_shapes=((height, width),),
            level_downsamples=(1.0,),
            properties=properties,
        )
        # Decode now so a truncated file fails at open rather than halfway through a job.
        self._decoded()

    def _decoded(self) -> NDArray[np.uint8]:
        if self._pixels is not None:
            return self._pixels
        if self._image is None:
            raise ValueError(f"{self.path}: the slide is closed")
        image = self._image
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                if (image.mode == "P" and "transparency" in image.info) or image.mode == "PA":
                    image = image.convert("RGBA")
                elif image.mode not in ("RGB", "RGBA"):
                    image = image.convert("RGB")
                pixels = np.asarray(image)
        except (OSError, ValueError, SyntaxError) as exc:
            raise UnsupportedSlide(f"{self.path}: cannot decode the image: {exc}") from exc
        self._pixels = composite_on_white(pixels)
        self._image.close()
        self._image = None
        return self._pixels

    def decoded_pixels(self, level: int, pixels: int) -> int:
        """0: the image was decoded whole at open (within Pillow's size limit); reads copy."""
        return 0

    def _read_inside(
        self, level: int, row: int, col: int, height: int, width: int
    ) -> NDArray[np.uint8]:
        return self._decoded()[row : row + height, col : col + width].copy()

    def close(self) -> None:
        """Release the image (idempotent)."""
        if self._image is not None:
            self._image.close()
            self._image = None
        self._pixels = None
