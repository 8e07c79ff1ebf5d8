"""Training augmentation for (image, instance map, type map) triples, keeping them aligned.

Geometry (random crop, zoom, small rotation and shear, flips, 90-degree rotations) is applied to the
three arrays with the same transform, labels by nearest neighbour; colour (HSV jitter, stain jitter
in optical-density space, brightness/contrast, Gaussian blur) touches the image only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = ["AugmentOptions", "augment", "random_crop_transform"]

# Ruifrok & Johnston stain vectors (haematoxylin, eosin, DAB) as rows, optical-density space
_STAINS = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]], dtype=np.float64)
_STAINS = _STAINS / np.linalg.norm(_STAINS, axis=1, keepdims=True)
_UNMIX = np.linalg.inv(_STAINS)


@dataclass(frozen=True)
class AugmentOptions:
    """Strengths of each augmentation; zeros turn a step off."""

    zoom: tuple[float, float] = (0.8, 1.25)
    rotation_deg: float = 15.0
    shear: float = 0.05
    flips: bool = True
    hue: float = 0.04
    saturation: float = 0.25
    brightness: float = 0.12
    contrast: float = 0.15
    stain: float = 0.08
    blur_p: float = 0.2
    blur_sigma: float = 1.0

    @classmethod
    def none(cls) -> AugmentOptions:
        """No augmentation at all: a plain random crop."""
        return cls((1.0, 1.0), 0.0, 0.0, False, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def random_crop_transform(
    shape: tuple[int, int], out_size: int, rng: np.random.Generator, options: AugmentOptions
) -> NDArray[np.float64]:
    """A 2x3 affine matrix mapping output (x, y) to source (x, y) whose footprint fits the source.

    The linear part is zoom, rotation and shear; when the rotated footprint does not fit in the
    source, the zoom is increased until it does, so no output pixel lies outside the image.
    """
    height, width = shape
    zoom = rng.uniform(*options.zoom)
    theta = math.radians(rng.uniform(-options.rotation_deg, options.rotation_deg))
    shear = rng.uniform(-options.shear, options.shear, size=(2, 2)) + np.eye(2)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    linear = rotation @ shear / zoom
    half = (out_size - 1) / 2.0
    corners = np.array([[-half, -half], [half, -half], [-half, half], [half, half]]).T
    extent = np.abs(linear @ corners).max(axis=1)  # (x, y) half-extent of the footprint
    room = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    if (extent > room).any():
        # too little room to rotate (e.g. a patch barely larger than the crop): drop rotation and
        # shear rather than zooming in further, which would bias nucleus sizes
        linear = np.eye(2) / zoom
        extent = np.abs(linear @ corners).max(axis=1)
    shrink = min(1.0, float((room / np.maximum(extent, 1e-9)).min()))
    linear, extent = linear * shrink, extent * shrink
    extent = np.minimum(extent, room)  # rounding can leave it a hair above
    centre = np.array(
        [rng.uniform(extent[0], width - 1 - extent[0]), rng.uniform(extent[1], height - 1 - extent[1])]
    )
    offset = centre - linear @ np.array([half, half])
    return np.hstack([linear, offset[:, None]])


def _warp(array: NDArray, matrix: NDArray[np.float64], out_size: int, *, nearest: bool) -> NDArray:
    flags = (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(array, matrix, (out_size, out_size), flags=flags, borderMode=cv2.BORDER_REFLECT_101)


def _geometry(
    image: NDArray[np.uint8],
    inst: NDArray[np.int32],
    types: NDArray[np.uint8],
    out_size: int,
    rng: np.random.Generator,
    options: AugmentOptions,
) -> tuple[NDArray[np.uint8], NDArray[np.int32], NDArray[np.uint8]]:
    matrix = random_crop_transform(inst.shape, out_size, rng, options)
    if np.allclose(matrix[:, :2], np.eye(2)):
        # an integer crop: exact, and much faster than resampling
        col, row = (int(np.rint(v)) for v in matrix[:, 2])
        window = np.s_[row : row + out_size, col : col + out_size]
        image, inst, types = image[window], inst[window], types[window]
    else:
        image = _warp(image, matrix, out_size, nearest=False)
        # ids below 2**24 are exact in float32; OpenCV has no nearest warp for int32
        inst = _warp(inst.astype(np.float32), matrix, out_size, nearest=True).astype(np.int32)
        types = _warp(types, matrix, out_size, nearest=True)
    if options.flips:
        k = int(rng.integers(4))
        flip = bool(rng.integers(2))
        image, inst, types = np.rot90(image, k), np.rot90(inst, k), np.rot90(types, k)
        if flip:
            image, inst, types = image[:, ::-1], inst[:, ::-1], types[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(inst), np.ascontiguousarray(types)


def _colour(image: NDArray[np.uint8], rng: np.random.Generator, options: AugmentOptions) -> NDArray[np.uint8]:
    rgb = image.astype(np.float32)
    if options.stain:
        od = -np.log((rgb.reshape(-1, 3) + 1.0) / 256.0)
        stains = od @ _UNMIX
        scale = rng.uniform(1 - options.stain, 1 + options.stain, size=3)
        shift = rng.uniform(-options.stain, options.stain, size=3) * 0.2
        od = (stains * scale + shift) @ _STAINS
        rgb = (256.0 * np.exp(-od) - 1.0).reshape(image.shape).astype(np.float32)
    if options.hue or options.saturation:
        hsv = cv2.cvtColor(np.clip(rgb / 255.0, 0, 1).astype(np.float32), cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0] + 360.0 * rng.uniform(-options.hue, options.hue)) % 360.0
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1 - options.saturation, 1 + options.saturation), 0, 1)
        rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0
    if options.brightness or options.contrast:
        mean = rgb.mean()
        contrast = rng.uniform(1 - options.contrast, 1 + options.contrast)
        brightness = 255.0 * rng.uniform(-options.brightness, options.brightness)
        rgb = (rgb - mean) * contrast + mean + brightness
    if options.blur_p and rng.random() < options.blur_p:
        sigma = rng.uniform(0.3, options.blur_sigma)
        rgb = np.asarray(cv2.GaussianBlur(rgb, (0, 0), sigma), dtype=np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def augment(
    image: NDArray[np.uint8],
    inst: NDArray[np.integer],
    types: NDArray[np.integer] | None = None,
    *,
    out_size: int,
    rng: np.random.Generator,
    options: AugmentOptions | None = None,
) -> tuple[NDArray[np.uint8], NDArray[np.int32], NDArray[np.uint8]]:
    """Random crop of side ``out_size`` with geometric and colour augmentation.

    Parameters
    ----------
    image : (H, W, 3) uint8 array
        RGB image.
    inst : (H, W) integer array
        Instance map (0 background).
    types : (H, W) integer array, optional
        Class per pixel; zeros when omitted.
    out_size : int
        Side of the output crop; H and W must be at least this.
    rng : numpy Generator
        Source of randomness (the only one used, so runs are reproducible).
    options : AugmentOptions, optional
        Strengths; default ``AugmentOptions()``.

    Returns
    -------
    tuple
        (out_size, out_size, 3) uint8 image, (out_size, out_size) int32 instances and uint8 types.
    """
    options = options or AugmentOptions()
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if inst.shape != image.shape[:2]:
        raise ValueError(f"inst shape {inst.shape} differs from image shape {image.shape[:2]}")
    if min(inst.shape) < out_size:
        raise ValueError(f"out_size {out_size} exceeds the image {inst.shape}")
    types8 = np.zeros(inst.shape, np.uint8) if types is None else types.astype(np.uint8, copy=False)
    inst32 = inst.astype(np.int32, copy=False)
    image, inst32, types8 = _geometry(image, inst32, types8, out_size, rng, options)
    return _colour(image, rng, options), inst32, types8
