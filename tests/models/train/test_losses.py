"""HoVer-Net losses: finite, near zero on perfect predictions, type loss masked for untyped data."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.train.losses import HoverLoss, dice_loss, gradient_mse, sobel_kernels
from models.train.targets import hv_targets

WEIGHTS = {"np_ce": 1, "np_dice": 1, "hv_mse": 1, "hv_msge": 2, "tp_ce": 1, "tp_dice": 1}


def _batch(typed: list[bool]) -> dict[str, torch.Tensor]:
    n = len(typed)
    inst = torch.zeros(n, 32, 32, dtype=torch.int32)
    inst[:, 4:12, 4:14] = 1
    inst[:, 18:28, 16:26] = 2
    types = torch.where(inst == 1, 2, torch.where(inst == 2, 3, 0)).long()
    hv = torch.stack([torch.from_numpy(hv_targets(i.numpy())) for i in inst])
    return {"np": (inst > 0).long(), "hv": hv, "tp": types, "typed": torch.tensor(typed)}


def _perfect(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    big = 30.0  # logits so confident that softmax is one-hot to float precision
    return {
        "np": F.one_hot(batch["np"], 2).permute(0, 3, 1, 2).float() * big,
        "hv": batch["hv"].clone(),
        "tp": F.one_hot(batch["tp"], 5).permute(0, 3, 1, 2).float() * big,
    }


def test_perfect_prediction_gives_near_zero_loss() -> None:
    batch = _batch([True, False])
    total, terms = HoverLoss(WEIGHTS, class_weights=[1, 3, 1, 1, 1])(_perfect(batch), batch)
    assert set(terms) == set(HoverLoss.TERMS)
    assert float(total.detach()) < 1e-3


def test_random_prediction_gives_finite_positive_loss_and_gradients() -> None:
    batch = _batch([True, True])
    out = {
        "np": torch.randn(2, 2, 32, 32, requires_grad=True),
        "hv": torch.randn(2, 2, 32, 32, requires_grad=True),
        "tp": torch.randn(2, 5, 32, 32, requires_grad=True),
    }
    total, terms = HoverLoss(WEIGHTS)(out, batch)
    total.backward()
    assert torch.isfinite(total) and float(total.detach()) > 0
    assert all(v > 0 for v in terms.values())
    assert all(torch.isfinite(t.grad).all() for t in out.values())


def test_type_loss_ignores_untyped_samples() -> None:
    batch = _batch([True, False])
    out = _perfect(batch)
    out["tp"][1] = torch.randn(5, 32, 32) * 10  # nonsense types on the untyped sample
    _, terms = HoverLoss(WEIGHTS)(out, batch)
    assert terms["tp_ce"] < 1e-4 and terms["tp_dice"] < 1e-4


def test_all_untyped_batch_has_zero_type_loss_but_keeps_the_graph() -> None:
    batch = _batch([False, False])
    tp = torch.randn(2, 5, 32, 32, requires_grad=True)
    out = {**_perfect(batch), "tp": tp}
    total, terms = HoverLoss(WEIGHTS)(out, batch)
    total.backward()
    assert terms["tp_ce"] == 0.0 and tp.grad is not None


def test_gradient_mse_is_zero_for_equal_maps_and_positive_otherwise() -> None:
    batch = _batch([True])
    focus = batch["np"]
    assert float(gradient_mse(batch["hv"], batch["hv"], focus)) == 0.0
    assert float(gradient_mse(torch.zeros_like(batch["hv"]), batch["hv"], focus)) > 0.1


def test_sobel_kernels_measure_slopes() -> None:
    kx, ky = sobel_kernels(5)
    ramp = torch.arange(5.0).view(1, 5).expand(5, 5)  # increases to the right
    assert float((kx * ramp).sum()) > 0 and float((ky * ramp).sum()) == 0.0
    assert torch.equal(ky, kx.T)


def test_dice_loss_is_zero_on_match_and_channels_add() -> None:
    onehot = F.one_hot(torch.randint(0, 3, (2, 8, 8)), 3).permute(0, 3, 1, 2).float()
    assert float(dice_loss(onehot, onehot)) < 1e-3
    assert 2.5 < float(dice_loss(1 - onehot, onehot)) <= 3.0


def test_unknown_term_is_rejected() -> None:
    import pytest

    with pytest.raises(ValueError, match="unknown loss terms"):
        HoverLoss({"np_bce": 1.0})
