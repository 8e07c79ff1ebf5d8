"""TSFD-Net losses (Ilyas et al. 2022, Table 3 and Table 6 row 6).

* tissue: focal loss on the softmax, ``mean(α (1 - exp(-BCE))^γ BCE)``, α = 0.3, γ = 5;
* semantic (softmax, C channels): focal Tversky + 0.4 · (weighted BCE + weighted Dice);
* boundary (sigmoid): focal Tversky + 0.4 · Combo.

Focal Tversky: ``(1 - T)^γ``, ``T = (TP + s) / (TP + α FP + β FN + s)`` with α = 0.3 (false
positives), β = 0.7 (false negatives), γ = 4/3, s = 1e-6, over all pixels and channels. Weighted
BCE and Dice: pixels whose 11×11 neighbourhood mean of the target lies in (0.005, 0.995) — near an
edge — weigh 3, the rest 1, normalised to a mean of 1; Dice uses squared weights and smooth 1.
Combo (Taghanaki et al. 2019): ``r · WCE + (1 - r) · (1 - Dice)`` with ``WCE = -mean(a t log p +
(1 - a)(1 - t) log(1 - p))``, a = 0.8, r = 0.5, Dice smooth 1 (the official code subtracts the Dice
instead of adding ``1 - Dice``: the same gradient, but never negative here).

These are the hyper-parameters of the official code (``scripts/losses.py``). Data sets without
classes train the foreground only: for those samples the softmax is collapsed to background vs
nucleus (``p_fg = 1 - p_bg``) before the semantic loss, and the gradient reaching the class logits
is spread evenly over them (``p_bg = sigmoid(z_0 - LSE(z_1..))`` with the log-sum-exp's gradient
replaced by the mean's), so their relative values — the class decision — are left alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TSFDLoss", "combo_loss", "edge_weights", "focal_loss", "focal_tversky_loss",
           "weighted_bce_dice_loss"]

_CLIP = 1e-7
SEMANTIC_AUX = 0.4
"""Weight of (BCE + Dice) beside the semantic focal Tversky loss, and of Combo beside the boundary's."""


def focal_tversky_loss(
    prob: Tensor, target: Tensor, *, alpha: float = 0.3, beta: float = 0.7, gamma: float = 4 / 3,
    smooth: float = 1e-6,
) -> Tensor:
    """Focal Tversky loss of probabilities against a same-shaped 0/1 target (all elements)."""
    tp = (prob * target).sum()
    fp = (prob * (1 - target)).sum()
    fn = ((1 - prob) * target).sum()
    tversky = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    return (1 - tversky).clamp_min(0) ** gamma


def edge_weights(target: Tensor, *, size: int = 11, edge_weight: float = 3.0) -> Tensor:
    """Per-pixel weights (N, C, H, W): ``edge_weight`` near target edges, 1 elsewhere, mean 1."""
    mean = F.avg_pool2d(target, size, stride=1, padding=size // 2, count_include_pad=False)
    edge = ((mean > 0.005) & (mean < 0.995)).to(target.dtype)
    weight = 1 + (edge_weight - 1) * edge
    return weight * (weight.numel() / weight.sum())


def weighted_bce_dice_loss(prob: Tensor, target: Tensor) -> Tensor:
    """Edge-weighted BCE plus edge-weighted (squared-weight) soft Dice, targets N×C×H×W 0/1."""
    weight = edge_weights(target)
    p = prob.clamp(_CLIP, 1 - _CLIP)
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    bce = (weight * bce).sum() / weight.sum()
    w2 = weight * weight
    overlap = (w2 * prob * target).sum()
    dice = (2 * overlap + 1) / ((w2 * target * target).sum() + (w2 * prob * prob).sum() + 1)
    return bce + 1 - dice


def combo_loss(prob: Tensor, target: Tensor, *, alpha: float = 0.8, ratio: float = 0.5) -> Tensor:
    """Combo loss: ``ratio`` · weighted cross-entropy + (1 - ``ratio``) · (1 - Dice)."""
    dice = (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    p = prob.clamp(_CLIP, 1 - _CLIP)
    wce = -(alpha * target * torch.log(p) + (1 - alpha) * (1 - target) * torch.log(1 - p)).mean()
    return ratio * wce + (1 - ratio) * (1 - dice)


def focal_loss(prob: Tensor, target: Tensor, *, alpha: float = 0.3, gamma: float = 5.0) -> Tensor:
    """Focal loss on probabilities (the official form: element-wise BCE, then the focal factor)."""
    p = prob.clamp(_CLIP, 1 - _CLIP)
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    return (alpha * (1 - torch.exp(-bce)) ** gamma * bce).mean()


def _semantic(prob: Tensor, target: Tensor) -> Tensor:
    onehot = F.one_hot(target, prob.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
    return focal_tversky_loss(prob, onehot) + SEMANTIC_AUX * weighted_bce_dice_loss(prob, onehot)


class TSFDLoss(torch.nn.Module):
    """Total TSFD-Net loss: the weighted sum of the tissue, semantic and boundary terms.

    Parameters
    ----------
    weights : mapping of str to float, optional
        Weight per term (keys of :attr:`TERMS`; a missing term weighs 0). Default: all 1, as the
        official code.
    """

    TERMS = ("tissue", "semantic", "boundary")

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if weights is None:
            weights = dict.fromkeys(self.TERMS, 1.0)
        unknown = set(weights) - set(self.TERMS)
        if unknown:
            raise ValueError(f"unknown TSFD-Net loss terms {sorted(unknown)}; a boundary model's "
                             f"loss.weights takes {list(self.TERMS)}")
        self.weights = {term: float(weights.get(term, 0.0)) for term in self.TERMS}

    def forward(
        self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, float]]:
        """Total loss and each term's value.

        ``outputs``: ``sem`` (N, C, H, W) and ``boundary`` (N, 1, H, W) logits, optionally
        ``tissue`` (N, T) logits. ``batch``: ``sem`` (N, H, W) int64 classes (0 background),
        ``boundary`` (N, H, W) 0/1, ``typed`` (N,) bool, and optionally ``tissue`` (N,) int64
        (-1 where the tissue is unknown).
        """
        terms = {"semantic": self._semantic(outputs["sem"], batch["sem"], batch["typed"])}
        bnd_prob = torch.sigmoid(outputs["boundary"])
        bnd_target = batch["boundary"].unsqueeze(1).to(bnd_prob.dtype)
        terms["boundary"] = (focal_tversky_loss(bnd_prob, bnd_target)
                             + SEMANTIC_AUX * combo_loss(bnd_prob, bnd_target))
        if "tissue" in outputs and "tissue" in batch:
            terms["tissue"] = self._tissue(outputs["tissue"], batch["tissue"])
        total = sum((self.weights[k] * v for k, v in terms.items()),
                    start=torch.zeros((), device=bnd_prob.device))
        return total, {k: float(v.detach()) for k, v in terms.items()}

    @staticmethod
    def _semantic(logits: Tensor, target: Tensor, typed: Tensor) -> Tensor:
        typed = typed.to(torch.bool)
        n = logits.shape[0]
        loss = logits.sum() * 0.0  # keeps every head in the graph when a subset is empty
        if bool(typed.any()):
            prob = torch.softmax(logits[typed], dim=1)
            loss = loss + _semantic(prob, target[typed]) * (int(typed.sum()) / n)
        untyped = ~typed
        if bool(untyped.any()):
            z = logits[untyped]
            classes = z[:, 1:]
            # value of logsumexp, gradient of the mean: equal pushes on every class logit
            lse = (torch.logsumexp(classes.detach(), dim=1, keepdim=True)
                   + (classes - classes.detach()).mean(dim=1, keepdim=True))
            bg = torch.sigmoid(z[:, :1] - lse)
            collapsed = torch.cat([bg, 1 - bg], dim=1)
            loss = loss + _semantic(collapsed, (target[untyped] > 0).long()) * (int(untyped.sum()) / n)
        return loss

    @staticmethod
    def _tissue(logits: Tensor, labels: Tensor) -> Tensor:
        known = labels >= 0
        if not bool(known.any()):
            return logits.sum() * 0.0
        prob = torch.softmax(logits[known], dim=1)
        onehot = F.one_hot(labels[known], logits.shape[1]).to(prob.dtype)
        return focal_loss(prob, onehot)
