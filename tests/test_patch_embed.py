"""Stacked-conv patch embeddings: parity with the per-patch formulation, paths, timm semantics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch import nn

from equivit_plugin.layers import ConvPatchEmbed, GMRPatchEmbed, compose_kernels


def per_patch_reference(embed, x: torch.Tensor, act=None) -> torch.Tensor:
    """The published formulation: cut p x p patches, valid convs down to 1x1, average.

    Returns ``(B, N, D)`` tokens in row-major order.
    """
    p = embed.patch_size[0]
    cols = F.unfold(x, kernel_size=p, stride=p)  # (B, C*p*p, N)
    b, _, n = cols.shape
    patches = cols.transpose(1, 2).reshape(b * n, x.shape[1], p, p)
    convs = embed.proj.convs
    for i, conv in enumerate(convs):
        weight = conv.kernel() if hasattr(conv, "kernel") else conv.weight
        patches = F.conv2d(patches, weight, conv.bias)
        if act is not None and i < len(convs) - 1:
            patches = act(patches)
    return patches.mean(dim=(-2, -1)).reshape(b, n, -1)


@pytest.mark.parametrize("embed_cls", [GMRPatchEmbed, ConvPatchEmbed])
def test_matches_published_per_patch_formulation(embed_cls) -> None:
    embed = embed_cls(img_size=64, patch_size=16, embed_dim=24).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert embed.proj.composed
    torch.testing.assert_close(embed(x), per_patch_reference(embed, x), rtol=0, atol=1e-12)


def test_nonlinear_stack_runs_strided_and_matches_per_patch() -> None:
    embed = GMRPatchEmbed(img_size=48, patch_size=16, embed_dim=8, act_layer=nn.GELU).double()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    assert not embed.proj.composed
    torch.testing.assert_close(embed(x), per_patch_reference(embed, x, nn.GELU()),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_composed_path_equals_strided_path(training: bool) -> None:
    embed = GMRPatchEmbed(img_size=64, patch_size=16, embed_dim=16).double().train(training)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    composed = embed.proj(x)
    strided = x
    for conv in embed.proj.convs:
        strided = conv(strided)
    torch.testing.assert_close(composed, strided, rtol=0, atol=1e-12)


def test_three_layer_stack_and_mid_channel_list() -> None:
    embed = GMRPatchEmbed(img_size=32, patch_size=8, embed_dim=6, kernel_sizes=(3, 3, 4),
                          mid_channels=(5, 7)).double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(embed(x), per_patch_reference(embed, x), rtol=0, atol=1e-12)


def test_compose_kernels_is_sequential_convolution() -> None:
    first, second = torch.randn(4, 3, 5, 5).double(), torch.randn(6, 4, 3, 3).double()
    x = torch.randn(1, 3, 20, 20).double()
    torch.testing.assert_close(F.conv2d(x, compose_kernels(first, second)),
                               F.conv2d(F.conv2d(x, first), second))


def test_gradients_flow_through_composition_to_every_layer() -> None:
    embed = GMRPatchEmbed(img_size=32, embed_dim=8).train()
    embed(torch.randn(2, 3, 32, 32)).square().mean().backward()
    for name, p in embed.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def _rotate_each_patch(x: torch.Tensor, p: int, op) -> torch.Tensor:
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5)
    patches = op(patches)
    return patches.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


@pytest.mark.parametrize("op_name,op", [
    ("rot90", lambda t: torch.rot90(t, 1, (-2, -1))),
    ("rot180", lambda t: torch.rot90(t, 2, (-2, -1))),
    ("rot270", lambda t: torch.rot90(t, 3, (-2, -1))),
    ("flip", lambda t: t.flip(-1)),
    ("transpose", lambda t: t.transpose(-2, -1)),
])
def test_each_token_invariant_to_d4_of_its_own_patch(op_name, op) -> None:
    embed = GMRPatchEmbed(img_size=64, embed_dim=16).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    err = (embed(_rotate_each_patch(x, 16, op)) - embed(x)).abs().max().item()
    assert err < 1e-12, f"{op_name}: token changed by {err}"
    baseline = ConvPatchEmbed(img_size=64, embed_dim=16).double()
    assert (baseline(_rotate_each_patch(x, 16, op)) - baseline(x)).abs().max() > 1e-3


def test_output_semantics_match_timm_patch_embed() -> None:
    x = torch.randn(2, 3, 64, 48)
    for kwargs in [{}, {"flatten": False}, {"output_fmt": "NHWC"},
                   {"strict_img_size": False, "img_size": 32},
                   {"dynamic_img_pad": True, "strict_img_size": False}]:
        ours = GMRPatchEmbed(**{"img_size": (64, 48), "embed_dim": 8, **kwargs})
        ref = PatchEmbed(**{"img_size": (64, 48), "embed_dim": 8, **kwargs})
        assert ours(x).shape == ref(x).shape, kwargs
        assert ours.grid_size == ref.grid_size and ours.num_patches == ref.num_patches
    padded = GMRPatchEmbed(img_size=None, embed_dim=8, dynamic_img_pad=True)
    assert padded(torch.randn(1, 3, 40, 40)).shape == (1, 9, 8)
    normed = GMRPatchEmbed(img_size=32, embed_dim=8, norm_layer=nn.LayerNorm)
    assert isinstance(normed.norm, nn.LayerNorm)
    assert normed(torch.randn(1, 3, 32, 32)).shape[-1] == 8


def test_clear_errors_name_the_bad_values() -> None:
    with pytest.raises(ValueError, match=r"\(5, 11\).*cover 15 pixels.*patch_size is 16"):
        GMRPatchEmbed(kernel_sizes=(5, 11))
    with pytest.raises(ValueError, match="mid_channels"):
        GMRPatchEmbed(patch_size=8, kernel_sizes=(3, 3, 4), mid_channels=(5,))
    embed = GMRPatchEmbed(img_size=64, embed_dim=8)
    with pytest.raises(ValueError, match="60x64 does not match the model's img_size 64x64"):
        embed(torch.randn(1, 3, 60, 64))
    loose = GMRPatchEmbed(img_size=64, embed_dim=8, strict_img_size=False)
    with pytest.raises(ValueError, match="50x64 is not divisible by patch_size 16"):
        loose(torch.randn(1, 3, 50, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(1, 4, 64, 64\)"):
        embed(torch.randn(1, 4, 64, 64))
    with pytest.raises(TypeError, match="torch.uint8"):
        embed(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_factored_gmr_composition_equals_dense_and_is_bitwise_symmetric() -> None:
    embed = GMRPatchEmbed(img_size=32, embed_dim=12)
    kernel = embed.proj.kernel()
    dense = compose_kernels(embed.proj.convs[0].kernel(), embed.proj.convs[1].kernel())
    torch.testing.assert_close(kernel, dense, rtol=1e-5, atol=1e-6)
    for turns in (1, 2, 3):
        assert torch.equal(torch.rot90(kernel, turns, (-2, -1)), kernel)
    assert torch.equal(kernel.flip(-1), kernel) and torch.equal(kernel.transpose(-2, -1), kernel)


def test_compose_kernels_traced_path_matches_eager_path() -> None:
    first, second = torch.randn(4, 3, 5, 5).double(), torch.randn(6, 4, 3, 3).double()
    traced = torch.jit.trace(compose_kernels, (first, second))
    torch.testing.assert_close(traced(first, second), compose_kernels(first, second))


def test_training_after_inference_mode_with_the_same_kernel_sizes() -> None:
    """The composition's cached tap index must not be an inference tensor (regression: an
    inference-mode forward first, then a training step, failed in benchmarks/throughput.py)."""
    from equivit_plugin.layers.patch_embed import compose_kernels

    compose_kernels.__globals__["_sum_index"].cache_clear()
    embed = GMRPatchEmbed(img_size=32, patch_size=16, in_chans=3, embed_dim=8,
                          kernel_sizes=(7, 10))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        embed.eval()(x)
    embed.train()(x).sum().backward()
    assert all(p.grad is not None for p in embed.parameters() if p.requires_grad)
