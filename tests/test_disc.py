"""The inscribed disc: token selection, disc-statistics GroupNorm, and ``equivit_disc``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

import equivit_plugin  # noqa: F401  (registers the models)
from equivit_plugin.equivariance import D4_TRANSFORMS
from equivit_plugin.layers import (
    DiscGroupNorm,
    GMRConvStemEmbed,
    disc_token_indices,
    disc_token_mask,
)

NAME = "equivit_disc_tiny_patch16_224"


def _brute_force_mask(h: int, w: int, radius: float) -> np.ndarray:
    """Cell centres within ``radius * min(h, w) / 2`` of the grid centre, cell by cell."""
    keep = np.zeros((h, w), bool)
    for i in range(h):
        for j in range(w):
            dist = math.hypot(i + 0.5 - h / 2, j + 0.5 - w / 2)
            keep[i, j] = dist <= radius * min(h, w) / 2 + 1e-9
    return keep.reshape(-1)


@pytest.mark.parametrize("grid", [(14, 14), (15, 15), (4, 4), (14, 20)])
@pytest.mark.parametrize("radius", [0.5, 1.0, math.sqrt(2)])
def test_disc_mask_matches_brute_force_and_is_symmetric(grid, radius) -> None:
    mask = disc_token_mask(grid, radius)
    np.testing.assert_array_equal(mask.numpy(), _brute_force_mask(*grid, radius))
    square = mask.reshape(grid)
    assert torch.equal(square, square.flip(0)) and torch.equal(square, square.flip(1))
    if grid[0] == grid[1]:
        assert torch.equal(square, square.T)


def test_disc_counts_and_indices() -> None:
    assert int(disc_token_mask((14, 14), 1.0).sum()) == 156
    assert bool(disc_token_mask((14, 14), math.sqrt(2)).all())
    idx = disc_token_indices((14, 14), 1.0, num_prefix_tokens=1)
    assert idx[0] == 0 and len(idx) == 157 and bool((idx[1:] >= 1).all())
    assert torch.equal(idx[1:] - 1, disc_token_mask((14, 14), 1.0).nonzero().flatten())
    with pytest.raises(ValueError, match="radius must be positive"):
        disc_token_mask((14, 14), 0.0)


def test_disc_group_norm_equals_group_norm_on_the_whole_map_and_a_reference_on_the_disc() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 12, 12, dtype=torch.float64) * 3 + 1
    whole = DiscGroupNorm(16, radius=2.0).double()
    plain = nn.GroupNorm(8, 16).double()
    with torch.no_grad():
        for norm in (whole, plain):
            norm.weight.copy_(torch.linspace(0.5, 2, 16))
            norm.bias.copy_(torch.linspace(-1, 1, 16))
    assert (whole(x) - plain(x)).abs().max().item() < 1e-12
    disc = DiscGroupNorm(16, radius=1.0).double()
    inside = _brute_force_mask(12, 12, 1.0)
    values = x.numpy().reshape(2, 8, 2, 144)[..., inside]
    mean = values.mean(axis=(2, 3), keepdims=True)
    std = np.sqrt(values.var(axis=(2, 3), keepdims=True) + 1e-5)
    expected = (x.numpy().reshape(2, 8, 2, 144) - mean) / std
    np.testing.assert_allclose(disc(x).detach().numpy(), expected.reshape(2, 16, 12, 12),
                               atol=1e-12)
    # Statistics of a D4-symmetric disc: the norm commutes with every rotation/flip.
    for _, op in D4_TRANSFORMS:
        assert (disc(op(x)) - op(disc(x))).abs().max().item() < 1e-12


def _disc_model(**kwargs) -> nn.Module:
    model = timm.create_model(NAME, num_classes=4, depth=2, **kwargs).double().eval()
    with torch.no_grad():  # zero-initialised tables would make anything look invariant
        for name, param in model.named_parameters():
            if name.startswith(("attn_bias.", "radial_pos_embed.")):
                param.normal_(std=1.0)
    return model


def test_equivit_disc_is_exactly_invariant_and_blind_outside_the_disc() -> None:
    model = _disc_model()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        logits = model(x)
        assert tokens.shape == (2, 1 + 156, 192)
        for _, op in D4_TRANSFORMS:
            assert (model(op(x)) - logits).abs().max().item() < 1e-10
        # Every 16 x 16 corner patch lies outside the disc and outside the receptive field of
        # every token inside it, and the stem's norms take no statistics there.
        corners = x.clone()
        for rows in (slice(0, 16), slice(-16, None)):
            for cols in (slice(0, 16), slice(-16, None)):
                corners[..., rows, cols] = torch.randn(2, 3, 16, 16, dtype=torch.float64) * 5
        assert (model(corners) - logits).abs().max().item() < 1e-12
        centre = x.clone()
        centre[..., 104:120, 104:120] += 1.0
        assert (model(centre) - logits).abs().max().item() > 1e-3
        # Without disc statistics in the stem, the corners reach every token through the norms.
        leaky = _disc_model(embed_kwargs={})
        leaky.load_state_dict(model.state_dict())
        assert (leaky(corners) - leaky(x)).abs().max().item() > 1e-6


def test_equivit_disc_intermediates_checkpoint_and_arguments(tmp_path) -> None:
    from equivit_plugin.models import load_model, save_checkpoint

    model = _disc_model().float()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, output_fmt="NLC")
        assert torch.allclose(final, model.forward_features(x), atol=1e-5)
        assert intermediates[-1].shape == (1, 156, 192)
    with pytest.raises(ValueError, match="output_fmt='NLC'"):
        model.forward_intermediates(x)
    path = save_checkpoint(tmp_path / "disc.pt", model, NAME,
                           model_kwargs={"num_classes": 4, "depth": 2})
    loaded, info = load_model(path)
    assert isinstance(loaded.patch_embed, GMRConvStemEmbed)
    assert isinstance(loaded.patch_embed.proj.norms[0], DiscGroupNorm)
    assert loaded.disc_radius == 1.0
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="disc_radius must be a positive number"):
        timm.create_model(NAME, disc_radius=-1)
    with pytest.raises(ValueError, match="not both"):
        GMRConvStemEmbed(embed_dim=16, norm_disc_radius=1.0, stem_norm_layer=nn.BatchNorm2d)


def test_equivit_disc_trains_after_a_first_call_under_inference_mode() -> None:
    """The disc's indices and weights are cached per grid: a first call under
    ``torch.inference_mode()`` must not leave tensors that a training step cannot use."""
    # A 6 x 6 grid, which no other test uses, so the cache starts empty here.
    model = timm.create_model(NAME, num_classes=2, depth=1, img_size=96)
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        model.eval()(x)
    loss = model.train()(x).square().mean()
    loss.backward()
    assert model.patch_embed.proj.norms[0].weight.grad is not None
