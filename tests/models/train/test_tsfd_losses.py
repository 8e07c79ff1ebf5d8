"""TSFD-Net losses and targets: values on hand-made cases, masking of untyped data, a smoke step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.train.tsfd_losses import (
    TSFDLoss,
    combo_loss,
    edge_weights,
    focal_loss,
    focal_tversky_loss,
    weighted_bce_dice_loss,
)
from models.train.tsfd_targets import boundary_target, semantic_target
from models.tsfd import build_tsfd_tiny


def test_focal_tversky_is_zero_for_a_perfect_prediction_and_weighs_misses_more() -> None:
    t = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert float(focal_tversky_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    missed = focal_tversky_loss(torch.tensor([1.0, 0.0, 0.0, 0.0]), t)  # one false negative
    extra = focal_tversky_loss(torch.tensor([1.0, 1.0, 1.0, 0.0]), t)  # one false positive
    # T = 1 / (1 + 0.7) and 2 / (2 + 0.3): (1 - T)^(4/3)
    assert float(missed) == pytest.approx((1 - 1 / 1.7) ** (4 / 3), rel=1e-5)
    assert float(extra) == pytest.approx((1 - 2 / 2.3) ** (4 / 3), rel=1e-5)
    assert missed > extra


def test_focal_loss_matches_its_formula() -> None:
    p, t = torch.tensor([0.8, 0.3]), torch.tensor([1.0, 0.0])
    bce = torch.tensor([-math.log(0.8), -math.log(0.7)])
    expected = float((0.3 * (1 - torch.exp(-bce)) ** 5 * bce).mean())
    assert float(focal_loss(p, t)) == pytest.approx(expected, rel=1e-6)


def test_combo_loss_matches_its_formula_and_is_not_negative() -> None:
    p, t = torch.tensor([0.9, 0.2, 0.6, 0.1]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    dice = (2 * (0.9 + 0.6) + 1) / (1.8 + 2 + 1)
    wce = -(0.8 * (math.log(0.9) + math.log(0.6)) + 0.2 * (math.log(0.8) + math.log(0.9))) / 4
    assert float(combo_loss(p, t)) == pytest.approx(0.5 * wce + 0.5 * (1 - dice), rel=1e-5)
    assert float(combo_loss(t, t)) >= 0


def test_edge_weights_triple_the_pixels_near_an_edge_and_average_one() -> None:
    target = torch.zeros(1, 1, 32, 32)
    target[..., 10:20, 10:20] = 1
    w = edge_weights(target)
    assert float(w.mean()) == pytest.approx(1.0, rel=1e-6)
    assert float(w[0, 0, 15, 10] / w[0, 0, 0, 31]) == pytest.approx(3.0)
    perfect = weighted_bce_dice_loss(target, target)
    assert float(perfect) == pytest.approx(0.0, abs=1e-5)


def test_untyped_samples_do_not_train_the_classes() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 16, 16, requires_grad=True)
    target = torch.zeros(1, 16, 16, dtype=torch.long)
    target[0, 4:10, 4:10] = 1
    loss = TSFDLoss()._semantic(logits, target, torch.tensor([False]))
    loss.backward()
    grad = logits.grad
    assert grad is not None
    # the gradient is the same on every class channel: their differences, the class decision,
    # are not pushed
    np.testing.assert_allclose(grad[0, 1].numpy(), grad[0, 2].numpy(), atol=1e-7)
    np.testing.assert_allclose(grad[0, 2].numpy(), grad[0, 3].numpy(), atol=1e-7)
    assert float(grad[0, 1].abs().max()) > 0  # the foreground is still trained
    # and the value is that of the softmax collapsed to background vs nucleus
    bg = torch.softmax(logits, 1)[:, :1].detach()
    loss_ref = TSFDLoss()._semantic(torch.log(torch.cat([bg, 1 - bg], 1)), target, torch.tensor([True]))
    assert float(loss.detach()) == pytest.approx(float(loss_ref), rel=1e-4)


def test_the_total_loss_has_every_term_and_tissue_labels_can_be_missing() -> None:
    torch.manual_seed(0)
    outputs = {"sem": torch.randn(2, 3, 8, 8), "boundary": torch.randn(2, 1, 8, 8),
               "tissue": torch.randn(2, 4)}
    batch = {"sem": torch.randint(0, 3, (2, 8, 8)), "boundary": torch.randint(0, 2, (2, 8, 8)),
             "typed": torch.tensor([True, False]), "tissue": torch.tensor([2, -1])}
    total, terms = TSFDLoss()(outputs, batch)
    assert set(terms) == {"semantic", "boundary", "tissue"}
    assert float(total) == pytest.approx(sum(terms.values()), rel=1e-5)
    batch["tissue"] = torch.tensor([-1, -1])
    assert TSFDLoss()(outputs, batch)[1]["tissue"] == 0.0


def test_boundary_target_encloses_each_nucleus_and_walls_touching_ones() -> None:
    inst = np.zeros((8, 12), np.int32)
    inst[1:6, 1:6] = 1
    inst[1:6, 6:11] = 2
    ring = boundary_target(inst)
    expected = np.zeros_like(ring)
    for cols in (slice(1, 6), slice(6, 11)):
        expected[1:6, cols] = 1
        block = expected[1:6, cols]
        block[1:-1, 1:-1] = 0
    np.testing.assert_array_equal(ring, expected)
    assert ring[3, 5] == 1 and ring[3, 6] == 1  # the two-pixel wall
    thick = boundary_target(inst, width=2)
    assert thick[3, 2] == 1 and thick[3, 3] == 0 and thick.sum() > ring.sum()


def test_semantic_target_keeps_classes_or_marks_untyped_foreground() -> None:
    inst = np.array([[0, 1, 1], [0, 2, 2]], np.int32)
    types = np.array([[3, 1, 1], [0, 4, 4]], np.uint8)
    np.testing.assert_array_equal(semantic_target(inst, types, n_classes=5), [[0, 1, 1], [0, 4, 4]])
    np.testing.assert_array_equal(semantic_target(inst, None, n_classes=5), [[0, 1, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match="types must be in"):
        semantic_target(inst, types, n_classes=4)
    with pytest.raises(TypeError):
        boundary_target(inst.astype(float))


@pytest.mark.slow
def test_a_few_training_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    net = build_tsfd_tiny(3)
    inst = np.zeros((32, 32), np.int32)
    inst[4:14, 4:14], inst[4:14, 14:24], inst[20:28, 8:18] = 1, 2, 3
    types = np.where(inst == 3, 2, np.where(inst > 0, 1, 0)).astype(np.uint8)
    image = torch.full((2, 3, 32, 32), 230.0)
    image[:, :, torch.from_numpy(inst > 0)] = torch.tensor([80.0, 40.0, 150.0]).view(1, 3, 1)
    batch = {"sem": torch.from_numpy(semantic_target(inst, types, n_classes=3)).expand(2, -1, -1),
             "boundary": torch.from_numpy(boundary_target(inst)).expand(2, -1, -1),
             "typed": torch.tensor([True, False])}
    optim = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        total, _ = TSFDLoss()(net(image), batch)
        optim.zero_grad()
        total.backward()
        optim.step()
        losses.append(float(total.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_the_tsfd_config_sketch_names_a_tsfd_architecture_and_the_loss_terms() -> None:
    from models.train.config import REPO_ROOT, load_config
    from models.tsfd import BUILDERS

    config = load_config(REPO_ROOT / "configs" / "tsfd.yaml")
    assert config.model.architecture in BUILDERS
    assert set(config.loss.weights) == set(TSFDLoss.TERMS)
    net = BUILDERS[config.model.architecture](config.model.n_classes, **config.model.options)
    assert net.tissue is None  # no tissue labels: the classifier is off
    assert config.data.patch_size % 32 == 0
