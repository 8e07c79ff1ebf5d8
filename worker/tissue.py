"""Tissue detection on a slide thumbnail, and the tissue mask the region planner consults.

Tissue is what is stained: saturation above an Otsu threshold (clamped to a plausible range so a
blank slide's noise or an all-tissue field cannot move it far), or darker than the background and
at least faintly coloured. Pen ink (strongly saturated red, green or blue with hues H&E never
has) and black (borders, dust, marker) are excluded, with a small margin for blurred stroke
edges; morphology then removes specks and fills small holes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError
from skimage.morphology import remove_small_objects

from worker.errors import TissueMaskError

if TYPE_CHECKING:
    from worker.plan import Box
    from worker.slide import Slide

__all__ = [
    "DEFAULT_MIN_AREA_FRACTION",
    "TissueMask",
    "detect_tissue",
    "load_tissue_mask",
    "tissue_mask_for",
    "tissue_mask_from",
]

logger = logging.getLogger(__name__)

DEFAULT_MIN_AREA_FRACTION = 2e-4
"""Smallest tissue fragment kept, as a fraction of the thumbnail's area (a 2048 × 1536 thumbnail
keeps fragments of 630 px and more, about 0.15 mm² on a 40× slide)."""

MIN_SATURATION = 20
"""Lowest saturation threshold (of 255): glass, even tinted, stays below it."""

MAX_SATURATION = 50
"""Highest saturation threshold (of 255): pale eosin stays above it, so a thumbnail full of tissue
is not split into 'tissue' and 'more tissue'."""

MAX_GREY = 220
"""Grey level (of 255) below which faintly coloured pixels count as tissue."""

BLACK_VALUE = 45
"""HSV value (of 255) below which a pixel is black border, dust or marker, never tissue."""

MASK_ASPECT_TOLERANCE = 0.02
"""How far a user mask's aspect ratio may differ from the slide's (relative)."""

MAX_MASK_PIXELS = 20_000 * 20_000
"""Largest user mask accepted, pixels."""

# Hue bands in OpenCV's full-range HSV (0–255 for 0–360°) and the saturation (of 255) above which
# a pixel of that hue is ink: H&E spans roughly 270–345° (purple to pink).
_RED_PEN = ((340, 360), (0, 20), 115)
_GREEN_PEN = ((70, 180), None, 64)
_BLUE_PEN = ((180, 255), None, 100)
_DARK_RED_PEN = ((320, 360), (0, 20), 128)
_DARK_RED_VALUE = 110
_INK_HUE_FROM = 342  # degrees: redder than eosin's pink
_DULL_DARK_VALUE = 130
_DULL_DARK_SATURATION = 100
_INKY_FRACTION = 0.5


def _hue_units(degrees: float) -> int:
    return round(degrees * 256 / 360)


def _check_thumbnail(thumbnail: NDArray[np.uint8]) -> NDArray[np.uint8]:
    if not isinstance(thumbnail, np.ndarray):
        raise TypeError(f"thumbnail must be a numpy array, got {type(thumbnail).__name__}")
    if thumbnail.dtype != np.uint8:
        raise TypeError(f"thumbnail must be uint8, got {thumbnail.dtype}")
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or 0 in thumbnail.shape:
        raise ValueError(f"thumbnail must be a non-empty (H, W, 3) RGB image, got shape {thumbnail.shape}")
    return np.ascontiguousarray(thumbnail)


def _in_band(hue: NDArray[np.uint8], band: tuple[float, float] | None) -> NDArray[np.bool_]:
    if band is None:
        return np.zeros(hue.shape, dtype=bool)
    low, high = _hue_units(band[0]), _hue_units(band[1])
    return (hue >= low) & (hue <= min(high, 255))


def pen_mask(hsv: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """Pixels of pen ink: strongly saturated red, green or blue, and dark saturated red.

    Parameters
    ----------
    hsv : (H, W, 3) uint8 ndarray
        OpenCV full-range HSV (``cv2.COLOR_RGB2HSV_FULL``).

    Returns
    -------
    (H, W) bool ndarray
    """
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    ink = np.zeros(hue.shape, dtype=bool)
    for band_a, band_b, min_sat in (_RED_PEN, _GREEN_PEN, _BLUE_PEN):
        ink |= (_in_band(hue, band_a) | _in_band(hue, band_b)) & (sat >= min_sat)
    band_a, band_b, min_sat = _DARK_RED_PEN
    ink |= (_in_band(hue, band_a) | _in_band(hue, band_b)) & (sat >= min_sat) & (val < _DARK_RED_VALUE)
    return ink & (val >= BLACK_VALUE)


def _otsu(values: NDArray[np.uint8]) -> float:
    """Otsu's threshold of uint8 values: the largest level of the darker class (OpenCV's)."""
    # OpenCV's 8-bit Otsu (first maximum of the between-class variance) gave the same thresholds
    # as a float64 histogram written out, on every shared slide and tile and on 3,000 random
    # histograms with empty bins and single levels.
    threshold, _ = cv2.threshold(values.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(threshold)


def _disk(radius: int) -> NDArray[np.uint8]:
    shape = (2 * radius + 1, 2 * radius + 1)
    return np.asarray(cv2.getStructuringElement(cv2.MORPH_ELLIPSE, shape), dtype=np.uint8)


def _remove_small(mask: NDArray[np.bool_], min_area: int) -> NDArray[np.bool_]:
    """``mask`` without its 8-connected fragments of fewer than ``min_area`` pixels."""
    # max_size removes fragments of at most that many pixels, i.e. fewer than min_area.
    kept: NDArray[np.bool_] = remove_small_objects(mask, max_size=min_area - 1, connectivity=2)
    return kept


def _fill_small_holes(mask: NDArray[np.bool_], max_area: int) -> NDArray[np.bool_]:
    _, labels, stats, _ = cv2.connectedComponentsWithStats(
        (~mask).astype(np.uint8), connectivity=4
    )
    height, width = mask.shape
    left, top = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    right = left + stats[:, cv2.CC_STAT_WIDTH]
    bottom = top + stats[:, cv2.CC_STAT_HEIGHT]
    touches_edge = (left == 0) | (top == 0) | (right == width) | (bottom == height)
    fill = (stats[:, cv2.CC_STAT_AREA] <= max_area) & ~touches_edge
    fill[0] = False  # label 0 is the tissue itself
    return mask | fill[labels]


def _ink_like(hsv: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """Pixels whose colour is unusual for H&E but usual for ink mixed with glass: red hues
    (beyond eosin's pink) at any saturation, and dull dark colours (black or mixed ink)."""
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    reddish = _in_band(hue, (_INK_HUE_FROM, 360)) | _in_band(hue, (0, 20))
    dull_dark = (val < _DULL_DARK_VALUE) & (sat < _DULL_DARK_SATURATION)
    return (reddish & (sat > MIN_SATURATION // 2)) | dull_dark


def _drop_inky_components(
    tissue: NDArray[np.bool_], ink_like: NDArray[np.bool_]
) -> NDArray[np.bool_]:
    """Remove fragments most of whose pixels look like ink (the blurred edges of pen strokes)."""
    count, labels = cv2.connectedComponents(tissue.astype(np.uint8), connectivity=8)
    if count <= 1:
        return tissue
    area = np.bincount(labels.ravel(), minlength=count)
    inky = np.bincount(labels[ink_like], minlength=count)
    keep = inky <= _INKY_FRACTION * area
    keep[0] = False
    return keep[labels]


def detect_tissue(
    thumbnail: NDArray[np.uint8], *, min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION
) -> NDArray[np.bool_]:
    """Find stained tissue in a low-resolution RGB image of a slide.

    Parameters
    ----------
    thumbnail : (H, W, 3) uint8 ndarray
        RGB image, background white.
    min_area_fraction : float
        Fragments smaller than this fraction of the image are dropped (dust, debris); in [0, 1).

    Returns
    -------
    (H, W) bool ndarray
        True on tissue. A blank image gives an all-False mask; pen ink and black are never
        tissue.
    """
    rgb = _check_thumbnail(thumbnail)
    if not 0 <= min_area_fraction < 1:
        raise ValueError(f"min_area_fraction must be in [0, 1), got {min_area_fraction}")
    height, width = rgb.shape[:2]
    hsv = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL), dtype=np.uint8)
    sat, val = hsv[..., 1], hsv[..., 2]
    grey = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), dtype=np.uint8)

    usable = ~pen_mask(hsv) & (val >= BLACK_VALUE)
    if not usable.any():
        return np.zeros((height, width), dtype=bool)
    sat_threshold = min(max(_otsu(sat[usable]), MIN_SATURATION), MAX_SATURATION)
    grey_threshold = min(_otsu(grey[usable]), MAX_GREY)
    tissue = (sat > sat_threshold) | ((grey < grey_threshold) & (sat > MIN_SATURATION // 2))
    tissue &= usable

    # Close first so fibrous stroma becomes one piece, then open to drop specks and threads.
    radius = max(1, round(0.002 * max(height, width)))
    tissue_u8 = cv2.morphologyEx(tissue.astype(np.uint8), cv2.MORPH_CLOSE, _disk(2 * radius))
    tissue_u8 = cv2.morphologyEx(tissue_u8, cv2.MORPH_OPEN, _disk(radius))
    tissue = tissue_u8.astype(bool) & usable
    tissue = _drop_inky_components(tissue, _ink_like(hsv))
    min_area = max(1, math.ceil(min_area_fraction * height * width))
    tissue = _remove_small(tissue, min_area)
    return _fill_small_holes(tissue, 10 * min_area) & usable


class TissueMask:
    """A tissue mask over a slide (or the part of it planned) at low resolution.

    Parameters
    ----------
    mask : (h, w) bool ndarray
        True on tissue; mask pixel (r, c) covers level-0 rows [y + r·d, y + (r+1)·d), columns
        [x + c·d, x + (c+1)·d). Everything outside the mask is not tissue.
    downsample : float
        ``d``, level-0 pixels per mask pixel (> 0).
    origin : (int, int)
        ``(y, x)``, the level-0 (row, col) of the mask's top-left corner: (0, 0) for a mask of
        the whole slide, the ROI's corner for one of the ROI alone.
    """

    def __init__(
        self, mask: NDArray[np.bool_], downsample: float, origin: tuple[int, int] = (0, 0)
    ) -> None:
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.ndim != 2:
            raise TypeError(
                f"mask must be a 2-D bool ndarray, got "
                f"{getattr(mask, 'dtype', type(mask).__name__)} {getattr(mask, 'shape', '')}"
            )
        if 0 in mask.shape:
            raise ValueError(f"mask must not be empty, got shape {mask.shape}")
        if not math.isfinite(downsample) or downsample <= 0:
            raise ValueError(f"downsample must be a positive number, got {downsample}")
        if len(origin) != 2 or any(isinstance(v, bool) or int(v) != v for v in origin):
            raise ValueError(f"origin must be a (row, col) pair of ints, got {origin!r}")
        self.mask = mask
        self.downsample = float(downsample)
        self.origin = (int(origin[0]), int(origin[1]))

    def __repr__(self) -> str:
        h, w = self.mask.shape
        origin = "" if self.origin == (0, 0) else f", origin={self.origin}"
        return (
            f"TissueMask(shape=({h}, {w}), downsample={self.downsample:.4g}{origin}, "
            f"area_fraction={self.area_fraction:.3f})"
        )

    def _window(self, row0: float, col0: float, row1: float, col1: float) -> NDArray[np.bool_]:
        """The mask pixels that the half-open level-0 box [row0, row1) × [col0, col1) touches
        (empty when it touches none)."""
        d = self.downsample
        height, width = self.mask.shape
        row0, row1 = row0 - self.origin[0], row1 - self.origin[0]
        col0, col1 = col0 - self.origin[1], col1 - self.origin[1]
        r0, c0 = max(0, math.floor(row0 / d)), max(0, math.floor(col0 / d))
        r1, c1 = min(height, math.ceil(row1 / d)), min(width, math.ceil(col1 / d))
        return self.mask[r0:max(r0, r1), c0:max(c0, c1)]

    def any_in(self, row0: float, col0: float, row1: float, col1: float) -> bool:
        """Whether any tissue lies in the half-open level-0 box [row0, row1) × [col0, col1)."""
        if row1 <= row0 or col1 <= col0:
            return False
        return bool(self._window(row0, col0, row1, col1).any())

    def tissue_in(self, level0: Box) -> bool:
        """Whether any tissue lies in a level-0 :class:`~worker.plan.Box` (the planner's
        question: :meth:`any_in` on the box's half-open rows and columns)."""
        return self.any_in(level0.row0, level0.col0, level0.row1, level0.col1)

    @property
    def area_fraction(self) -> float:
        """Fraction of the mask that is tissue, in [0, 1]."""
        return float(self.mask.mean())

    def area_mm2(self, mpp: float) -> float:
        """Tissue area in mm², given the slide's level-0 µm per pixel."""
        if not math.isfinite(mpp) or mpp <= 0:
            raise ValueError(f"mpp must be a positive number, got {mpp}")
        pixel_mm = self.downsample * mpp / 1000.0
        return float(self.mask.sum()) * pixel_mm * pixel_mm

    def area_mm2_in(self, level0: Box, mpp: float) -> float:
        """Tissue area in mm² of the mask pixels a level-0 box touches (the analysed ROI's)."""
        pixels = int(self._window(level0.row0, level0.col0, level0.row1, level0.col1).sum())
        return pixels * (self.downsample * mpp / 1000.0) ** 2


def tissue_mask_for(
    slide: Slide,
    *,
    max_side: int = 2048,
    roi: tuple[int, int, int, int] | None = None,
    budget: int | None = None,
) -> TissueMask:
    """Detect tissue on the slide's thumbnail, within the planning pixel budget.

    Parameters
    ----------
    slide : Slide
        An open slide.
    max_side : int
        Longest side of the thumbnail the mask is computed on, pixels.
    roi : (x, y, w, h), optional
        The level-0 region of interest: the mask covers only it when the slide has no pyramid
        level small enough to be seen whole within the budget.
    budget : int, optional
        Most pixels decoded (default :data:`~worker.slide.base.PLANNING_PIXEL_BUDGET`).

    Raises
    ------
    SlideTooLarge
        If neither the whole slide nor the ROI can be seen within the budget.
    """
    from worker.slide.base import PLANNING_PIXEL_BUDGET
    from worker.slide.overview import planning_overviews

    _, detail = planning_overviews(
        slide, roi, max_side=max_side, budget=PLANNING_PIXEL_BUDGET if budget is None else budget
    )
    return tissue_mask_from(detail.image, detail.downsample, detail.origin, name=slide.path.name)


def tissue_mask_from(
    image: NDArray[np.uint8],
    downsample: float,
    origin: tuple[int, int] = (0, 0),
    *,
    name: str = "slide",
) -> TissueMask:
    """Detect tissue on a low-resolution image of a slide (or of part of it).

    Parameters
    ----------
    image : (h, w, 3) uint8 ndarray
        RGB image, background white.
    downsample : float
        Level-0 pixels per image pixel.
    origin : (int, int)
        Level-0 (row, col) of the image's top-left corner.
    name : str
        The slide's name, for the log.
    """
    mask = TissueMask(detect_tissue(image), downsample, origin)
    where = "the slide" if origin == (0, 0) else f"the area at {origin}"
    logger.info("%s: tissue covers %.1f%% of %s", name, 100 * mask.area_fraction, where)
    return mask


def load_tissue_mask(path: str | Path, slide_shape: tuple[int, int]) -> TissueMask:
    """Read a user's tissue mask image (nonzero = tissue) for a slide.

    Parameters
    ----------
    path : str or Path
        A PNG (or any image Pillow reads) of any size with the slide's aspect ratio.
    slide_shape : (int, int)
        The slide's level-0 (height, width).

    Raises
    ------
    TissueMaskError
        If the image cannot be read or its aspect ratio differs from the slide's by more than
        ``MASK_ASPECT_TOLERANCE``.
    """
    slide_h, slide_w = (int(v) for v in slide_shape)
    if slide_h < 1 or slide_w < 1:
        raise ValueError(f"slide_shape must be positive, got {slide_shape}")
    path = Path(path)
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_MASK_PIXELS:
                raise TissueMaskError(
                    f"{path}: a {image.width}×{image.height} mask is too large; give a "
                    "downsampled one (any size with the slide's aspect ratio)"
                )
            pixels = _mask_pixels(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise TissueMaskError(f"{path}: cannot read the tissue mask: {exc}") from exc
    mask_h, mask_w = pixels.shape
    ratio = (mask_w / mask_h) / (slide_w / slide_h)
    if abs(ratio - 1) > MASK_ASPECT_TOLERANCE:
        raise TissueMaskError(
            f"{path}: the mask is {mask_w}×{mask_h} px (aspect {mask_w / mask_h:.3f}) but the "
            f"slide is {slide_w}×{slide_h} px (aspect {slide_w / slide_h:.3f}); they must match "
            f"within {MASK_ASPECT_TOLERANCE:.0%}"
        )
    # Resample to exactly the slide's extent so one downsample maps both axes.
    downsample = max(slide_h / mask_h, slide_w / mask_w)
    shape = (math.ceil(slide_h / downsample - 1e-9), math.ceil(slide_w / downsample - 1e-9))
    if shape != pixels.shape:
        resized = cv2.resize(pixels.astype(np.uint8), shape[::-1], interpolation=cv2.INTER_NEAREST)
        pixels = np.asarray(resized) > 0
    mask = pixels.astype(bool)
    if not mask.any():
        logger.warning("%s: the tissue mask is empty; no region will be processed", path)
    return TissueMask(mask, downsample)


def _mask_pixels(image: Image.Image) -> NDArray[np.bool_]:
    """Nonzero colour (alpha ignored) as a bool array."""
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    array = np.asarray(image)
    if array.ndim == 3:
        channels = array.shape[2]
        if channels in (2, 4):  # LA / RGBA: drop alpha
            array = array[..., : channels - 1]
        return np.any(array != 0, axis=2)
    return array != 0
