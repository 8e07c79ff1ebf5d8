"""Networks that look trained to the ONNX read-back tests: BatchNorms with non-trivial statistics."""

from __future__ import annotations

import torch

Range = tuple[float, float]


@torch.no_grad()
def perturb_batchnorms(
    module: torch.nn.Module,
    *,
    mean: Range = (-0.5, 0.5),
    var: Range = (0.5, 2.0),
    weight: Range = (0.5, 1.5),
    bias: Range = (-0.2, 0.2),
) -> None:
    """Draw every BatchNorm2d's running statistics and affine terms uniformly from the ranges, so
    that folding them into the convolutions is not the identity."""
    for norm in module.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.running_mean.uniform_(*mean)
            norm.running_var.uniform_(*var)
            norm.weight.uniform_(*weight)
            norm.bias.uniform_(*bias)
