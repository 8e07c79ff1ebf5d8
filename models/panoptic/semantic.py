"""The semantic branch: a GCN-style large-kernel decoder, the mask feature fusion, its loss.

Decoder (after Peng et al., CVPR 2017, "Large Kernel Matters", the decoder Liu et al. use): on
each FPN level (strides 4, 8, 16, 32) a global convolution network block — the sum of a k×1 then
1×k and a 1×k then k×1 separable large-kernel convolution — and a boundary refinement block (a
residual 3×3–ReLU–3×3); then from the coarsest level down, upsample ×2 and sum with the next
finer level, refine again. The result is a stride-4 feature map.

Feature fusion (the instance prediction back into the semantic map): the mask branch's
foreground probabilities of the training RoIs are pasted into the image frame at stride 4,
through each RoI's box (a bilinear sampling grid: differentiable), and combined by maximum
over RoIs into one map. That map joins the decoder features as one more channel before the
last refinement and the 1×1 classifier, so the semantic loss also trains the mask generator:
the simplest faithful reading of "fusing the instance masks into the semantic features" the
paper's text allows (no further detail was available to this implementation). The branch runs
in training only: inference uses the instance branch, as the paper does.

Loss: pixel-wise cross-entropy of the logits upsampled to input resolution against the class
map (0 background; per nucleus class when typed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BoundaryRefinement", "GlobalConv", "SemanticBranch", "paste_masks", "semantic_loss"]


class GlobalConv(nn.Module):
    """GCN block: (k×1 → 1×k) + (1×k → k×1), no nonlinearity in between (as Peng et al.)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int) -> None:
        super().__init__()
        if kernel < 3 or kernel % 2 == 0:
            raise ValueError(f"kernel must be odd and >= 3, got {kernel}")
        pad = kernel // 2
        self.left = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, (kernel, 1), padding=(pad, 0)),
            nn.Conv2d(out_channels, out_channels, (1, kernel), padding=(0, pad)),
        )
        self.right = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, (1, kernel), padding=(0, pad)),
            nn.Conv2d(out_channels, out_channels, (kernel, 1), padding=(pad, 0)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.left(x) + self.right(x)


class BoundaryRefinement(nn.Module):
    """Residual refinement: ``x + conv(relu(conv(x)))`` with 3×3 convolutions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class SemanticBranch(nn.Module):
    """FPN levels (finest first) + fused instance map → semantic logits at stride 4.

    Parameters
    ----------
    in_channels : int
        FPN width.
    n_levels : int
        FPN levels used, finest (stride 4) first.
    num_classes : int
        Semantic classes, background included.
    width : int
        Decoder channels.
    kernel : int
        Large-kernel size k of every GCN block.
    """

    def __init__(self, in_channels: int, n_levels: int, num_classes: int, *, width: int = 64,
                 kernel: int = 7) -> None:
        super().__init__()
        if n_levels < 1:
            raise ValueError(f"n_levels must be >= 1, got {n_levels}")
        self.gcn = nn.ModuleList(GlobalConv(in_channels, width, kernel) for _ in range(n_levels))
        self.refine = nn.ModuleList(BoundaryRefinement(width) for _ in range(n_levels))
        self.merge = nn.ModuleList(BoundaryRefinement(width) for _ in range(n_levels - 1))
        self.fuse = nn.Sequential(nn.Conv2d(width + 1, width, 3, padding=1), nn.ReLU(inplace=True),
                                  BoundaryRefinement(width))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, levels: list[Tensor], instance_map: Tensor) -> Tensor:
        """Semantic logits (N, num_classes, h, w) at the finest level's size.

        ``instance_map`` is (N, 1, h, w) foreground probability from :func:`paste_masks`.
        """
        if len(levels) != len(self.gcn):
            raise ValueError(f"expected {len(self.gcn)} feature levels, got {len(levels)}")
        maps = [refine(gcn(x)) for gcn, refine, x in zip(self.gcn, self.refine, levels, strict=True)]
        x = maps[-1]
        for finer, merge in zip(reversed(maps[:-1]), reversed(list(self.merge)), strict=True):
            x = merge(finer + F.interpolate(x, size=finer.shape[-2:], mode="bilinear", align_corners=False))
        return self.classifier(self.fuse(torch.cat([x, instance_map], dim=1)))


def paste_masks(boxes: list[Tensor], masks: Tensor, size: tuple[int, int], stride: int) -> Tensor:
    """Paste box-relative mask probabilities into image-frame maps, maximum over boxes.

    Parameters
    ----------
    boxes : list of Tensor
        Per image (K_i, 4) x0, y0, x1, y1 in input pixels; ``sum(K_i) == len(masks)``.
    masks : Tensor
        (sum K_i, M, M) probabilities, each over its box.
    size : tuple of int
        (h, w) of the output map.
    stride : int
        Input pixels per output cell.

    Returns
    -------
    Tensor
        (N, 1, h, w): each cell the largest probability of any box covering its centre (0 where
        none does); differentiable in ``masks``.
    """
    if sum(len(b) for b in boxes) != len(masks):
        raise ValueError(f"{sum(len(b) for b in boxes)} boxes but {len(masks)} masks")
    h, w = size
    out = masks.new_zeros((len(boxes), 1, h, w))
    ys = (torch.arange(h, device=masks.device, dtype=masks.dtype) + 0.5) * stride
    xs = (torch.arange(w, device=masks.device, dtype=masks.dtype) + 0.5) * stride
    start = 0
    for index, image_boxes in enumerate(boxes):
        count = len(image_boxes)
        if count == 0:
            continue
        b = image_boxes.to(masks.dtype)
        widths = (b[:, 2] - b[:, 0]).clamp(min=1e-3)
        heights = (b[:, 3] - b[:, 1]).clamp(min=1e-3)
        # grid_sample's (-1, 1) spans the mask's outer edges (align_corners=False), like RoIAlign's bins
        gx = (xs[None] - b[:, 0:1]) / widths[:, None] * 2 - 1  # (K, w)
        gy = (ys[None] - b[:, 1:2]) / heights[:, None] * 2 - 1  # (K, h)
        grid = torch.stack([gx[:, None, :].expand(count, h, w), gy[:, :, None].expand(count, h, w)], dim=-1)
        pasted = F.grid_sample(masks[start:start + count, None], grid, mode="bilinear",
                               padding_mode="zeros", align_corners=False)
        out[index] = pasted.amax(dim=0)
        start += count
    return out


def semantic_loss(logits: Tensor, target: Tensor, stride: int) -> Tensor:
    """Cross-entropy of stride-``stride`` ``logits`` (N, C, h, w), upsampled, against ``target``.

    ``target`` (N, H, W) holds class indices; the logits cover the padded input, of which the
    target is the top-left (H, W) part.
    """
    if target.dim() != 3:
        raise ValueError(f"target must be (N, H, W), got shape {tuple(target.shape)}")
    height, width = target.shape[-2:]
    padded = (logits.shape[-2] * stride, logits.shape[-1] * stride)
    if padded[0] < height or padded[1] < width:
        raise ValueError(f"logits cover {padded} pixels, less than the target's {(height, width)}")
    full = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
    return F.cross_entropy(full[..., :height, :width], target.long())
