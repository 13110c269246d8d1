"""Tests of equivit_plugin.equivariance: rotations, token/feature equivariance, sweeps, plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed

import equivit_plugin  # noqa: F401  (registers the timm models)
from equivit_plugin.equivariance import (
    D4_NAMES,
    D4_TRANSFORMS,
    RotationSweep,
    d4_sweep,
    d4_token_similarity,
    d4_transform,
    feature_invariance,
    mutual_knn_similarity,
    plot_accuracy_polar,
    plot_similarity_vs_angle,
    prediction_agreement,
    rotate,
    rotation_sweep,
    token_grid,
    token_similarity,
)

SMALL = {"img_size": 64, "depth": 2, "num_classes": 3}


def _smooth_images(n: int, size: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random but spatially smooth images (upsampled noise), ``(n, 3, size, size)``."""
    coarse = torch.randn(n, 3, size // 8, size // 8, dtype=torch.float64)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).to(dtype)


@pytest.fixture(scope="module")
def equivit() -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model("equivit_tiny_patch16_224", **SMALL).eval()


@pytest.fixture(scope="module")
def equivit_ri() -> torch.nn.Module:
    torch.manual_seed(2)
    return timm.create_model("equivit_ri_tiny_patch16_224", **SMALL).eval()


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    torch.manual_seed(3)
    return timm.create_model("vit_tiny_patch16_224", **SMALL).eval()


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("angle,k", [(0, 0), (90, 1), (180, 2), (270, 3), (-90, 3), (450.0, 1),
                                     (360, 0), (-180, 2)])
def test_rotate_multiples_of_90_are_exactly_rot90(angle: float, k: int) -> None:
    x = torch.randn(2, 3, 12, 12)
    assert torch.equal(rotate(x, angle), torch.rot90(x, k, dims=(-2, -1)))
    rect = torch.arange(2 * 5 * 7).reshape(2, 5, 7)  # non-square, integer: still exact
    assert torch.equal(rotate(rect, angle), torch.rot90(rect, k, dims=(-2, -1)))


@pytest.mark.parametrize("angle,k", [(90 - 1e-4, 1), (90 + 1e-4, 1), (180 - 1e-4, 2),
                                     (-90 + 1e-4, 3)])
def test_bilinear_path_near_90_matches_rot90(angle: float, k: int) -> None:
    x = _smooth_images(2, 32, torch.float64)
    out = rotate(x, angle)
    assert out.shape == x.shape and out.dtype == x.dtype
    expected = torch.rot90(x, k, dims=(-2, -1))
    assert not torch.equal(out, expected)  # it really went through grid_sample
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("angle", [30.0, -45.0, 137.0])
def test_rotate_matches_analytic_rotation_counter_clockwise(angle: float) -> None:
    size, c = 33, 16.0
    v = torch.arange(size, dtype=torch.float64)[:, None] - c  # down
    u = torch.arange(size, dtype=torch.float64)[None, :] - c  # right

    def f(uu: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        return torch.sin(0.3 * uu) + torch.cos(0.2 * vv) + 0.005 * uu * vv

    theta = math.radians(angle)
    # Counter-clockwise as displayed: output offset (u, v) shows source offset R^-1 (u, v).
    cos, sin = math.cos(theta), math.sin(theta)
    expected = f(cos * u - sin * v, sin * u + cos * v)
    out = rotate(f(u, v), angle)
    inside = (u**2 + v**2) <= (c - 1) ** 2
    assert (out - expected)[inside].abs().max() < 0.03
    # The opposite direction is far off: the test can tell clockwise from counter-clockwise.
    assert (rotate(f(u, v), -angle) - expected)[inside].abs().max() > 0.3


def test_rotate_padding_only_affects_corners() -> None:
    x = _smooth_images(1, 32, torch.float64)
    reflect, zeros = rotate(x, 45), rotate(x, 45, padding_mode="zeros")
    r = torch.arange(32, dtype=torch.float64) - 15.5
    inside = (r[:, None] ** 2 + r[None, :] ** 2) <= 15.0**2
    torch.testing.assert_close(reflect[..., inside], zeros[..., inside])
    assert (reflect - zeros)[..., ~inside].abs().max() > 1e-3
    assert rotate(torch.randn(1, 16, 24), 20).shape == (1, 16, 24)
    with pytest.raises(TypeError, match="floating point"):
        rotate(torch.zeros(4, 4, dtype=torch.uint8), 30)


def test_d4_is_a_group_of_eight_distinct_transforms() -> None:
    x = torch.randn(1, 2, 5, 5)  # random: no symmetry, so distinct transforms differ
    outputs = [fn(x) for _, fn in D4_TRANSFORMS]
    assert len(D4_TRANSFORMS) == 8 and len(set(D4_NAMES)) == 8
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.equal(outputs[i], outputs[j]), (D4_NAMES[i], D4_NAMES[j])
    assert torch.equal(d4_transform("rot0")(x), x)

    def index_of(y: torch.Tensor) -> int:
        matches = [i for i, out in enumerate(outputs) if torch.equal(out, y)]
        assert len(matches) == 1
        return matches[0]

    table = [[index_of(g(h(x))) for _, h in D4_TRANSFORMS] for _, g in D4_TRANSFORMS]
    for row in table:  # closure + cancellation: every row and column is a permutation
        assert sorted(row) == list(range(8))
    for j in range(8):
        assert sorted(table[i][j] for i in range(8)) == list(range(8))
    assert all(0 in row for row in table)  # every element has an inverse
    # rot90 composed with itself is rot180; a flip is its own inverse.
    assert table[D4_NAMES.index("rot90")][D4_NAMES.index("rot90")] == D4_NAMES.index("rot180")
    assert table[D4_NAMES.index("flip")][D4_NAMES.index("flip")] == 0
    assert torch.equal(d4_transform("flip_rot90")(x), torch.rot90(x.flip(-1), 1, (-2, -1)))
    with pytest.raises(ValueError, match="rot45"):
        d4_transform("rot45")


# ------------------------------------------------------------------------- token metrics


def test_token_grid_handles_every_output_layout(vit: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    flat = PatchEmbed(img_size=64, patch_size=16, embed_dim=8)
    nchw = PatchEmbed(img_size=64, patch_size=16, embed_dim=8, flatten=False)
    nhwc = PatchEmbed(img_size=64, patch_size=16, embed_dim=8, output_fmt="NHWC")
    nchw.load_state_dict(flat.state_dict())
    nhwc.load_state_dict(flat.state_dict())
    expected = flat.proj(x)
    for embed in (flat, nchw, nhwc):
        assert torch.equal(token_grid(embed, x), expected)
    assert token_grid(vit, x).shape == (2, 192, 4, 4)
    torch.testing.assert_close(token_grid(vit, x), vit.patch_embed.proj(x))


def test_token_similarity_exact_for_equivit_and_low_for_vit(
    equivit: torch.nn.Module, vit: torch.nn.Module
) -> None:
    x = _smooth_images(3)
    angles = [0, 90, 180, 270]
    equi = token_similarity(equivit, x, angles)
    base = token_similarity(vit, x, angles)
    for angle in angles:
        assert equi[float(angle)]["min"] >= 0.99999
        assert equi[float(angle)]["num_tokens"] == 3 * 16
    for angle in (90, 180, 270):
        assert base[float(angle)]["mean"] < 0.9
    assert base[0.0]["min"] >= 0.99999

    d4 = d4_token_similarity(equivit, x)
    assert list(d4) == D4_NAMES
    assert min(s["min"] for s in d4.values()) >= 0.99999
    d4_vit = d4_token_similarity(vit, x)
    assert max(d4_vit[name]["mean"] for name in D4_NAMES[1:]) < 0.9


class _PixelTokens(torch.nn.Module):
    """Each pixel is a token (patch size 1): perfectly equivariant at every angle."""

    patch_size = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_token_similarity_off_grid_angles_use_the_circular_mask() -> None:
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) + 0.5
    result = token_similarity(_PixelTokens(), x, [0, 30, 45])
    for stats in result.values():
        assert stats["min"] > 1 - 1e-12
    assert result[0.0]["num_tokens"] == 2 * 256
    # 16x16 grid: centres within radius 8 - 1 = 7 of (7.5, 7.5).
    r = torch.arange(16, dtype=torch.float64) - 7.5
    inner = int(((r[:, None] ** 2 + r[None, :] ** 2) <= 49).sum())
    assert result[30.0]["num_tokens"] == result[45.0]["num_tokens"] == 2 * inner < 2 * 256


# ---------------------------------------------------------------------------- mutual kNN


def test_mutual_knn_similarity() -> None:
    generator = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 16, generator=generator)
    assert mutual_knn_similarity(feats, feats, k=10) == 1.0
    assert mutual_knn_similarity(feats, 3.0 * feats.numpy(), k=5) == 1.0  # cosine: scale-free
    shuffled = feats[torch.randperm(200, generator=generator)]
    assert mutual_knn_similarity(feats, shuffled, k=10) < 0.2
    with pytest.raises(ValueError, match=r"k=200.*N=200"):
        mutual_knn_similarity(feats, feats, k=200)
    with pytest.raises(ValueError, match="same samples"):
        mutual_knn_similarity(feats, feats[:10], k=3)


def test_mutual_knn_similarity_hand_computed() -> None:
    def on_circle(degrees: list[float]) -> np.ndarray:
        rad = np.radians(degrees)
        return np.stack([np.cos(rad), np.sin(rad)], axis=1)

    # Nearest neighbours in A: 0<->1, 2<->3. In B: 0->1, 1->0, 2->1, 3->2. Agreement 3/4.
    a = on_circle([0, 10, 100, 110])
    b = on_circle([0, 10, 100, 200])
    assert mutual_knn_similarity(a, b, k=1) == pytest.approx(0.75)


# ------------------------------------------------------------------------------- sweeps


def _quadrant_images() -> tuple[torch.Tensor, np.ndarray]:
    """A bright blob in the top-left, top-right, bottom-left, bottom-right quadrant."""
    images = torch.zeros(4, 1, 8, 8)
    for i, (row, col) in enumerate([(1, 1), (1, 6), (6, 1), (6, 6)]):
        images[i, 0, row, col] = 1.0
    return images, np.array([1, 1, 0, 0])  # label: 1 when the blob is in the top half


def _top_half_brighter(x: torch.Tensor) -> torch.Tensor:
    return (x[..., :4, :].sum(dim=(1, 2, 3)) > x[..., 4:, :].sum(dim=(1, 2, 3))).long()


def test_rotation_sweep_hand_computed() -> None:
    images, labels = _quadrant_images()
    sweep = rotation_sweep(_top_half_brighter, images, labels, angles=[0, 90, 180, 270],
                           batch_size=3)
    # Counter-clockwise 90: TL->BL, TR->TL, BL->BR, BR->TR, so predictions are [0, 1, 0, 1].
    np.testing.assert_array_equal(
        sweep.predictions, [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 1], [1, 0, 1, 0]])
    np.testing.assert_allclose(sweep.accuracy, [1.0, 0.5, 0.0, 0.5])
    np.testing.assert_allclose(sweep.agreement, [1.0, 0.5, 0.0, 0.5])
    assert sweep.mean == pytest.approx(0.5)
    assert sweep.std == pytest.approx(math.sqrt(0.125))
    assert sweep.angles == [0.0, 90.0, 180.0, 270.0] and sweep.names is None

    d4 = d4_sweep(_top_half_brighter, images, labels)
    assert d4.names == D4_NAMES and d4.predictions.shape == (8, 4)
    acc = dict(zip(D4_NAMES, d4.accuracy))
    assert acc["rot0"] == acc["flip"] == 1.0  # a left-right mirror keeps top on top
    assert acc["rot180"] == acc["flip_rot180"] == 0.0
    assert d4.angles == [0.0, 90.0, 180.0, 270.0] * 2


def test_rotation_sweep_with_image_blind_predictor() -> None:
    images = torch.randn(10, 3, 16, 16)
    labels = torch.tensor([1, 0, 1, 1, 2, 1, 0, 1, 2, 1])

    def constant_logits(x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.0, 1.0, 0.5]).expand(x.shape[0], 3)

    sweep = rotation_sweep(constant_logits, images, labels, batch_size=4)
    assert isinstance(sweep, RotationSweep)
    assert sweep.angles == [float(a) for a in range(0, 360, 30)]
    np.testing.assert_array_equal(sweep.accuracy, np.full(12, 0.6))
    np.testing.assert_array_equal(sweep.agreement, np.ones(12))
    assert sweep.std == pytest.approx(0.0, abs=1e-12) and sweep.mean == pytest.approx(0.6)
    assert sweep.to_dict()["accuracy"] == [0.6] * 12
    with pytest.raises(ValueError, match="labels"):
        rotation_sweep(constant_logits, images, labels[:3])


def test_prediction_agreement() -> None:
    preds = np.array([[0, 1, 2, 3], [0, 1, 2, 0], [3, 2, 1, 0]])
    np.testing.assert_allclose(prediction_agreement(preds), [1.0, 0.75, 0.0])
    np.testing.assert_allclose(prediction_agreement(torch.from_numpy(preds)), [1.0, 0.75, 0.0])


# ------------------------------------------------------------------------------ invariance


def test_feature_invariance_of_rotation_invariant_model(
    equivit_ri: torch.nn.Module, vit: torch.nn.Module
) -> None:
    x = _smooth_images(2)
    equivit_ri.train()
    result = feature_invariance(equivit_ri, x)
    assert equivit_ri.training  # mode restored
    equivit_ri.eval()
    assert set(result) == {"pooled", "logits"}
    for output in ("pooled", "logits"):
        assert list(result[output]) == D4_NAMES
        for stats in result[output].values():
            assert stats["max_abs_diff"] < 1e-4
            assert stats["min_cosine"] > 0.99999
        assert result[output]["rot0"]["ref_max_abs"] > 1e-2  # not trivially zero outputs
    baseline = feature_invariance(vit, x)
    assert max(s["max_abs_diff"] for s in baseline["pooled"].values()) > 1e-2


# ----------------------------------------------------------------------------------- plots


def test_plots_show_the_measured_values(tmp_path) -> None:
    from PIL import Image

    from equivit_plugin.equivariance import accuracy_polar_figure, similarity_vs_angle_figure

    images, labels = _quadrant_images()
    sweeps = {
        "toy": rotation_sweep(_top_half_brighter, images, labels, angles=[0, 270, 90, 180]),
        "blind": rotation_sweep(lambda x: torch.ones(x.shape[0]), images, labels,
                                angles=[0, 90, 180, 270]),
    }
    polar = accuracy_polar_figure(sweeps).axes[0]
    assert [line.get_label().split(" (")[0] for line in polar.get_lines()] == ["toy", "blind"]
    for line, sweep in zip(polar.get_lines(), sweeps.values()):
        order = np.argsort(sweep.angles)
        angles = np.radians(np.asarray(sweep.angles)[order])
        np.testing.assert_allclose(line.get_xdata(), np.append(angles, angles[0] + 2 * np.pi))
        accuracy = np.asarray(sweep.accuracy)[order]
        np.testing.assert_allclose(line.get_ydata(), np.append(accuracy, accuracy[0]))
    assert sweeps["toy"].accuracy.min() < sweeps["toy"].accuracy.max()  # the lines differ

    results = {
        "a": {0.0: {"mean": 1.0, "min": 1.0}, 45.0: {"mean": 0.9, "min": 0.5}},
        "b": {"45.0": {"mean": 0.2, "min": -0.1}, "0.0": {"mean": 1.0, "min": 1.0}},  # JSON keys
    }
    axes = similarity_vs_angle_figure(results).axes[0]
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
             for line in axes.get_lines()}
    assert drawn == {"a mean": ([0.0, 45.0], [1.0, 0.9]), "a min": ([0.0, 45.0], [1.0, 0.5]),
                     "b mean": ([0.0, 45.0], [1.0, 0.2]), "b min": ([0.0, 45.0], [1.0, -0.1])}

    polar_png = plot_accuracy_polar(sweeps, tmp_path / "nested" / "polar.png")
    lines_png = plot_similarity_vs_angle(results, tmp_path / "more" / "lines.png")
    for path in (polar_png, lines_png):
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 300
            pixels = np.asarray(image.convert("RGB"))
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn, not a blank canvas
    assert not list(tmp_path.rglob(".*.tmp*"))  # atomic: no temporary file left behind
    with pytest.raises(ValueError, match="no sweeps"):
        accuracy_polar_figure({})
