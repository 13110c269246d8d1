"""The Equi-ViT family: registry, rotation invariance, checkpoints, MONAI network, export."""

from __future__ import annotations

import io

import pytest
import timm
import torch

import equivit_plugin  # noqa: F401  (registers the models)
from equivit_plugin import load_vit_weights
from equivit_plugin.equivariance import D4_TRANSFORMS
from equivit_plugin.layers import ConvPatchEmbed, GMRPatchEmbed
from equivit_plugin.networks import EquiViT

D4 = {name: op for name, op in D4_TRANSFORMS if name != "rot0"}
SMALL = {"img_size": 64, "depth": 2, "num_classes": 3}


def test_registry_has_the_whole_family() -> None:
    names = set(timm.list_models("equivit*")) | set(timm.list_models("convvit*"))
    for size in ("tiny", "small", "base"):
        for variant in ("equivit", "equivit_ri", "equivit_rid", "equivit_ric", "equivit_disc",
                        "convvit"):
            assert f"{variant}_{size}_patch16_224" in names
    model = timm.create_model("equivit_small_patch16_224", num_classes=0)
    assert isinstance(model.patch_embed, GMRPatchEmbed) and model.num_features == 384
    assert model.patch_embed.proj.kernel_sizes == (6, 11)
    assert isinstance(timm.create_model("convvit_tiny_patch16_224").patch_embed, ConvPatchEmbed)


def _max_invariance_error(model, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits, feats = model(x), model.forward_head(model.forward_features(x), pre_logits=True)
        worst_logit = worst_feat = 0.0
        for op in D4.values():
            y = op(x)
            worst_logit = max(worst_logit, (model(y) - logits).abs().max().item())
            pooled = model.forward_head(model.forward_features(y), pre_logits=True)
            worst_feat = max(worst_feat, (pooled - feats).abs().max().item())
    return worst_logit, worst_feat


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_ri_model_invariant_to_rotations_and_flips_at_224(global_pool: str) -> None:
    model = timm.create_model("equivit_ri_tiny_patch16_224", num_classes=5,
                              global_pool=global_pool).eval()
    logit_err, feat_err = _max_invariance_error(model, torch.randn(2, 3, 224, 224))
    assert logit_err < 1e-4 and feat_err < 1e-4, (logit_err, feat_err)


def test_ri_model_invariant_on_real_tiles(crc_tiles: torch.Tensor) -> None:
    model = timm.create_model("equivit_ri_tiny_patch16_224", num_classes=9).eval()
    logit_err, feat_err = _max_invariance_error(model, crc_tiles[:4])
    assert logit_err < 1e-4 and feat_err < 1e-4, (logit_err, feat_err)


@pytest.mark.parametrize("name", ["equivit_tiny_patch16_224", "convvit_tiny_patch16_224",
                                  "vit_tiny_patch16_224"])
def test_models_with_absolute_positions_are_not_invariant(name: str) -> None:
    model = timm.create_model(name, **SMALL).eval()
    with torch.no_grad():  # a learned absolute table is not rotation-symmetric
        model.pos_embed.normal_(std=1.0)
    logit_err, _ = _max_invariance_error(model, torch.randn(2, 3, 64, 64))
    assert logit_err > 1e-3


def test_ri_model_with_dynamic_image_size() -> None:
    model = timm.create_model("equivit_ri_tiny_patch16_224", dynamic_img_size=True,
                              depth=2, num_classes=3).eval()
    for size in (64, 96, 256):
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            err = (model(torch.rot90(x, 1, (-2, -1))) - model(x)).abs().max().item()
        assert err < 1e-4, f"{size}x{size}: {err}"


def test_state_dict_round_trip_through_create_model_checkpoint_path(tmp_path) -> None:
    model = timm.create_model("equivit_tiny_patch16_224", **SMALL).eval()
    path = tmp_path / "equivit.pth"
    torch.save(model.state_dict(), path)
    loaded = timm.create_model("equivit_tiny_patch16_224", checkpoint_path=str(path),
                               **SMALL).eval()
    from_file = timm.create_model("equivit_tiny_patch16_224", pretrained=True,
                                  pretrained_cfg_overlay={"file": str(path), "num_classes": 3},
                                  **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(from_file(x), model(x), rtol=0, atol=0)


def test_load_vit_weights_copies_all_but_the_patch_embedding() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", img_size=96, depth=2, num_classes=3)
    model = timm.create_model("equivit_tiny_patch16_224", **SMALL)
    report = load_vit_weights(model, vit.state_dict())
    assert all(k.startswith("patch_embed.") for k in report.skipped)
    assert "pos_embed" in report.resized and report.resized["pos_embed"][1] == (1, 17, 192)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    assert torch.equal(model.head.weight, vit.head.weight)
    assert report.missing and all(k.startswith("patch_embed.") for k in report.missing)


def test_load_vit_weights_into_ri_model_skips_position_table_and_head(tmp_path) -> None:
    vit = timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=1000)
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": vit.state_dict()}, path)
    model = timm.create_model("equivit_ri_tiny_patch16_224", **SMALL)
    report = load_vit_weights(model, path)
    assert "radial" in report.skipped["pos_embed"]
    assert "shape" in report.skipped["head.weight"]
    assert "radial_pos_embed.weight" in report.missing and "head.weight" in report.missing
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_vit_weights(model, tmp_path / "nope.pth")


def test_monai_network_returns_logits_and_shares_timm_state_dict() -> None:
    net = EquiViT(in_channels=3, num_classes=4, img_size=64, variant="equivit_ri", size="tiny",
                  depth=2).eval()
    x = torch.randn(2, 3, 64, 64)
    out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4)
    twin = timm.create_model("equivit_ri_tiny_patch16_224", img_size=64, depth=2,
                             num_classes=4).eval()
    twin.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twin(x), net(x))
    assert EquiViT(num_classes=2, img_size=32, patch_size=8, depth=1)(
        torch.randn(1, 3, 32, 32)).shape == (1, 2)
    with pytest.raises(ValueError, match="'huge'"):
        EquiViT(size="huge")
    with pytest.raises(ValueError, match="'resnet'"):
        EquiViT(variant="resnet")


def test_single_channel_network() -> None:
    net = EquiViT(in_channels=1, num_classes=2, img_size=32, depth=1)
    assert net(torch.randn(1, 1, 32, 32)).shape == (1, 2)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net(torch.randn(1, 3, 32, 32))


def test_jit_trace_parity() -> None:
    model = timm.create_model("equivit_ri_tiny_patch16_224", **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), model(x))
        y = torch.rot90(x, 1, (-2, -1))
        torch.testing.assert_close(traced(y), model(y))


def test_torch_compile_fullgraph_parity() -> None:
    """fullgraph=True fails on any graph break (e.g. from kernel caching)."""
    model = timm.create_model("equivit_tiny_patch16_224", **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    model.train()
    compiled(x).sum().backward()
    assert model.patch_embed.proj.convs[0].weight.grad is not None


def test_torch_compile_inductor_patch_embedding() -> None:
    embed = GMRPatchEmbed(img_size=32, embed_dim=8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(embed)(x), embed(x), rtol=1e-5, atol=1e-5)


def test_onnx_export_parity() -> None:
    import onnxruntime  # dev extra

    model = timm.create_model("equivit_ri_tiny_patch16_224", **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}})
    session = onnxruntime.InferenceSession(buffer.getvalue())
    y = torch.randn(3, 3, 64, 64)
    (onnx_out,) = session.run(None, {"image": y.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(onnx_out), model(y), rtol=1e-4, atol=1e-4)
