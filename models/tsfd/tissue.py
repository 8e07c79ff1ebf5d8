"""Tissue-classifier module at the last backbone level (TSFD-Net's tissue-specific distillation).

Global average pooling, dropout and one linear layer over the coarsest gated level, predicting the
tissue of the patch (19 PanNuke tissues in the paper). Trained only where tissue labels exist: with
``n_tissues = 0`` the module is absent and the network returns no ``"tissue"`` output.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["TissueClassifier"]


class TissueClassifier(nn.Module):
    """Patch-level tissue logits (N × n_tissues) from an N×C×h×w feature map.

    Parameters
    ----------
    channels : int
        Channels of the feature map.
    n_tissues : int
        Number of tissue classes (>= 2).
    dropout : float
        Dropout before the linear layer (0.3 in the official code).
    """

    def __init__(self, channels: int, n_tissues: int, *, dropout: float = 0.3) -> None:
        super().__init__()
        if n_tissues < 2:
            raise ValueError(f"n_tissues must be >= 2 (0 means no classifier), got {n_tissues}")
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(channels, n_tissues)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.dropout(x.mean(dim=(2, 3))))
