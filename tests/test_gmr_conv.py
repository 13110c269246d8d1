"""GMRConvNd: exact equivariance, kernel cache, initialisation, errors, MONAI factory."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from monai.networks.layers import Conv
from torch import nn

import equivit_plugin  # noqa: F401  (registers "gmr" in MONAI's Conv factory)
from equivit_plugin import GMRConv2d, GMRConv3d
from equivit_plugin.equivariance import D4_TRANSFORMS
from equivit_plugin.layers import ring_distances

D4 = {name: op for name, op in D4_TRANSFORMS if name != "rot0"}


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 11])
def test_kernel_is_exactly_d4_symmetric(k: int) -> None:
    conv = GMRConv2d(3, 4, k).double()
    kernel = conv.kernel()
    for name, op in D4.items():
        assert torch.equal(op(kernel), kernel), f"k={k}: kernel not invariant under {name}"


@pytest.mark.parametrize("k", [2, 3, 6, 11])
def test_conv_is_exactly_d4_equivariant_float64(k: int) -> None:
    conv = GMRConv2d(3, 5, k, padding="valid").double()
    x = torch.randn(2, 3, 23, 23, dtype=torch.float64)
    y = conv(x)
    for name, op in D4.items():
        err = (conv(op(x)) - op(y)).abs().max().item()
        assert err < 1e-12, f"k={k} {name}: equivariance error {err}"


def test_published_even_kernel_centre_would_break_symmetry() -> None:
    """The (k-1)/2 centre is what makes even kernels symmetric; k//2 (published) is not."""
    d = ring_distances((6, 6))
    assert torch.equal(torch.rot90(d, 1), d)
    axis = torch.arange(6.0) - 6 // 2
    published = torch.sqrt(axis[:, None] ** 2 + axis[None, :] ** 2)
    assert not torch.equal(torch.rot90(published, 1), published)


@pytest.mark.parametrize("k", [3, 4])
def test_conv3d_equivariant_to_90_degree_rotations_about_each_axis(k: int) -> None:
    conv = GMRConv3d(2, 3, k).double()
    x = torch.randn(1, 2, 9, 9, 9, dtype=torch.float64)
    y = conv(x)
    for dims in [(-3, -2), (-3, -1), (-2, -1)]:
        err = (conv(torch.rot90(x, 1, dims)) - torch.rot90(y, 1, dims)).abs().max().item()
        assert err < 1e-12, f"3-D rotation about {dims}: error {err}"


def test_kernel_size_one_is_a_pointwise_conv() -> None:
    conv = GMRConv2d(3, 4, 1).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert conv.num_rings == 1
    expected = F.conv2d(x, conv.kernel(), conv.bias)
    assert torch.isfinite(conv.kernel()).all()
    torch.testing.assert_close(conv(x), expected)


def test_default_init_matches_conv2d_fan_in_scale() -> None:
    torch.manual_seed(1)
    for k in (3, 6, 11):
        gmr = torch.stack([GMRConv2d(64, 64, k).kernel().detach().std() for _ in range(5)]).mean()
        ref = torch.stack([nn.Conv2d(64, 64, k).weight.detach().std() for _ in range(5)]).mean()
        assert 0.6 < (gmr / ref).item() < 1.4, f"k={k}: GMR kernel std {gmr} vs Conv2d {ref}"


def test_gradcheck_input_weight_and_sigma() -> None:
    conv = GMRConv2d(2, 3, 4, padding=1, bias=True).double()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    w = conv.weight.detach().clone().requires_grad_(True)
    s = conv.log_sigma.detach().clone().requires_grad_(True)

    def run(inp, weight, log_sigma):
        return torch.func.functional_call(conv, {"weight": weight, "log_sigma": log_sigma}, (inp,))

    assert torch.autograd.gradcheck(run, (x, w, s))
    conv(x).sum().backward()
    assert conv.log_sigma.grad.abs().sum() > 0, "ring widths receive no gradient"


def test_eval_cache_is_reused_and_invalidated_by_optimizer_step() -> None:
    conv = GMRConv2d(3, 4, 5).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        y0 = conv(x)
        assert conv.kernel() is conv.kernel(), "eval kernel should be cached"
    loss = conv(x).square().mean()
    loss.backward()
    torch.optim.SGD(conv.parameters(), lr=1.0).step()
    with torch.no_grad():
        y1 = conv(x)
        fresh = F.conv2d(x, conv._build_kernel(), conv.bias)
    assert not torch.allclose(y0, y1), "output unchanged after an optimizer step: stale cache"
    torch.testing.assert_close(y1, fresh)


def test_eval_cache_invalidated_by_load_state_dict_and_dtype_change() -> None:
    conv, other = GMRConv2d(3, 4, 5).eval(), GMRConv2d(3, 4, 5).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        conv(x)
        conv.load_state_dict(other.state_dict())
        torch.testing.assert_close(conv(x), other(x))
        conv.double()
        assert conv(x.double()).dtype == torch.float64


def test_deepcopy_and_training_mode_never_share_a_stale_kernel() -> None:
    conv = GMRConv2d(3, 4, 3).eval()
    with torch.no_grad():
        conv(torch.randn(1, 3, 5, 5))
    clone = copy.deepcopy(conv)
    with torch.no_grad():
        clone.weight.mul_(2)
        torch.testing.assert_close(clone.kernel(), 2 * conv.kernel())
    conv.train()
    assert conv.kernel().requires_grad


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes_match_explicit_padding(mode: str) -> None:
    conv = GMRConv2d(2, 3, 5, padding=2, padding_mode=mode).double()
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    expected = F.conv2d(F.pad(x, [2, 2, 2, 2], mode=mode), conv.kernel(), conv.bias)
    torch.testing.assert_close(conv(x), expected)


def test_same_padding_stride_dilation_groups_shapes() -> None:
    x = torch.randn(2, 4, 16, 16)
    assert GMRConv2d(4, 8, 6, padding="same")(x).shape == (2, 8, 16, 16)
    assert GMRConv2d(4, 8, 3, stride=2, padding=1)(x).shape == (2, 8, 8, 8)
    assert GMRConv2d(4, 8, 3, dilation=2, groups=2)(x).shape == (2, 8, 12, 12)


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        GMRConv2d(3, 4, (3, 5))
    with pytest.raises(ValueError, match="expects 3 input channels, got 4"):
        GMRConv2d(3, 4, 3)(torch.randn(1, 4, 8, 8))
    with pytest.raises(TypeError, match="torch.uint8"):
        GMRConv2d(3, 4, 3)(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="'zero'"):
        GMRConv2d(3, 4, 3, padding_mode="zero")
    with pytest.raises(ValueError, match="groups"):
        GMRConv2d(3, 4, 3, groups=2)


def test_monai_conv_factory_returns_gmr_layers() -> None:
    assert Conv["gmr", 2] is GMRConv2d
    assert Conv["gmr", 3] is GMRConv3d
    layer = Conv["gmr", 2](3, 8, kernel_size=5, padding=2)
    assert layer(torch.randn(1, 3, 10, 10)).shape == (1, 8, 10, 10)


def test_disc_support_zeroes_the_corners_only_when_asked() -> None:
    disc_conv = GMRConv2d(1, 1, 5, disc_support=True)
    square_conv = GMRConv2d(1, 1, 5, disc_support=False)
    square_conv.load_state_dict(disc_conv.state_dict())  # the same ring weights
    disc, square = disc_conv.kernel()[0, 0], square_conv.kernel()[0, 0]
    outside = ring_distances((5, 5)) > 2.5  # the four corner taps (distance 2.83)
    assert outside.sum() == 4
    assert torch.all(disc[outside] == 0) and torch.all(square[outside] != 0)
    torch.testing.assert_close(disc[~outside], square[~outside])
