"""Give a random HoVer-Net ``fast`` checkpoint output heads fitted to real annotations.

A checkpoint of random weights costs the network exactly what a trained one costs, but its maps
are noise: its nucleus probability is never or always above 0.5, so post-processing has nothing
or everything to do. Training HoVer-Net on two CPU cores is out of reach, so this keeps every
random weight except the three last 1×1 convolutions (``decoder.{np,hv,tp}.u0.conv``, the
heads, 0.03 % of the weights) and fits those by logistic / least-squares regression on the
random network's own 64-channel features of annotated CoNSeP patches
(``shared/data/nuclei/consep_patches_train.npz``, 0.25 µm/px): ``np`` to the nucleus mask,
``hv`` to the exact HoVer-Net distance maps (0 outside nuclei), ``tp`` to the CoNSeP classes placed on PanNuke
slots (epithelial → 1 neoplastic, inflammatory → 2, spindle → 3 connective, other → 5
non-neoplastic epithelial; slot 4 never predicted). What comes out is a linear read-out of
random features, nowhere near a trained model, but its maps have nucleus-sized blobs where the
tissue has dark nuclei, so both pipelines' post-processing sees a plausible density of instances.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ``models`` when run as a script
sys.path.insert(0, str(ROOT / "bench"))  # ``make_maps``
PATCHES = ROOT / ".." / "shared" / "data" / "nuclei" / "consep_patches_train.npz"

__all__ = ["PANNUKE_SLOT", "fit_heads"]

logger = logging.getLogger(__name__)

PANNUKE_SLOT = np.array([0, 5, 2, 1, 3], dtype=np.int64)
"""CoNSeP class (0 background, 1 other, 2 inflammatory, 3 epithelial, 4 spindle) → PanNuke slot."""

_CROP = (256 - 164) // 2  # fast mode: the 164² output is centred on the 256² input


def _features(state: dict[str, Any], images: NDArray[np.uint8]) -> dict[str, NDArray[np.float32]]:
    """Each branch's input to its head (after the last BN-ReLU), N×64×164×164."""
    import torch

    from models.hovernet.builder import hovernet_fast

    net = hovernet_fast(6)
    net.load_state_dict(state, strict=True)
    net.eval()
    captured: dict[str, list[NDArray[np.float32]]] = {"np": [], "hv": [], "tp": []}
    branches: Any = net.decoder
    hooks = [branches[name].u0.relu.register_forward_hook(
        lambda _m, _i, out, name=name: captured[name].append(out.numpy().copy()))
        for name in captured]
    with torch.no_grad():
        for start in range(0, len(images), 4):
            batch = torch.from_numpy(images[start:start + 4].transpose(0, 3, 1, 2).astype(np.float32))
            net(batch)
    for hook in hooks:
        hook.remove()
    return {name: np.concatenate(parts) for name, parts in captured.items()}


def _pixels(features: NDArray[np.float32], index: NDArray[np.intp]) -> NDArray[np.float32]:
    """(K, 64) feature rows of the flat pixel indices ``index`` (over N×164×164)."""
    return np.moveaxis(features, 1, -1).reshape(-1, features.shape[1])[index]


def _fit_linear(x: NDArray[np.float32], target: NDArray, *, classes: int | None,
                steps: int = 60) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Weights (C, 64) and bias (C,) of a softmax (``classes``) or least-squares read-out."""
    import torch

    inputs = torch.from_numpy(x)
    mean, std = inputs.mean(0), inputs.std(0) + 1e-6
    z = (inputs - mean) / std  # standardised for a well-conditioned fit, undone below
    out = classes if classes is not None else target.shape[1]
    weight = torch.zeros(out, z.shape[1], requires_grad=True)
    bias = torch.zeros(out, requires_grad=True)
    goal = torch.from_numpy(target)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        pred = z @ weight.T + bias
        if classes is not None:
            value = torch.nn.functional.cross_entropy(pred, goal)
        else:
            value = torch.mean((pred - goal) ** 2)
        value = value + 1e-4 * torch.sum(weight ** 2)
        value.backward()
        return value

    optimiser.step(loss)
    with torch.no_grad():
        w = weight / std
        b = bias - (weight * (mean / std)).sum(1)
    return w.numpy().astype(np.float32), b.numpy().astype(np.float32)


def fit_heads(state: dict[str, Any], *, patches: int = 24, pixels_per_patch: int = 3000,
              seed: int = 0, source: Path = PATCHES) -> dict[str, Any]:
    """A copy of the official-format ``fast`` PanNuke ``state`` with fitted heads.

    Parameters
    ----------
    state : dict
        Official-format state_dict (6 types).
    patches : int
        Annotated 256² patches to fit on (every fifth of the file's, from its start).
    pixels_per_patch : int
        Output pixels sampled per patch for the fit.
    seed : int
        Seed of the pixel sampling.
    source : Path
        The CoNSeP patches file.

    Returns
    -------
    dict
        The state_dict with ``decoder.{np,hv,tp}.u0.conv.{weight,bias}`` replaced.
    """
    import torch
    from make_maps import hv_targets

    if patches < 1:
        raise ValueError(f"patches must be >= 1, got {patches}")
    data = np.load(source)
    pick = np.arange(0, len(data["images"]), 5)[:patches]
    images = data["images"][pick]
    inst = data["inst"][pick][:, _CROP:-_CROP, _CROP:-_CROP]
    kinds = data["type_map"][pick][:, _CROP:-_CROP, _CROP:-_CROP]
    features = _features(state, images)
    rng = np.random.default_rng(seed)
    per = inst[0].size
    index = np.concatenate([i * per + rng.choice(per, pixels_per_patch, replace=False)
                            for i in range(len(pick))])
    foreground = (inst.reshape(-1)[index] > 0).astype(np.int64)
    hv = np.stack([hv_targets(m) for m in inst])  # N×2×164×164
    hv_rows = np.moveaxis(hv, 1, -1).reshape(-1, 2)[index].astype(np.float32)
    type_rows = PANNUKE_SLOT[np.clip(kinds.reshape(-1)[index], 0, 4)]
    out = dict(state)
    w, b = _fit_linear(_pixels(features["np"], index), foreground, classes=2)
    out["decoder.np.u0.conv.weight"] = torch.from_numpy(w[:, :, None, None].copy())
    out["decoder.np.u0.conv.bias"] = torch.from_numpy(b)
    # Fitted on every pixel (the target is 0 outside nuclei) so that the background stays near 0:
    # both post-processings min-max normalise hv over the region, outliers there would flatten it.
    w, b = _fit_linear(_pixels(features["hv"], index), hv_rows, classes=None)
    out["decoder.hv.u0.conv.weight"] = torch.from_numpy(w[:, :, None, None].copy())
    out["decoder.hv.u0.conv.bias"] = torch.from_numpy(b)
    w, b = _fit_linear(_pixels(features["tp"], index), type_rows, classes=6)
    out["decoder.tp.u0.conv.weight"] = torch.from_numpy(w[:, :, None, None].copy())
    out["decoder.tp.u0.conv.bias"] = torch.from_numpy(b)
    logger.info("fitted heads on %d patches, %d pixels (%.0f %% nucleus)", len(pick), len(index),
                100 * foreground.mean())
    return out
