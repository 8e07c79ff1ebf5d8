"""Held-out evaluation during and after training: predict whole items, post-process, score."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from models.train.data import Item

__all__ = ["evaluate_items", "predict_maps", "summarise"]

logger = logging.getLogger(__name__)

_CONTEXT = 16  # reflected context around an item, so its border pixels see (mirrored) neighbours
_STRIDE = 16


@torch.no_grad()
def predict_maps(
    model: nn.Module, image: NDArray[np.uint8], *, device: torch.device | str = "cpu"
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32] | None]:
    """Run a fully convolutional model (margin 0) on a whole image.

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
    height, width = image.shape[:2]
    pad_rows = _CONTEXT + (-(height + 2 * _CONTEXT)) % _STRIDE
    pad_cols = _CONTEXT + (-(width + 2 * _CONTEXT)) % _STRIDE
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().to(device)
    tensor = F.pad(tensor, (_CONTEXT, pad_cols, _CONTEXT, pad_rows), mode="reflect")
    out = model(tensor)
    window = np.s_[0, :, _CONTEXT : _CONTEXT + height, _CONTEXT : _CONTEXT + width]
    np_prob = torch.softmax(out["np"], dim=1)[window][1].cpu().numpy()
    hv = out["hv"][window].cpu().numpy()
    tp = torch.softmax(out["tp"], dim=1)[window].cpu().numpy() if "tp" in out else None
    return np_prob, hv, tp


def evaluate_items(
    model: nn.Module,
    items: Sequence[Item],
    *,
    class_names: Sequence[str] | None,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` on held-out items, one result per source (see :func:`summarise`)."""
    from models.evaluate import evaluate_dataset, radius_for_mpp
    from worker.postprocess import hover_instances

    was_training = model.training
    model.eval()
    results: dict[str, dict[str, Any]] = {}
    try:
        for source in sorted({item.source for item in items}):
            chosen = [item for item in items if item.source == source]
            typed = all(item.typed for item in chosen) and class_names is not None
            pairs = []
            for item in chosen:
                np_prob, hv, tp = predict_maps(model, item.image, device=device)
                found = hover_instances(np_prob, hv, tp if typed else None, mpp=item.mpp)
                pred_types = {n.label: n.type for n in found.nuclei} if typed else None
                pairs.append((found.labels, pred_types, item.inst, item.types if typed else None))
            results[source] = evaluate_dataset(
                pairs,
                radius=radius_for_mpp(chosen[0].mpp),
                class_names=class_names if typed else None,
                image_names=[item.name for item in chosen],
            )
    finally:
        model.train(was_training)
    return results


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
