"""Off-grid-robust invariant building blocks: the distance attention bias, the equivariant
convolutional stem, and models built from them - exact invariance in float64, for every size
and for non-square inputs, and checks that each test can fail."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

import equivit_plugin  # noqa: F401  (registers the models)
from equivit_plugin.equivariance import D4_TRANSFORMS
from equivit_plugin.layers import (
    ConvStem,
    DistanceAttentionBias,
    GaussianBlur2d,
    GMRConvStemEmbed,
    default_stem_stages,
    gaussian_taps,
    pairwise_distances,
)
from equivit_plugin.models import DEPTH_CHANGE

D4 = {name: op for name, op in D4_TRANSFORMS if name != "rot0"}
# The 180-degree turn and the two flips map an H x W grid onto itself for any H, W.
RECTANGLE_SYMMETRIES = {
    "rot180": lambda x: torch.rot90(x, 2, (-2, -1)),
    "flip_h": lambda x: x.flip(-1),
    "flip_v": lambda x: x.flip(-2),
}
CONFIGS = {
    "distance_bias": {"attn_bias": "distance", "global_pool": "avg"},
    "conv_stem": {"embed_layer": "gmr_stem", "global_pool": "avg"},
    "conv_stem_distance_bias": {"embed_layer": "gmr_stem", "attn_bias": "distance",
                                "global_pool": "token"},
    "disc": {"embed_layer": "gmr_stem", "embed_kwargs": {"norm_disc_radius": 1.0},
             "attn_bias": "distance", "global_pool": "avg", "disc_radius": 1.0},
    "disc_class_token": {"attn_bias": "distance", "global_pool": "token", "disc_radius": 0.8},
    "disc_blur": {"embed_layer": "gmr_stem",
                  "embed_kwargs": {"norm_disc_radius": 1.0, "blur_sigma": 0.7},
                  "attn_bias": "distance", "global_pool": "avg", "disc_radius": 1.0},
}


def test_pairwise_distances_match_brute_force() -> None:
    grid = (3, 5)
    got = pairwise_distances(grid, dtype=torch.float64)
    cells = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    for i, (r1, c1) in enumerate(cells):
        for j, (r2, c2) in enumerate(cells):
            assert got[i, j].item() == pytest.approx(math.hypot(r1 - r2, c1 - c2), abs=1e-12)


def test_distance_bias_interpolates_its_table_and_fills_prefix_rows() -> None:
    bias = DistanceAttentionBias(num_heads=2, grid_size=(4, 4), knot_spacing=1.0)
    with torch.no_grad():
        bias.weight.copy_(torch.arange(bias.weight.numel(), dtype=torch.float32)
                          .view_as(bias.weight))
        bias.prefix.copy_(torch.tensor([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]]))
    out = bias((4, 4), num_prefix_tokens=1)
    assert out.shape == (1, 2, 17, 17)
    table = bias.weight
    # tokens 1 and 2 are one patch apart; token 1 and token 1 + 5 (one down, one right) sqrt(2)
    assert out[0, 1, 1, 2].item() == pytest.approx(table[1, 1].item())
    frac = math.sqrt(2) - 1
    expected = table[0, 1] * (1 - frac) + table[0, 2] * frac
    assert out[0, 0, 1, 6].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out[0, 0, 0, 0].item() == 30.0  # prefix to prefix
    assert torch.all(out[0, 1, 0, 1:] == 40.0) and torch.all(out[0, 1, 1:, 0] == 50.0)
    # A larger grid than the table was sized for clamps to the last knot.
    far = bias((20, 20), num_prefix_tokens=0)
    assert far[0, 0, 0, -1].item() == pytest.approx(table[0, -1].item())


def _token_map(embed: nn.Module, x: torch.Tensor) -> torch.Tensor:
    tokens = embed(x)  # (B, N, D)
    height, width = x.shape[-2] // 16, x.shape[-1] // 16
    return tokens.transpose(1, 2).reshape(x.shape[0], -1, height, width)


def test_conv_stem_is_exactly_equivariant_in_float64() -> None:
    embed = GMRConvStemEmbed(img_size=224, patch_size=16, embed_dim=64).double()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    reference = _token_map(embed, x)
    for name, op in D4.items():
        err = (_token_map(embed, op(x)) - op(reference)).abs().max().item()
        assert err < 1e-12, f"{name}: {err}"


def test_conv_stem_on_a_rectangle_and_the_plain_conv_control() -> None:
    embed = GMRConvStemEmbed(img_size=(224, 320), patch_size=16, embed_dim=32).double()
    x = torch.randn(1, 3, 224, 320, dtype=torch.float64)
    reference = _token_map(embed, x)
    for name, op in RECTANGLE_SYMMETRIES.items():
        err = (_token_map(embed, op(x)) - op(reference)).abs().max().item()
        assert err < 1e-12, f"{name}: {err}"
    # The same geometry with unconstrained kernels is not equivariant: the test can fail.
    plain = ConvStem(3, 32, conv_layer=nn.Conv2d).double()
    image = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert (plain(image.flip(-1)) - plain(image).flip(-1)).abs().max().item() > 1e-3


def test_gaussian_blur_is_a_sampled_radial_gaussian() -> None:
    blur = GaussianBlur2d(0.7).double()
    assert blur.taps.numel() == 5 and "taps" not in blur.state_dict()  # derived from sigma
    impulse = torch.zeros(1, 2, 9, 9, dtype=torch.float64)
    impulse[:, :, 4, 4] = 1.0
    kernel = blur(impulse)[0, 0, 2:7, 2:7]
    # Independently: exp(-r^2 / (2 sigma^2)) on the 5 x 5 grid, normalised.
    axis = torch.arange(-2.0, 3.0, dtype=torch.float64)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    expected = torch.exp(-(xx**2 + yy**2) / (2 * 0.7**2))
    torch.testing.assert_close(kernel, expected / expected.sum(), atol=1e-15, rtol=0)
    assert blur(impulse)[0, 1].equal(blur(impulse)[0, 0])  # depthwise, the same per channel
    assert gaussian_taps(1.0).numel() == 5 and gaussian_taps(1.1).numel() == 7
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="sigma must be a positive number"):
            GaussianBlur2d(bad)


def test_blurred_conv_stem_is_exactly_equivariant_and_blurs_before_each_stride() -> None:
    embed = GMRConvStemEmbed(img_size=64, patch_size=16, embed_dim=32,
                             blur_sigma=0.7).double()
    stem = embed.proj
    assert stem.blurred == (True, True, True, True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    reference = _token_map(embed, x)
    for name, op in D4.items():
        err = (_token_map(embed, op(x)) - op(reference)).abs().max().item()
        assert err < 1e-12, f"{name}: {err}"
    # The same weights without the blur give other tokens: the blur is applied.
    plain = GMRConvStemEmbed(img_size=64, patch_size=16, embed_dim=32).double()
    plain.load_state_dict(embed.state_dict())
    assert (_token_map(plain, x) - reference).abs().max().item() > 1e-3
    # A stride-1 stage is not blurred (nothing is subsampled there).
    assert ConvStem(3, 8, stages=((3, 1), (4, 2)), blur_sigma=1.0).blurred == (False, True)


def test_conv_stem_arguments_are_checked() -> None:
    assert default_stem_stages(16) == ((4, 2),) * 4
    assert default_stem_stages(8) == ((4, 2),) * 3
    with pytest.raises(ValueError, match="patch_size = 2\\^m"):
        default_stem_stages(12)
    with pytest.raises(ValueError, match="even kernel_size - stride"):
        ConvStem(3, 8, stages=((3, 2), (4, 2)))
    with pytest.raises(ValueError, match="multiply to 8, but patch_size is 16"):
        GMRConvStemEmbed(patch_size=16, embed_dim=8, stages=((6, 4), (4, 2)))
    # Other stages stay exactly equivariant too (a stride-4 first stage, then stride 2).
    embed = GMRConvStemEmbed(img_size=64, patch_size=16, embed_dim=16,
                             stages=((6, 4), (4, 2), (4, 2))).double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert (_token_map(embed, torch.rot90(x, 1, (-2, -1)))
            - torch.rot90(_token_map(embed, x), 1, (-2, -1))).abs().max().item() < 1e-12
    with pytest.raises(ValueError, match="not divisible by patch_size 16"):
        GMRConvStemEmbed(img_size=None, patch_size=16, embed_dim=8,
                         strict_img_size=False)(torch.randn(1, 3, 40, 48))


def _invariance_error(model: nn.Module, x: torch.Tensor, ops) -> float:
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
        worst = 0.0
        for op in ops.values():
            y = op(x)
            pooled = model.forward_head(model.forward_features(y), pre_logits=True)
            worst = max(worst, (pooled - feats).abs().max().item(),
                        (model(y) - logits).abs().max().item())
    return worst


def _randomise_position_parts(model: nn.Module) -> None:
    """Zero-initialised tables would make any model look invariant: give them values."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("attn_bias.", "radial_pos_embed.")):
                param.normal_(std=1.0)


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_invariant_variants_are_exact_in_float64_for_every_size(size: str, config: str) -> None:
    model = timm.create_model(f"equivit_ri_{size}_patch16_224", num_classes=4, img_size=64,
                              depth=2, **CONFIGS[config]).double().eval()
    _randomise_position_parts(model)
    err = _invariance_error(model, torch.randn(2, 3, 64, 64, dtype=torch.float64), D4)
    assert err < 1e-10, err


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_invariant_variants_at_224_and_on_a_224x320_rectangle(config: str) -> None:
    model = timm.create_model("equivit_ri_tiny_patch16_224", num_classes=4, depth=2,
                              **CONFIGS[config]).double().eval()
    _randomise_position_parts(model)
    assert _invariance_error(model, torch.randn(1, 3, 224, 224, dtype=torch.float64), D4) < 1e-10
    wide = timm.create_model("equivit_ri_tiny_patch16_224", num_classes=4, depth=2,
                             img_size=(224, 320), **CONFIGS[config]).double().eval()
    _randomise_position_parts(wide)
    x = torch.randn(1, 3, 224, 320, dtype=torch.float64)
    assert _invariance_error(wide, x, RECTANGLE_SYMMETRIES) < 1e-10


def test_distance_bias_changes_the_output_and_a_position_bias_would_break_invariance() -> None:
    model = timm.create_model("equivit_ri_tiny_patch16_224", num_classes=4, img_size=64, depth=2,
                              attn_bias="distance").double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        model.attn_bias.weight.normal_(std=1.0)
        after = model(x)
    assert (after - before).abs().max().item() > 1e-3  # the bias reaches the output
    # Control: a bias that depends on absolute positions (not only on distances) is not
    # invariant, so the invariance tests above can fail.
    bias = model.attn_bias(model.patch_embed.grid_size, model.num_prefix_tokens)
    skewed = bias + torch.randn(1, 1, 1, bias.shape[-1], dtype=bias.dtype)
    with torch.no_grad():
        plain = model.forward_head(model.forward_features(x, attn_mask=skewed - bias))
        turned = model.forward_head(
            model.forward_features(torch.rot90(x, 1, (-2, -1)), attn_mask=skewed - bias))
    assert (plain - turned).abs().max().item() > 1e-6


def test_distance_bias_reaches_forward_intermediates_and_rejects_patch_dropout() -> None:
    model = timm.create_model("equivit_ri_tiny_patch16_224", num_classes=0, img_size=64, depth=2,
                              attn_bias="distance", global_pool="avg").eval()
    _randomise_position_parts(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, _ = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    dropped = timm.create_model("equivit_ri_tiny_patch16_224", img_size=64, depth=1,
                                attn_bias="distance", patch_drop_rate=0.5).train()
    with pytest.raises(NotImplementedError, match="patch dropout"):
        dropped(x)


def test_embed_layer_by_name_round_trips_through_a_checkpoint(tmp_path) -> None:
    from equivit_plugin.models import load_model, save_checkpoint

    kwargs = {"num_classes": 3, "img_size": 64, "depth": 2, "embed_layer": "gmr_stem",
              "embed_kwargs": {"stages": [[4, 2]] * 4}, "attn_bias": "distance",
              "global_pool": "avg"}
    model = timm.create_model("equivit_ri_tiny_patch16_224", **kwargs).eval()
    path = save_checkpoint(tmp_path / "model.pt", model, "equivit_ri_tiny_patch16_224",
                           class_names=["a", "b", "c"], model_kwargs=kwargs)
    loaded, info = load_model(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert isinstance(loaded.patch_embed, GMRConvStemEmbed)
    assert loaded.patch_embed.proj.stages == ((4, 2),) * 4
    assert info.model_kwargs["attn_bias"] == "distance"
    with pytest.raises(ValueError, match="embed_layer must be one of"):
        timm.create_model("equivit_ri_tiny_patch16_224", embed_layer="gmr-stem")
    with pytest.raises(ValueError, match="attn_bias must be 'none' or 'distance'"):
        timm.create_model("equivit_ri_tiny_patch16_224", attn_bias="relative")


@pytest.mark.parametrize("variant", ["equivit_rid", "equivit_ric", "equivit_disc"])
def test_registered_variants_through_the_monai_door(variant: str) -> None:
    from equivit_plugin.networks import EquiViT, create_network

    name = f"{variant}_tiny_patch16_224"
    timm_model = timm.create_model(name, num_classes=3, img_size=64)
    monai_net = EquiViT(in_channels=3, num_classes=3, img_size=64, variant=variant, size="tiny")
    assert monai_net.state_dict().keys() == timm_model.state_dict().keys()
    monai_net.load_state_dict(timm_model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(monai_net(x), timm_model.eval()(x), atol=1e-6)
        assert create_network(name, num_classes=3, img_size=64)(x).shape == (2, 3)
    expected_depth = 12 + DEPTH_CHANGE.get(variant, 0)
    assert len(timm_model.blocks) == expected_depth and timm_model.global_pool == "avg"


@pytest.mark.parametrize("variant", ["equivit_rid", "equivit_ric", "equivit_disc"])
def test_registered_variants_through_the_tiatoolbox_engine(variant: str,
                                                           shared_data) -> None:
    import numpy as np
    from PIL import Image
    from tiatoolbox.models.engine.deep_feature_extractor import DeepFeatureExtractor

    from equivit_plugin.tiatoolbox import EquiViTEncoder, make_ioconfig

    files = sorted((shared_data / "crc_tiles").glob("*/*.png"))[:3]
    tiles = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    rotated = np.ascontiguousarray(np.rot90(tiles, 1, (1, 2)))
    torch.manual_seed(4)
    encoder = EquiViTEncoder.from_name(f"{variant}_tiny_patch16_224", depth=1)
    _randomise_position_parts(encoder.net)
    engine = DeepFeatureExtractor(model=encoder, batch_size=2)
    features = [np.asarray(engine.run(images=batch, patch_mode=True,
                                      ioconfig=make_ioconfig())["features"])
                for batch in (tiles, rotated)]
    from equivit_plugin.models import normalise_batch

    with torch.no_grad():
        direct = encoder.net.forward_head(
            encoder.net.forward_features(normalise_batch(torch.from_numpy(tiles))),
            pre_logits=True)
    # The engine hands the model an NHWC-strided batch: the stem's convolutions then take
    # another kernel path, equal to float32 rounding (a few 1e-5 of the feature scale).
    scale = float(np.abs(direct.numpy()).max())
    np.testing.assert_allclose(features[0], direct.numpy(), atol=5e-5 * scale)
    np.testing.assert_allclose(features[1], features[0], atol=5e-5 * scale)


def test_the_default_invariant_variant_is_the_default_everywhere() -> None:
    import json

    from conftest import REPO_ROOT

    from equivit_plugin.distill import DEFAULT_STUDENT
    from equivit_plugin.features.config import DEFAULT_MODEL
    from equivit_plugin.models import (
        DEFAULT_INVARIANT_VARIANT,
        DEFAULT_STUDENT_VARIANT,
        model_name,
    )

    train = json.loads((REPO_ROOT / "monai_bundle" / "configs" / "train.json").read_text())
    assert train["network_name"] == model_name(DEFAULT_INVARIANT_VARIANT, "tiny")
    assert train["augment"] == "any_angle"
    assert model_name(DEFAULT_INVARIANT_VARIANT, "small") == DEFAULT_MODEL
    assert model_name(DEFAULT_STUDENT_VARIANT, "small") == DEFAULT_STUDENT
    distill = json.loads((REPO_ROOT / "monai_bundle" / "configs" / "distill.json").read_text())
    assert distill["student"] == DEFAULT_STUDENT


def test_a_disc_model_traces_with_torch_jit_checks_on_a_new_size() -> None:
    # torch.jit.trace (as MONAI's ckpt_export calls it) reruns the model and compares graphs:
    # the disc's cached token indices must not make the first call's graph differ. 80 px:
    # grid sizes no other test builds, so the cache starts cold.
    model = timm.create_model("equivit_disc_tiny_patch16_224", num_classes=3, img_size=80,
                              depth=1).eval()
    x = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)  # check_trace=True: raises if the graphs diverge
        torch.testing.assert_close(traced(x.flip(0)), model(x.flip(0)))
