"""The panoptic model family (Liu et al., IJCAI 2019): Mask R-CNN + semantic branch, ``instance`` cards.

One file per block: :mod:`~models.panoptic.backbone` (ResNet + FPN, anchors, no-resize input
transform), :mod:`~models.panoptic.mask_head` (dual-modal mask generator),
:mod:`~models.panoptic.semantic` (GCN decoder, mask feature fusion, semantic loss),
:mod:`~models.panoptic.targets` (targets from instance maps), :mod:`~models.panoptic.net`,
:mod:`~models.panoptic.builder` (named sizes) and :mod:`~models.panoptic.export` (ONNX, family
contract). Needs torchvision.

``panoptic-r18``: 9.4 M parameters, 8.4 M of them in the exported graph (the semantic branch
trains only): a 33.8 MB float32 ONNX file. One 256×256 tile with 81 detections: ~1.3 CPU-seconds
in ONNX Runtime, ~4.5 s in PyTorch eval (2 shared cores, loaded); the mask generator runs once per
detection, so time grows with the nuclei found (a random-weight network finding ~1700 boxes takes
~10 s).
"""

from models.panoptic.builder import BUILDERS, SIZES, build_panoptic_r18, build_panoptic_tiny
from models.panoptic.export import (
    INSTANCE_OUTPUTS,
    InstanceHead,
    check_instance_onnx,
    export_instance_onnx,
    reference_image,
)
from models.panoptic.net import LOSS_TERMS, LOSS_WEIGHTS, PanopticNet, total_loss
from models.panoptic.targets import instance_targets, semantic_classes

__all__ = [
    "BUILDERS",
    "INSTANCE_OUTPUTS",
    "LOSS_TERMS",
    "LOSS_WEIGHTS",
    "SIZES",
    "InstanceHead",
    "PanopticNet",
    "build_panoptic_r18",
    "build_panoptic_tiny",
    "check_instance_onnx",
    "export_instance_onnx",
    "instance_targets",
    "reference_image",
    "semantic_classes",
    "total_loss",
]
