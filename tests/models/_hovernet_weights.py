"""Official HoVer-Net state-dict shapes (from ../shared/docs) and random weights of those shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

DOCS = Path(__file__).resolve().parents[2] / ".." / "shared" / "docs"


def manifest(mode: str, *, typed: bool = True) -> dict[str, list[int]]:
    """Key → shape of an official ``fast`` or ``original`` checkpoint (without the NC branch when
    not ``typed``)."""
    shapes = json.loads((DOCS / f"hovernet_official_keys_{mode}.json").read_text())
    return {k: v for k, v in shapes.items() if typed or not k.startswith("decoder.tp.")}


def random_state_dict(shapes: dict[str, list[int]], *, seed: int) -> dict[str, Tensor]:
    """Random weights in a range where activations neither vanish nor explode."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0)
        elif key.endswith("unpool_mat"):
            out[key] = torch.ones(shape)
        elif len(shape) == 4:  # conv kernel: unit gain for its fan-in
            out[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith(("running_var", ".weight")):  # BN scale and variance: positive, ~1
            out[key] = 0.5 + torch.rand(shape, generator=gen)
        else:  # BN shift and mean, conv bias
            out[key] = 0.1 * torch.randn(shape, generator=gen)
    return out
