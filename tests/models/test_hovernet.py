"""HoVer-Net: official state-dict layout, geometry, and the official forward computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from models.hovernet import BUILDERS, MODES, HoVerNet, build_hovernet, hovernet_original
from models.hovernet.blocks import DenseBlock, TFSamePad, UpSample2x, centre_crop
from tests.models._hovernet_weights import manifest, random_state_dict

# the manifests list a typed network: fast with PanNuke's 6 types, original with CoNSeP's 5
MANIFEST_TYPES = {"fast": 6, "original": 5}


# --------------------------------------------------------------------------- state dict


@pytest.mark.parametrize("mode", ["fast", "original"])
def test_typed_state_dict_equals_official_manifest(mode: str) -> None:
    expected = manifest(mode)
    net = BUILDERS[f"hovernet-{mode}"](MANIFEST_TYPES[mode])
    got = {key: list(value.shape) for key, value in net.state_dict().items()}
    assert list(got) == list(expected)  # same keys, same order
    assert got == expected
    assert "upsample2x.unpool_mat" in got
    assert sum(k.endswith("num_batches_tracked") for k in got) > 100


@pytest.mark.parametrize("mode", ["fast", "original"])
def test_untyped_state_dict_is_manifest_without_type_branch(mode: str) -> None:
    expected = {k: v for k, v in manifest(mode).items() if not k.startswith("decoder.tp.")}
    net = BUILDERS[f"hovernet-{mode}"](None)
    got = {key: list(value.shape) for key, value in net.state_dict().items()}
    assert got == expected
    assert list(net.decoder) == ["np", "hv"]


@pytest.mark.parametrize("mode", ["fast", "original"])
def test_state_dict_from_manifest_loads_strictly(mode: str) -> None:
    net = HoVerNet(mode, MANIFEST_TYPES[mode])  # type: ignore[arg-type]
    state = random_state_dict(manifest(mode), seed=1)
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(net.decoder["np"].u3.conva.weight, state[
        "decoder.np.u3.conva.weight"])


def test_mode_differs_only_in_decoder_kernel_and_type_count() -> None:
    fast, original = manifest("fast"), manifest("original")
    differing = sorted(k for k in fast if fast[k] != original[k])
    assert differing
    kernels = [k for k in differing if k.endswith(("conva.weight", "dense.units.0.conv2.weight"))]
    assert all(fast[k][-2:] == [3, 3] and original[k][-2:] == [5, 5] for k in kernels)
    assert all(
        k.startswith("decoder.") and (".conva." in k or ".conv2." in k or ".tp.u0.conv." in k)
        for k in differing
    )


def test_builders_are_named_by_architecture() -> None:
    assert set(BUILDERS) == {"hovernet-fast", "hovernet-original"}
    assert build_hovernet("hovernet-fast", 3).mode == "fast"
    assert hovernet_original().nr_types is None
    with pytest.raises(ValueError, match="architecture"):
        build_hovernet("hovernet-huge")


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        HoVerNet("medium")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nr_types"):
        HoVerNet("fast", 1)


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    ("mode", "nr_types", "size_in", "size_out"),
    [("fast", 6, 256, 164), ("original", 5, 270, 80), ("fast", None, 256, 164)],
)
def test_official_patch_sizes(mode: str, nr_types: int | None, size_in: int, size_out: int) -> None:
    assert (MODES[mode].input_size, MODES[mode].output_size) == (size_in, size_out)
    with torch.device("meta"):  # shapes only: no arithmetic
        net = HoVerNet(mode, nr_types).eval()  # type: ignore[arg-type]
        out = net(torch.empty(2, 3, size_in, size_in))
    expected = {"np": 2, "hv": 2} | ({"tp": nr_types} if nr_types else {})
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        k: (2, ch, size_out, size_out) for k, ch in expected.items()
    }


def test_tf_same_pad_puts_the_odd_pixel_bottom_right() -> None:
    x = torch.ones(1, 1, 4, 4)
    even = TFSamePad(3, 2)(x)  # total k - s = 1
    assert even.shape == (1, 1, 5, 5)
    assert even[0, 0, :4, :4].eq(1).all() and even[0, 0, 4].eq(0).all()
    assert even[0, 0, :, 4].eq(0).all()
    odd = TFSamePad(3, 2)(torch.ones(1, 1, 5, 5))  # total k - (5 % 2) = 2
    assert odd.shape == (1, 1, 7, 7) and odd[0, 0, 0].eq(0).all() and odd[0, 0, 1, 1] == 1
    stem = TFSamePad(7, 1)(x)  # total 6: 3 each side
    assert stem.shape == (1, 1, 10, 10) and stem[0, 0, 3:7, 3:7].eq(1).all()


def test_upsample_is_kronecker_product_with_its_buffer() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    up = UpSample2x()
    expected = torch.tensor(
        [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]], dtype=torch.float32
    )
    torch.testing.assert_close(up(x)[0, 0], expected)
    up.unpool_mat.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(up(x)[0, 0], torch.kron(x[0, 0], up.unpool_mat))


def test_centre_crop_removes_the_odd_pixel_at_bottom_right() -> None:
    x = torch.arange(25.0).reshape(1, 1, 5, 5)
    assert centre_crop(x, (1, 3)).tolist() == [[[[1.0, 2.0], [6.0, 7.0], [11.0, 12.0],
                                                  [16.0, 17.0]]]]
    assert centre_crop(x, (2, 2))[0, 0].tolist() == [[6.0, 7.0, 8.0], [11.0, 12.0, 13.0],
                                                     [16.0, 17.0, 18.0]]


def test_dense_block_grows_channels_and_crops_valid_borders() -> None:
    block = DenseBlock(8, 3, kernel_size=3).eval()
    out = block(torch.rand(1, 8, 10, 10))
    assert block.out_ch == 8 + 3 * 32
    assert out.shape == (1, 104, 4, 4)
    assert out.min() >= 0  # ends with BN-ReLU


# --------------------------------------------------------------------------- numerics


def _bn(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    return F.batch_norm(
        x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
        sd[f"{name}.bias"], training=False, eps=1e-5,
    )


def _tf_pad(x: Tensor, k: int, s: int) -> Tensor:
    total = max(k - (s if x.shape[2] % s == 0 else x.shape[2] % s), 0)
    return F.pad(x, (total // 2, total - total // 2) * 2)


def _crop(x: Tensor, c: int) -> Tensor:
    return x[:, :, c // 2 : x.shape[2] - (c - c // 2), c // 2 : x.shape[3] - (c - c // 2)]


def _official_forward(sd: dict[str, Tensor], image: Tensor, mode: str) -> dict[str, Tensor]:
    """The official forward pass restated with functional ops, straight from the state dict."""
    x = image / 255.0
    if mode == "fast":
        x = _tf_pad(x, 7, 1)
    x = F.relu(_bn(F.conv2d(x, sd["conv0./.weight"]), sd, "conv0.bn"))
    feats = []
    for stage, (units, stride) in enumerate([(3, 1), (4, 2), (6, 2), (3, 2)]):
        p = f"d{stage}"
        short = sd.get(f"{p}.shortcut.weight")
        shortcut = x if short is None else F.conv2d(x, short, stride=stride)
        for i in range(units):
            u, s = f"{p}.units.{i}", stride if i == 0 else 1
            h = F.relu(_bn(x, sd, f"{u}.preact/bn")) if i else x
            h = F.relu(_bn(F.conv2d(h, sd[f"{u}.conv1.weight"]), sd, f"{u}.conv1/bn"))
            h = F.conv2d(_tf_pad(h, 3, s), sd[f"{u}.conv2.weight"], stride=s)
            h = F.conv2d(F.relu(_bn(h, sd, f"{u}.conv2/bn")), sd[f"{u}.conv3.weight"])
            x = shortcut = h + shortcut
        x = F.relu(_bn(x, sd, f"{p}.blk_bna.bn"))
        feats.append(x)
    d0, d1, d2, d3 = feats
    d3 = F.conv2d(d3, sd["conv_bot.weight"])
    crop0, crop1 = (184, 72) if mode == "original" else (92, 36)
    d0, d1 = _crop(d0, crop0), _crop(d1, crop1)
    k = 5 if mode == "original" else 3

    def up(t: Tensor) -> Tensor:
        return torch.kron(t, sd["upsample2x.unpool_mat"][None, None])

    def dense(t: Tensor, p: str, units: int) -> Tensor:
        for i in range(units):
            u = f"{p}.units.{i}"
            h = F.relu(_bn(t, sd, f"{u}.preact_bna/bn"))
            h = F.relu(_bn(F.conv2d(h, sd[f"{u}.conv1.weight"]), sd, f"{u}.conv1/bn"))
            h = F.conv2d(h, sd[f"{u}.conv2.weight"], groups=4)
            t = torch.cat([_crop(t, t.shape[2] - h.shape[2]), h], dim=1)
        return F.relu(_bn(t, sd, f"{p}.blk_bna.bn"))

    out = {}
    for branch in ("tp", "np", "hv"):
        p = f"decoder.{branch}"
        if f"{p}.u0.conv.weight" not in sd:
            continue
        u = F.conv2d(up(d3) + d2, sd[f"{p}.u3.conva.weight"])
        u = F.conv2d(dense(u, f"{p}.u3.dense", 8), sd[f"{p}.u3.convf.weight"])
        u = F.conv2d(up(u) + d1, sd[f"{p}.u2.conva.weight"])
        u = F.conv2d(dense(u, f"{p}.u2.dense", 4), sd[f"{p}.u2.convf.weight"])
        u = F.conv2d(_tf_pad(up(u) + d0, k, 1), sd[f"{p}.u1.conva.weight"])
        u = F.relu(_bn(u, sd, f"{p}.u0.bn"))
        out[branch] = F.conv2d(u, sd[f"{p}.u0.conv.weight"], sd[f"{p}.u0.conv.bias"])
    return out


@pytest.mark.parametrize(
    # the smallest patches the official skip crops allow keep this cheap: fast needs a
    # multiple of 8 (out = in - 92), original 8·m + 6 (out = in - 190)
    ("mode", "nr_types", "size_in"),
    [("fast", 6, 128), ("original", 5, 198)],
)
def test_forward_equals_official_computation(mode: str, nr_types: int, size_in: int) -> None:
    shapes = manifest(mode)
    state = random_state_dict(shapes, seed=7)
    net = HoVerNet(mode, nr_types).eval()  # type: ignore[arg-type]
    net.load_state_dict(state)
    image = torch.rand(1, 3, size_in, size_in, generator=torch.Generator().manual_seed(3)) * 255
    with torch.no_grad():
        got = net(image)
        want = _official_forward(state, image, mode)
    assert list(got) == ["tp", "np", "hv"]
    for name in got:
        assert torch.isfinite(got[name]).all()
        assert 0.05 < got[name].std() < 20  # neither vanished nor exploded
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4)
