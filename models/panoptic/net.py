"""The panoptic network of Liu et al. (IJCAI 2019): Mask R-CNN + a jointly trained semantic branch.

Instance branch (torchvision's detection components, configured for nuclei): ResNet + FPN
(:mod:`~models.panoptic.backbone`), region proposal network, multi-level RoIAlign, a two-layer
box head, and the dual-modal mask generator (:mod:`~models.panoptic.mask_head`). Semantic
branch: a GCN decoder on the FPN levels with the instance masks fused in
(:mod:`~models.panoptic.semantic`), trained only.

Training (``model.train()``): ``model(image, targets)`` → the loss terms. Total loss =
``rpn_objectness + rpn_box + box_class + box_reg + mask + semantic``, each weighted 1 by default
(:data:`LOSS_WEIGHTS`): the paper sums Mask R-CNN's terms and its semantic cross-entropy; its
weights were not available to this implementation and Mask R-CNN weighs its terms equally.
Inference (``model.eval()``): ``model(image)`` → per image the detections of the instance branch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign

from models.panoptic.backbone import NoResizeTransform, anchor_generator, build_backbone
from models.panoptic.mask_head import DualModalMaskGenerator, RecordingRoIAlign
from models.panoptic.semantic import SemanticBranch, paste_masks, semantic_loss
from models.panoptic.targets import semantic_classes

__all__ = ["LOSS_TERMS", "LOSS_WEIGHTS", "PanopticNet", "total_loss"]

LOSS_TERMS = ("rpn_objectness", "rpn_box", "box_class", "box_reg", "mask", "semantic")
"""Names of the loss terms :meth:`PanopticNet.forward` returns in training mode."""

LOSS_WEIGHTS: dict[str, float] = dict.fromkeys(LOSS_TERMS, 1.0)
"""Default weight of every term in the total loss."""

_TORCHVISION_TERMS = {"loss_objectness": "rpn_objectness", "loss_rpn_box_reg": "rpn_box",
                      "loss_classifier": "box_class", "loss_box_reg": "box_reg", "loss_mask": "mask"}
_SEMANTIC_STRIDE = 4


def total_loss(terms: Mapping[str, Tensor], weights: Mapping[str, float] | None = None) -> Tensor:
    """The weighted sum of the loss terms (``weights`` default :data:`LOSS_WEIGHTS`; unknown keys refused)."""
    weights = {**LOSS_WEIGHTS, **(weights or {})}
    unknown = set(weights) - set(LOSS_TERMS)
    if unknown:
        raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {list(LOSS_TERMS)}")
    return sum((weights[name] * value for name, value in terms.items()), torch.zeros(()))


class PanopticNet(nn.Module):
    """Mask R-CNN with a dual-modal mask generator and a semantic branch, for nuclei.

    Parameters
    ----------
    num_classes : int
        Box-head classes including background (2 for untyped nuclei).
    depth : str
        ResNet depth, ``"resnet18"`` or ``"resnet34"``.
    width : int
        FPN (and RoI head convolution) channels.
    returned_layers : tuple of int
        ResNet stages feeding the FPN (see :func:`~models.panoptic.backbone.build_backbone`).
    box_width : int
        Width of the two fully connected box-head layers.
    fc_channels : int
        Channels before the mask generator's fully connected path.
    semantic_width, semantic_kernel : int
        Channels and large-kernel size of the semantic decoder.
    detections_per_image : int
        Most detections kept per image at inference.
    score_threshold : float
        Lowest box score kept at inference (the card's post-processing filters again).
    nms_threshold : float
        IoU above which the box head's non-maximum suppression drops the lower-scored box.
    train_proposals : int
        Proposals the RPN hands the box head per training image (testing keeps 2000).
    roi_samples, roi_positive_fraction : int, float
        RoIs the box and mask heads learn from per training image, and the most of them that
        are nuclei. On a CPU, RoIAlign's backward pass over the sampled RoIs dominates a step,
        so fewer RoIs than torchvision's 512 (a quarter nuclei), half of them nuclei: the
        settings of the CPU runs in docs/model-card.md.
    """

    def __init__(
        self,
        num_classes: int = 2,
        *,
        depth: str = "resnet18",
        width: int = 128,
        returned_layers: tuple[int, ...] = (1, 2, 3),
        box_width: int = 256,
        fc_channels: int = 16,
        semantic_width: int = 64,
        semantic_kernel: int = 7,
        detections_per_image: int = 2000,
        score_threshold: float = 0.05,
        nms_threshold: float = 0.5,
        train_proposals: int = 1000,
        roi_samples: int = 128,
        roi_positive_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must count background and at least one class, got {num_classes}")
        self.num_classes = num_classes
        self.transform = NoResizeTransform()
        self.backbone = build_backbone(depth, width=width, returned_layers=returned_layers)
        levels = [str(i) for i in range(len(returned_layers))]
        anchors = anchor_generator(len(levels) + 1)
        # proposal counts sized for crowded nuclei: a 256² patch can hold a few hundred
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(width, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
            pre_nms_top_n={"training": 4000, "testing": 4000},
            post_nms_top_n={"training": train_proposals, "testing": 2000}, nms_thresh=0.7,
        )
        box_pool = MultiScaleRoIAlign(featmap_names=levels, output_size=7, sampling_ratio=2)
        self.roi_heads = RoIHeads(
            box_pool, TwoMLPHead(width * 7 * 7, box_width), FastRCNNPredictor(box_width, num_classes),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=roi_samples,
            positive_fraction=roi_positive_fraction,
            bbox_reg_weights=None, score_thresh=score_threshold, nms_thresh=nms_threshold,
            detections_per_img=detections_per_image,
            mask_roi_pool=RecordingRoIAlign(levels), mask_head=nn.Identity(),
            mask_predictor=DualModalMaskGenerator(width, num_classes, width=width, fc_channels=fc_channels),
        )
        self.semantic = SemanticBranch(width, len(levels), num_classes, width=semantic_width,
                                       kernel=semantic_kernel)
        self._levels = levels

    def forward(
        self, image: Tensor, targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Loss terms (training) or detections (evaluation).

        Parameters
        ----------
        image : Tensor
            (N, 3, H, W) float32 RGB 0–255, any H and W (padded to a multiple of 32 inside).
        targets : list of dict, optional
            Training only, one per image (:func:`~models.panoptic.targets.instance_targets`):
            ``boxes`` (n, 4) float32 in input pixels, ``labels`` (n,) int64, ``masks`` (n, H, W) uint8.

        Returns
        -------
        dict of str to Tensor or list of dict
            Training: :data:`LOSS_TERMS` → scalar tensors. Evaluation: per image ``boxes`` (K, 4),
            ``scores`` (K,), ``labels`` (K,) int64 in 1..num_classes-1 and ``masks`` (K, 1, 28, 28)
            probabilities of the box's class over the box, by descending score.
        """
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (N, 3, H, W), got shape {tuple(image.shape)}")
        if self.training and (targets is None or len(targets) != image.shape[0]):
            raise ValueError("training needs one target per image")
        images, targets = self.transform(list(image), targets)
        features = self.backbone(images.tensors)
        proposals, rpn_losses = self.rpn(images, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, images.image_sizes, targets)
        if not self.training:
            return detections
        if targets is None:  # checked above; narrows the type
            raise ValueError("training needs targets")
        terms = {_TORCHVISION_TERMS[k]: v for k, v in {**rpn_losses, **roi_losses}.items()}
        terms["semantic"] = self._semantic_loss(features, targets, (image.shape[-2], image.shape[-1]))
        return terms

    def _semantic_loss(
        self, features: OrderedDict[str, Tensor], targets: list[dict[str, Tensor]], size: tuple[int, int]
    ) -> Tensor:
        levels = [features[name] for name in self._levels]
        finest = levels[0]
        boxes = self.roi_heads.mask_roi_pool.last_boxes
        logits = self.roi_heads.mask_predictor.last_logits
        if boxes is None or logits is None:
            raise RuntimeError("the mask branch did not run: no RoIs recorded for the feature fusion")
        # foreground probability of each RoI: its most likely nucleus class, background channel unused
        probs = torch.sigmoid(logits[:, 1:].amax(dim=1))
        fused = paste_masks(boxes, probs, (finest.shape[-2], finest.shape[-1]), _SEMANTIC_STRIDE)
        self.roi_heads.mask_roi_pool.last_boxes = None
        self.roi_heads.mask_predictor.last_logits = None
        sem_logits = self.semantic(levels, fused)
        classes = torch.stack([semantic_classes(t, size) for t in targets]).to(sem_logits.device)
        return semantic_loss(sem_logits, classes, _SEMANTIC_STRIDE)
