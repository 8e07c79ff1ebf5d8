"""HoVer-Net losses: NP cross-entropy + Dice, HV MSE + gradient MSE, NC weighted cross-entropy + Dice.

The type loss is masked per sample: patches from datasets without classes (CPM-15, MoNuSeg) give
no type loss at all, rather than teaching the network that their nuclei are background.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = ["HoverLoss", "dice_loss", "gradient_mse", "sobel_kernels"]

_EPS = 1e-3


def sobel_kernels(size: int = 5, *, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised Sobel-like kernels (d/dx, d/dy) of odd ``size``, as HoVer-Net uses on HV maps.

    Returns
    -------
    tuple of (size, size) float32 tensors
        Horizontal-derivative kernel, vertical-derivative kernel.
    """
    if size < 3 or size % 2 == 0:
        raise ValueError(f"size must be an odd integer >= 3, got {size}")
    half = size // 2
    coords = torch.arange(-half, half + 1, dtype=torch.float32, device=device)
    cols = coords.view(1, -1).expand(size, size)
    rows = coords.view(-1, 1).expand(size, size)
    # offset divided by squared distance: the classic 3x3 Sobel pattern extended to larger sizes
    denom = cols * cols + rows * rows
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    return cols / denom, rows / denom


def _gradients(hv: torch.Tensor, size: int) -> torch.Tensor:
    kx, ky = sobel_kernels(size, device=hv.device)
    # d(x-map)/dx and d(y-map)/dy, the two derivatives that sharpen at nucleus boundaries
    weight = torch.stack([kx, ky]).unsqueeze(1).to(hv.dtype)
    return F.conv2d(hv, weight, padding=size // 2, groups=2)


def gradient_mse(
    pred_hv: torch.Tensor, true_hv: torch.Tensor, focus: torch.Tensor, *, size: int = 5
) -> torch.Tensor:
    """Mean squared error of the HV maps' Sobel gradients, over the nucleus pixels only.

    Parameters
    ----------
    pred_hv, true_hv : (N, 2, H, W) tensor
        Predicted and target horizontal/vertical maps.
    focus : (N, H, W) tensor
        1 on nucleus pixels, 0 elsewhere.
    """
    diff = (_gradients(pred_hv, size) - _gradients(true_hv, size)) ** 2
    weight = focus.unsqueeze(1).to(diff.dtype)
    return (diff * weight).sum() / (2.0 * weight.sum() + _EPS)


def dice_loss(
    prob: torch.Tensor, onehot: torch.Tensor, *, sample_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft Dice loss summed over channels (HoVer-Net's form: 1 - 2|PT| / (|P| + |T|) per channel).

    Parameters
    ----------
    prob, onehot : (N, C, H, W) tensor
        Probabilities and one-hot targets.
    sample_weight : (N,) tensor, optional
        0/1 per sample; samples with weight 0 do not take part.
    """
    if sample_weight is not None:
        w = sample_weight.view(-1, 1, 1, 1).to(prob.dtype)
        prob, onehot = prob * w, onehot * w
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    total = prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return (1.0 - (2.0 * inter + _EPS) / (total + _EPS)).sum()


class HoverLoss(torch.nn.Module):
    """Weighted sum of the HoVer-Net loss terms.

    Parameters
    ----------
    weights : mapping of str to float
        Term weights; keys ``np_ce``, ``np_dice``, ``hv_mse``, ``hv_msge``, ``tp_ce``, ``tp_dice``.
    class_weights : sequence of float, optional
        Per-class cross-entropy weights of the type head (background first).
    """

    class_weights: torch.Tensor | None
    TERMS = ("np_ce", "np_dice", "hv_mse", "hv_msge", "tp_ce", "tp_dice")

    def __init__(self, weights: Mapping[str, float], *, class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        unknown = set(weights) - set(self.TERMS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {self.TERMS}")
        self.weights = {term: float(weights.get(term, 0.0)) for term in self.TERMS}
        cw = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", cw, persistent=False)

    def forward(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and the value of every term.

        ``batch`` holds ``np`` (N, H, W) int64 0/1, ``hv`` (N, 2, H, W) float, and for the type
        head ``tp`` (N, H, W) int64 and ``typed`` (N,) bool.
        """
        terms = self._np_terms(outputs["np"], batch["np"])
        terms["hv_mse"] = F.mse_loss(outputs["hv"], batch["hv"])
        terms["hv_msge"] = gradient_mse(outputs["hv"], batch["hv"], batch["np"])
        if "tp" in outputs and "tp" in batch:
            terms.update(self._tp_terms(outputs["tp"], batch["tp"], batch["typed"]))
        total = sum((self.weights[k] * v for k, v in terms.items()), start=torch.zeros(()))
        return total, {k: float(v.detach()) for k, v in terms.items()}

    @staticmethod
    def _np_terms(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        onehot = F.one_hot(target, 2).permute(0, 3, 1, 2).to(logits.dtype)
        return {
            "np_ce": F.cross_entropy(logits, target),
            "np_dice": dice_loss(torch.softmax(logits, dim=1), onehot),
        }

    def _tp_terms(
        self, logits: torch.Tensor, target: torch.Tensor, typed: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if not bool(typed.any()):
            zero = logits.sum() * 0.0  # keeps the graph connected so every parameter gets a gradient
            return {"tp_ce": zero, "tp_dice": zero}
        weight = self.class_weights.to(logits.device) if self.class_weights is not None else None
        ce = F.cross_entropy(logits[typed], target[typed], weight=weight)
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
        dice = dice_loss(torch.softmax(logits, dim=1), onehot, sample_weight=typed)
        return {"tp_ce": ce, "tp_dice": dice}
