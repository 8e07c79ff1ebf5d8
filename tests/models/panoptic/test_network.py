"""The panoptic network: joint training losses, the mask feature fusion, inference outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.panoptic import BUILDERS, LOSS_TERMS, build_panoptic_r18, instance_targets, total_loss
from models.panoptic.backbone import NoResizeTransform, anchor_sizes
from models.panoptic.semantic import paste_masks
from tests.models.panoptic._cases import disc_image, disc_map, tiny


def _batch(height: int, width: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    inst = disc_map(height, width)
    types = np.where(inst % 2 == 0, 2, 1) * (inst > 0)
    image = torch.cat([disc_image(inst, seed=0), disc_image(inst, seed=1)])
    targets = [instance_targets(inst, types, num_classes=3), instance_targets(np.zeros_like(inst))]
    return image, targets


@pytest.mark.slow
def test_training_gives_every_loss_term_finite_and_backward_reaches_every_branch() -> None:
    model = tiny(num_classes=3).train()
    image, targets = _batch(150, 170)  # neither side a multiple of 32; the second image has no nuclei
    terms = model(image, targets)
    assert set(terms) == set(LOSS_TERMS)
    for name, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    assert terms["mask"] > 0 and terms["semantic"] > 0
    total_loss(terms).backward()
    for name in ("backbone.body.conv1.weight", "rpn.head.conv.0.0.weight", "roi_heads.box_head.fc6.weight",
                 "roi_heads.mask_predictor.fc.weight", "roi_heads.mask_predictor.logits.weight",
                 "semantic.classifier.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.slow
def test_the_semantic_loss_trains_the_mask_generator_through_the_fusion() -> None:
    model = tiny().train()
    inst = disc_map(128, 128)
    terms = model(disc_image(inst), [instance_targets(inst)])
    terms["semantic"].backward()
    generator = model.roi_heads.mask_predictor
    # the semantic term reaches both paths of the dual-modal generator only via the pasted masks
    assert generator.fc.weight.grad.abs().sum() > 0
    assert generator.logits.weight.grad.abs().sum() > 0
    assert model.roi_heads.box_predictor.cls_score.weight.grad is None


def test_pasted_masks_land_in_their_boxes_and_overlaps_take_the_maximum() -> None:
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 12.0, 12.0]]), torch.zeros((0, 4))]
    masks = torch.stack([torch.full((28, 28), 0.25), torch.full((28, 28), 0.75)])
    out = paste_masks(boxes, masks, (4, 4), stride=4)  # 16×16 px at stride 4
    assert out.shape == (2, 1, 4, 4)
    expected = torch.tensor([[0.25, 0.25, 0, 0], [0.25, 0.75, 0.75, 0], [0, 0.75, 0.75, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(out[0, 0], expected)
    assert out[1].abs().sum() == 0


@pytest.mark.slow
@pytest.mark.parametrize(("height", "width"), [(128, 128), (150, 170)])
def test_inference_gives_box_relative_masks_in_input_pixels_by_descending_score(
    height: int, width: int
) -> None:
    model = tiny(num_classes=3).eval()
    with torch.no_grad():
        (found,) = model(disc_image(disc_map(height, width)))
    count = len(found["scores"])
    assert count > 0
    assert found["boxes"].shape == (count, 4) and found["boxes"].dtype == torch.float32
    assert found["labels"].dtype == torch.int64 and set(found["labels"].tolist()) <= {1, 2}
    assert found["masks"].shape == (count, 1, 28, 28)
    assert found["masks"].min() >= 0 and found["masks"].max() <= 1
    assert torch.all(found["scores"][:-1] >= found["scores"][1:])
    boxes = found["boxes"]
    # clipped to the input, not to the padded or a resized frame
    assert boxes[:, 0].min() >= 0 and boxes[:, 1].min() >= 0
    assert boxes[:, 2].max() <= width and boxes[:, 3].max() <= height


def test_the_transform_pads_to_32_and_never_resizes() -> None:
    transform = NoResizeTransform().eval()
    images, _ = transform([torch.rand(3, 150, 170) * 255])
    assert images.image_sizes == [(150, 170)]
    assert tuple(images.tensors.shape) == (1, 3, 160, 192)


def test_anchors_are_sized_for_nuclei_and_the_registry_names_both_scales() -> None:
    assert anchor_sizes(4) == ((8,), (16,), (32,), (64,))
    assert set(BUILDERS) == {"panoptic-r18", "panoptic-tiny"}


def test_the_shipped_scale_exports_under_40_mb_of_float32_weights() -> None:
    model = build_panoptic_r18()
    exported = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("semantic."))
    assert exported * 4 < 40e6
    assert model.backbone.body.layer3 is not None and not hasattr(model.backbone.body, "layer4")


def test_training_without_targets_and_bad_images_are_refused() -> None:
    model = tiny().train()
    with pytest.raises(ValueError, match="target"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="image"):
        model.eval()(torch.rand(3, 64, 64))
