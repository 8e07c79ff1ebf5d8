"""Measure a hover model's ``edge_range``: the fixed normalisation that makes its seams exact.

The official post-processing stretches each map's Sobel responses to [0, 1] by that map's own
minimum and maximum, so a region's extent moves every nucleus boundary a little. A card's
``edge_range`` replaces the two extremes by constants; measured here as the median, over
images, of each image's extremes, so that on a typical map the fixed normalisation is what the
official one would have been (``hoverserve model set-postprocess --measure-edge-range DATA``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from models.datasets import read_labelled
from models.families import HoverOptions
from worker.evaluation.model import predict_image_maps
from worker.infer import Model
from worker.postprocess import scaled_constants, upsample_maps
from worker.watershed import edge_response

__all__ = ["edge_extremes", "measure_edge_range"]


def edge_extremes(hv: NDArray[np.floating], ksize: int) -> tuple[float, float]:
    """The lowest and highest Sobel response (fractions of the kernel's gain) of an HV map pair
    ``(2, H, W)`` on its fixed scale: x derivative of the horizontal map, y of the vertical."""
    h = edge_response(hv[0], 1, 0, ksize)
    v = edge_response(hv[1], 0, 1, ksize)
    return float(min(h.min(), v.min())), float(max(h.max(), v.max()))


def measure_edge_range(model: Model, data: Sequence[str | Path], *, only: Sequence[str] = (),
                       mpp: float | None = None) -> tuple[float, float]:
    """The median over the images of ``data`` of each image's edge extremes, on the maps as the
    card's post-processing sees them (upsampled by its factor).

    Raises
    ------
    ValueError
        The model is not of the hover family, or no image matched.
    """
    options = model.card.options
    if not isinstance(options, HoverOptions):
        raise ValueError(f"edge_range applies to hover models; {model.card.name} is "
                         f"{model.card.family!r}")
    factor = options.upsample
    ksize = scaled_constants(model.card.mpp / factor).sobel_ksize
    lows: list[float] = []
    highs: list[float] = []
    for source in data:
        for image in read_labelled(source, mpp=mpp):
            if only and not image.name.startswith(tuple(only)):
                continue
            maps = predict_image_maps(model, image.image, image.mpp)
            _, hv, _ = upsample_maps(maps.arrays["np_prob"], maps.arrays["hv"], None, factor)
            low, high = edge_extremes(hv, ksize)
            lows.append(low)
            highs.append(high)
    if not lows:
        raise ValueError("no images to measure the edge range on")
    return float(np.median(lows)), float(np.median(highs))
