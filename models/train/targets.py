"""Training targets derived from instance maps: nucleus mask and HoVer horizontal/vertical maps."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

__all__ = ["hv_targets"]


def hv_targets(inst: NDArray[np.integer]) -> NDArray[np.float32]:
    """Horizontal and vertical distance maps of every nucleus to its centre of mass.

    Inside each nucleus, the horizontal map is the column offset from the nucleus' centre of mass
    and the vertical map the row offset, each scaled separately on either side of the centre so
    that the nucleus spans exactly -1..1 (negative left of / above the centre, positive right of /
    below it). Background is 0.

    Parameters
    ----------
    inst : (H, W) integer array
        Instance map, 0 background; ids need not be contiguous.

    Returns
    -------
    (2, H, W) float32 array
        Channel 0 horizontal (x), channel 1 vertical (y), values in [-1, 1].
    """
    if not isinstance(inst, np.ndarray) or inst.ndim != 2 or not np.issubdtype(inst.dtype, np.integer):
        raise TypeError(f"inst must be a 2-D integer array, got {getattr(inst, 'shape', type(inst))}")
    out = np.zeros((2, *inst.shape), dtype=np.float32)
    for label, box in enumerate(ndi.find_objects(inst), start=1):
        if box is None:
            continue
        rows, cols = np.nonzero(inst[box] == label)
        for channel, coords in ((0, cols), (1, rows)):
            offsets = coords - coords.mean()
            out[channel][box][rows, cols] = _scale_sides(offsets)
    return out


def _scale_sides(offsets: NDArray[np.float64]) -> NDArray[np.float32]:
    # negative and positive sides are scaled independently, as HoVer-Net does: a nucleus cut by
    # the patch border still reaches -1 or 1 on its visible side
    scaled = offsets.copy()
    negative = offsets < 0
    if negative.any():
        scaled[negative] /= -offsets[negative].min()
    positive = offsets > 0
    if positive.any():
        scaled[positive] /= offsets[positive].max()
    return scaled.astype(np.float32)
