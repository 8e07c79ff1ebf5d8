"""The dual-modal mask generator of Liu et al. (IJCAI 2019) and the RoIAlign that feeds it.

The paper's Table 1 was not available to this implementation; the generator follows the
PANet design the paper builds on (Liu et al., CVPR 2018, "adaptive feature pooling / fully
connected fusion"), which is what "a convolutional path and a fully connected path fused"
describes:

- convolutional path: four 3×3 convolutions (``width`` channels, ReLU) on the 14×14 RoI
  features, a stride-2 2×2 deconvolution to 28×28, a 1×1 convolution to one logit map per class;
- fully connected path: from the third convolution, two 3×3 convolutions (``width``, then
  ``fc_channels``: PANet halves the channels here to keep the fc small), flattened, one fully
  connected layer to 28·28 = 784 logits, reshaped to 28×28 and added to every class's map.

The fc path sees the whole RoI at once (location-sensitive, class-agnostic) while the
convolutional path shares weights across positions; their sum is the M×M mask logits (M = 28)
that torchvision's :class:`~torchvision.models.detection.roi_heads.RoIHeads` trains with its
mask loss and turns into probabilities of the box's class at inference.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

__all__ = ["MASK_SIZE", "DualModalMaskGenerator", "RecordingRoIAlign"]

MASK_SIZE = 28
"""Side of the mask logits, M (RoI features are pooled at M / 2 = 14)."""

_POOLED = MASK_SIZE // 2


def _conv_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True))


class DualModalMaskGenerator(nn.Module):
    """RoI features (P, C, 14, 14) → mask logits (P, num_classes, 28, 28).

    Used as torchvision's ``mask_predictor`` with an identity ``mask_head``: the fc path
    branches from inside the convolution stack, so the stack lives here.

    Parameters
    ----------
    in_channels : int
        Channels of the pooled RoI features (the FPN width).
    num_classes : int
        Box-head classes including background (channel 0 is never trained, as in torchvision).
    width : int
        Channels of the convolutions.
    fc_channels : int
        Channels of the fc path's last convolution; the fc layer has ``fc_channels·14²·784``
        weights, the generator's largest block.

    Attributes
    ----------
    last_logits : Tensor or None
        In training mode, the logits of the latest call (read by the semantic feature fusion).
    """

    last_logits: Tensor | None

    def __init__(
        self, in_channels: int, num_classes: int, *, width: int = 128, fc_channels: int = 16
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must count background and at least one class, got {num_classes}")
        self.convs = nn.Sequential(*[_conv_relu(in_channels if i == 0 else width, width) for i in range(3)])
        self.conv4 = _conv_relu(width, width)
        self.deconv = nn.Sequential(nn.ConvTranspose2d(width, width, 2, stride=2), nn.ReLU(inplace=True))
        self.logits = nn.Conv2d(width, num_classes, 1)
        self.fc_convs = nn.Sequential(_conv_relu(width, width), _conv_relu(width, fc_channels))
        self.fc = nn.Linear(fc_channels * _POOLED * _POOLED, MASK_SIZE * MASK_SIZE)
        self.last_logits = None
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        conv3 = self.convs(x)
        conv_path = self.logits(self.deconv(self.conv4(conv3)))
        fc_path = self.fc(self.fc_convs(conv3).flatten(1)).view(-1, 1, MASK_SIZE, MASK_SIZE)
        logits = conv_path + fc_path
        self.last_logits = logits if self.training else None
        return logits


class RecordingRoIAlign(MultiScaleRoIAlign):
    """torchvision's multi-level RoIAlign that, in training, keeps the boxes it pooled.

    RoIHeads does not return the positive proposals its mask branch ran on; the semantic
    feature fusion needs them to paste the predicted masks back into the image.

    Attributes
    ----------
    last_boxes : list of Tensor or None
        Per image (K_i, 4) boxes of the latest call in training mode, in padded-input pixels.
    """

    last_boxes: list[Tensor] | None

    def __init__(self, featmap_names: list[str]) -> None:
        super().__init__(featmap_names=featmap_names, output_size=_POOLED, sampling_ratio=2)
        self.last_boxes = None

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        self.last_boxes = list(boxes) if self.training else None
        return super().forward(x, boxes, image_shapes)
