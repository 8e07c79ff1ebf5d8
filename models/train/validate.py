"""Held-out evaluation during training: predict whole items, and the headline numbers of a score.

Post-processing the predicted maps is the worker's (the card's family and options decide it), so
the scoring itself is injected: :func:`models.train.loop.run_training` takes a :data:`Validator`,
and ``hoverserve model train`` passes :func:`worker.evaluation.validation.validate_training`,
which post-processes through the family registry exactly as the exported model's card will.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from models.train.config import TrainConfig
from models.train.data import Item
from models.train.families import FAMILIES

__all__ = ["Validator", "predict_detections", "predict_maps", "predict_outputs", "summarise"]

logger = logging.getLogger(__name__)

Validator: TypeAlias = Callable[[nn.Module, Sequence[Item], TrainConfig], Mapping[str, float]]
"""Scores a network on held-out items as the run's card would post-process them: flat headline
numbers (:func:`summarise`'s keys), the higher the better."""

_CONTEXT = 16  # reflected context around an item, so its border pixels see (mirrored) neighbours
_STRIDE = 16


def _run_whole(
    model: nn.Module, image: NDArray[np.uint8], *, stride: int, device: torch.device | str
) -> tuple[dict[str, torch.Tensor], tuple[slice, slice]]:
    """The network's raw outputs on the reflect-padded image (sides multiples of ``stride``),
    and the window of the image's own pixels in them."""
    height, width = image.shape[:2]
    pad_rows = _CONTEXT + (-(height + 2 * _CONTEXT)) % stride
    pad_cols = _CONTEXT + (-(width + 2 * _CONTEXT)) % stride
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().to(device)
    tensor = F.pad(tensor, (_CONTEXT, pad_cols, _CONTEXT, pad_rows), mode="reflect")
    window = (slice(_CONTEXT, _CONTEXT + height), slice(_CONTEXT, _CONTEXT + width))
    return model(tensor), window


@torch.no_grad()
def predict_maps(
    model: nn.Module, image: NDArray[np.uint8], *, device: torch.device | str = "cpu"
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32] | None]:
    """Run a fully convolutional hover-family model (margin 0) on a whole image.

    Parameters
    ----------
    model : torch.nn.Module
        Network returning ``np``/``hv``/``tp`` logits at the input size.
    image : (H, W, 3) uint8 array
        RGB image.

    Returns
    -------
    tuple
        ``np_prob`` (H, W) float32, ``hv`` (2, H, W) float32, ``tp_prob`` (C, H, W) float32 or None.
    """
    out, (rows, cols) = _run_whole(model, image, stride=_STRIDE, device=device)
    window = np.s_[0, :, rows, cols]
    np_prob = torch.softmax(out["np"], dim=1)[window][1].cpu().numpy()
    hv = out["hv"][window].cpu().numpy()
    tp = torch.softmax(out["tp"], dim=1)[window].cpu().numpy() if "tp" in out else None
    return np_prob, hv, tp


@torch.no_grad()
def predict_outputs(
    model: nn.Module, image: NDArray[np.uint8], family: str, *, device: torch.device | str = "cpu"
) -> dict[str, NDArray[np.float32]]:
    """Run a fully convolutional model (margin 0) of any family on a whole image, as its exported
    graph would answer for one patch the image's size.

    Parameters
    ----------
    model : torch.nn.Module
        Network of ``family`` returning its raw logits at the input size.
    image : (H, W, 3) uint8 array
        RGB image.
    family : str
        The model family (:data:`models.train.families.FAMILIES`).

    Returns
    -------
    dict of str to ndarray
        The graph's outputs by name, each ``(1, C, H, W)`` float32 (hover: ``np_prob``, ``hv``,
        ``tp_prob`` when the network has a type head; boundary: ``sem_prob``, ``boundary_prob``).
        They are named by what the network returns, which ``family`` (the card's) only pads
        for: a network of another family answers under its own names, for the caller to refuse.
    """
    if family not in FAMILIES:
        raise ValueError(f"no training family {family!r} (known: {', '.join(FAMILIES)})")
    out, (rows, cols) = _run_whole(model, image, stride=FAMILIES[family].stride, device=device)
    found = [f for f in FAMILIES.values() if set(f.logits) <= set(out)]
    if not found:
        raise ValueError(f"the network returns {sorted(out)}, the logits of no model family")
    probs = found[0].probabilities(out)
    return {name: value[:, :, rows, cols].float().cpu().numpy() for name, value in probs.items()}


@torch.no_grad()
def predict_detections(
    model: nn.Module, image: NDArray[np.uint8], *, margin: int, multiple: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, NDArray]:
    """Run a detector (the ``instance`` family) on a whole image as its exported graph would on
    the image framed in white (what a slide job and ``hoverserve model evaluate`` give a
    whole-box family beyond an image's edge): ``margin`` pixels on each side, and below and
    right of it as many more as bring its sides to multiples of ``multiple``.

    Returns
    -------
    dict of str to ndarray
        The graph's outputs (:data:`models.panoptic.export.INSTANCE_OUTPUTS`): ``boxes`` (K, 4)
        in the framed image's pixels, ``scores`` (K,), ``classes`` (K,) int64 and ``masks``
        (K, 1, 28, 28), by descending score.
    """
    from models.panoptic.export import INSTANCE_OUTPUTS, InstanceHead

    rows, cols = (-image.shape[0]) % multiple, (-image.shape[1]) % multiple
    framed = np.pad(image, ((margin, margin + rows), (margin, margin + cols), (0, 0)), constant_values=255)
    tensor = torch.from_numpy(np.ascontiguousarray(framed)).permute(2, 0, 1)[None].float().to(device)
    outputs = InstanceHead(model)(tensor)
    return {name: value.cpu().numpy() for name, value in zip(INSTANCE_OUTPUTS, outputs, strict=True)}


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Flat headline numbers: ``<source>/pq`` (per-image mean), ``aji``, ``f1_d``, ``f_c/<class>``."""
    flat: dict[str, float] = {}
    for source, res in results.items():
        means = res["instance"]["per_image_mean"]
        flat[f"{source}/pq"] = _f(means["pq"])
        flat[f"{source}/aji"] = _f(means["aji"])
        flat[f"{source}/pq_pooled"] = _f(res["instance"]["pooled"]["pq"])
        flat[f"{source}/aji_pooled"] = _f(res["instance"]["pooled"]["aji"])
        flat[f"{source}/f1_d"] = _f(res["detection"]["f1"])
        if res["classes"]:
            f_c = {name: _f(c["f1"]) for name, c in res["classes"].items()}
            flat.update({f"{source}/f_c/{name}": value for name, value in f_c.items()})
            defined = [v for v in f_c.values() if not math.isnan(v)]
            flat[f"{source}/f_c_mean"] = float(np.mean(defined)) if defined else math.nan
    return flat


def _f(value: float | None) -> float:
    return math.nan if value is None else float(value)
