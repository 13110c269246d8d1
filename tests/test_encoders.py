"""The foundation-model registry: every entry built, loaded from its released layout, embedded
and normalised as its card says, and refused with one line when the file is not its own.

``CARDS`` below is written from the models' cards and reference code (TRIDENT's encoder
factory, kaiko's hub code, Lunit's README, eva's backbones), independently of
``equivit_plugin.models.encoders``: the registry must agree with it. Models up to ViT-B are
tested at their real architecture with random weights; larger ones as a scaled-down copy of
the same architecture (the same constructor arguments, 2 blocks, width 192), and at full size
on the meta device (no memory), where their widths and token layout are checked.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file

from equivit_plugin.cli import format_encoders, main
from equivit_plugin.models import (
    EncoderSpec,
    ModelLoadError,
    encoder_names,
    get_encoder,
    load_model,
    normalise_batch,
    normalise_tile,
)
from equivit_plugin.models.encoders import Ref

REPO = Path(__file__).resolve().parents[1]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5,) * 3, (0.5,) * 3)

# name: (embedding rule, registers, token width, input side, (mean, std)) as the cards give them
CARDS = {
    "uni_v1": ("cls", 0, 1024, 224, IMAGENET),
    "uni_v2": ("cls", 8, 1536, 224, IMAGENET),
    "virchow": ("cls+mean", 0, 1280, 224, IMAGENET),
    "virchow2": ("cls+mean", 4, 1280, 224, IMAGENET),
    "hoptimus0": ("cls", 4, 1536, 224, ((0.707223, 0.578729, 0.703617),
                                        (0.211883, 0.230117, 0.177517))),
    "hoptimus1": ("cls", 4, 1536, 224, ((0.707223, 0.578729, 0.703617),
                                        (0.211883, 0.230117, 0.177517))),
    "gigapath": ("cls", 0, 1536, 224, IMAGENET),
    "phikon": ("cls", 0, 768, 224, IMAGENET),
    "phikon_v2": ("cls", 0, 1024, 224, IMAGENET),
    "kaiko-vits8": ("cls", 0, 384, 224, HALF),
    "kaiko-vits16": ("cls", 0, 384, 224, HALF),
    "kaiko-vitb8": ("cls", 0, 768, 224, HALF),
    "kaiko-vitb16": ("cls", 0, 768, 224, HALF),
    "kaiko-vitl14": ("cls", 4, 1024, 224, HALF),
    "lunit-vits8": ("cls", 0, 384, 224, ((0.70322989, 0.53606487, 0.66096631),
                                         (0.21716536, 0.26081574, 0.20723464))),
    "hibou_b": ("pooler_output", 4, 768, 224, ((0.7068, 0.5755, 0.722),
                                               (0.195, 0.2316, 0.1816))),
    "hibou_l": ("pooler_output", 4, 1024, 224, ((0.7068, 0.5755, 0.722),
                                                (0.195, 0.2316, 0.1816))),
    "midnight12k": ("cls+mean", 0, 1536, 224, HALF),
    "conch_v1": ("encode_image", 0, 512, 448, ((0.48145466, 0.4578275, 0.40821073),
                                               (0.26862954, 0.26130258, 0.27577711))),
}
TRIDENT_NAMES = {"uni_v1", "uni_v2", "virchow", "virchow2", "hoptimus0", "hoptimus1",
                 "gigapath", "phikon", "phikon_v2", "kaiko-vits8", "kaiko-vits16",
                 "kaiko-vitb8", "kaiko-vitb16", "kaiko-vitl14", "lunit-vits8", "hibou_b",
                 "hibou_l", "midnight12k", "conch_v1"}
TIMM = [n for n in encoder_names() if get_encoder(n).layout == "timm"]
TRANSFORMERS = [n for n in encoder_names() if get_encoder(n).layout == "transformers"]
REAL_SIZE_WIDTH = 768  # up to ViT-B the tests build the real architecture
SMALL = {"depth": 2, "embed_dim": 192, "num_heads": 3}

# The transformers configurations as the released config.json files have them (architecture
# keys only); the scaled-down copies keep everything but depth and width.
HF_CONFIGS = {
    "phikon": ("vit", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "intermediate_size": 3072, "image_size": 224, "patch_size": 16,
                       "qkv_bias": True}),
    "phikon_v2": ("dinov2", {"hidden_size": 1024, "num_hidden_layers": 24,
                             "num_attention_heads": 16, "image_size": 224, "patch_size": 16,
                             "layerscale_value": 1e-5}),
    "midnight12k": ("dinov2", {"hidden_size": 1536, "num_hidden_layers": 40,
                               "num_attention_heads": 24, "image_size": 224, "patch_size": 14,
                               "use_swiglu_ffn": True}),
    "hibou_b": ("dinov2_with_registers", {"hidden_size": 768, "num_hidden_layers": 12,
                                          "num_attention_heads": 12, "image_size": 224,
                                          "patch_size": 14, "num_register_tokens": 4}),
    "hibou_l": ("dinov2_with_registers", {"hidden_size": 1024, "num_hidden_layers": 24,
                                          "num_attention_heads": 16, "image_size": 224,
                                          "patch_size": 14, "num_register_tokens": 4}),
}

# Hibou is released with its own modelling code (trust_remote_code=True): the test folder
# carries code of its own in the same way, a DINOv2 with registers under other class names.
HIBOU_CONFIG_CODE = '''
from transformers import Dinov2WithRegistersConfig


class HibouTestConfig(Dinov2WithRegistersConfig):
    model_type = "hibou_test"
'''
HIBOU_MODEL_CODE = '''
from transformers import Dinov2WithRegistersModel

from .configuration_hibou_test import HibouTestConfig


class HibouTestModel(Dinov2WithRegistersModel):
    config_class = HibouTestConfig
'''


def _resolve(kwargs: dict) -> dict:
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, Ref):
            module, _, name = value.path.rpartition(".")
            value = getattr(__import__(module, fromlist=[name]), name)
        out[key] = value
    return out


def spec_under_test(name: str) -> EncoderSpec:
    """The entry itself up to ViT-B; above, the same architecture scaled down."""
    spec = get_encoder(name)
    if spec.width <= REAL_SIZE_WIDTH:
        return spec
    if spec.layout == "timm":
        return dataclasses.replace(spec, kwargs={**spec.kwargs, **SMALL},
                                   width=SMALL["embed_dim"])
    return dataclasses.replace(spec, config={**spec.config, "hidden_size": 192}, width=192)


def _hf_model(name: str, spec: EncoderSpec) -> transformers.PreTrainedModel:
    model_type, values = HF_CONFIGS[name]
    values = dict(values)
    if spec.width != values["hidden_size"]:
        values.update(hidden_size=spec.width, num_hidden_layers=2, num_attention_heads=3)
    if model_type == "vit":
        # released with a pooler, which the card does not use (add_pooling_layer=False)
        return transformers.ViTModel(transformers.ViTConfig(**values), add_pooling_layer=True)
    if model_type == "dinov2":
        return transformers.Dinov2Model(transformers.Dinov2Config(**values))
    return transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(**values))


def write_released(name: str, spec: EncoderSpec, folder: Path, *, seed: int = 0
                   ) -> tuple[Path, torch.nn.Module]:
    """Random weights of the architecture, written as the model is released; returns the path
    a user passes to --weights and the independent reference model."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if spec.layout == "timm":
        net = timm.create_model(spec.architecture, **_resolve(dict(spec.kwargs))).eval()
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        file = folder / spec.weights_files[0]
        if file.suffix == ".safetensors":
            save_file(state, file)
        else:
            torch.save(state, file)
        return file, net
    model = _hf_model(name, spec).eval()
    if name.startswith("hibou"):
        (folder / "configuration_hibou_test.py").write_text(HIBOU_CONFIG_CODE)
        (folder / "modeling_hibou_test.py").write_text(HIBOU_MODEL_CODE)
        model.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type="hibou_test", architectures=["HibouTestModel"], auto_map={
            "AutoConfig": "configuration_hibou_test.HibouTestConfig",
            "AutoModel": "modeling_hibou_test.HibouTestModel"})
        (folder / "config.json").write_text(json.dumps(config))
    else:
        model.save_pretrained(folder)
    return folder, model


def reference_embedding(name: str, spec: EncoderSpec, reference: torch.nn.Module,
                        x: torch.Tensor) -> torch.Tensor:
    """The card's embedding, computed here from the reference model's own outputs."""
    rule, registers = CARDS[name][0], CARDS[name][1]
    with torch.no_grad():
        if spec.layout == "timm":
            tokens = reference.forward_features(x)
        else:
            output = reference(pixel_values=x)
            if rule == "pooler_output":
                return output.pooler_output
            tokens = output.last_hidden_state
    if rule == "cls":
        return tokens[:, 0]
    assert rule == "cls+mean"
    return torch.cat([tokens[:, 0], tokens[:, 1 + registers:].mean(1)], dim=-1)


def test_names_are_tridents_and_settings_are_the_cards() -> None:
    assert set(encoder_names()) == TRIDENT_NAMES
    for name, (rule, registers, width, size, (mean, std)) in CARDS.items():
        spec = get_encoder(name)
        assert (spec.embedding, spec.reg_tokens, spec.width, spec.input_size) == \
            (rule, registers, width, size), name
        assert spec.mean == pytest.approx(mean) and spec.std == pytest.approx(std), name
        assert spec.embed_dim == (2 * width if rule == "cls+mean" else width), name
        assert spec.licence and spec.weights_url and spec.sources, name


@pytest.mark.parametrize("name", TIMM)
def test_full_size_architecture_on_the_meta_device(name: str) -> None:
    """The real architecture (no memory): widths, registers and patch size of the card, and
    the scaled-down copy of the tests has the same parameters, block for block."""
    spec = get_encoder(name)
    with torch.device("meta"):
        full = timm.create_model(spec.architecture, **_resolve(dict(spec.kwargs)))
        small = timm.create_model(spec.architecture, **_resolve(dict(spec_under_test(name).kwargs)))
    assert full.embed_dim == spec.width
    assert full.num_prefix_tokens == 1 + CARDS[name][1]
    assert full.patch_embed.patch_size == (spec.patch_size, spec.patch_size)
    assert full.num_classes == 0

    def pattern(net: torch.nn.Module) -> set[str]:
        return {re.sub(r"blocks\.\d+\.", "blocks.N.", k) for k in net.state_dict()}

    assert pattern(full) == pattern(small)


@pytest.mark.parametrize("name", TIMM + TRANSFORMERS)
def test_released_layout_loads_and_embeds_as_the_card(name: str, tmp_path: Path) -> None:
    spec = spec_under_test(name)
    weights, reference = write_released(name, spec, tmp_path / name)
    # load_model takes the registry entry's name; a scaled copy goes in as a spec.
    from equivit_plugin.models import load_foundation_model

    encoder = load_foundation_model(spec, weights)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, spec.input_size, spec.input_size, generator=generator)
    expected = reference_embedding(name, spec, reference, x)
    with torch.no_grad():
        got = encoder(x)
        pooled = encoder.forward_head(encoder.forward_features(x), pre_logits=True)
    assert got.shape == (2, spec.embed_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, got)
    # The folder works as well as the file (timm), a file of the folder as well as the folder
    # (transformers).
    other = weights.parent if weights.is_file() else next(weights.glob("*.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(load_foundation_model(spec, other)(x), expected,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in TIMM + TRANSFORMERS
                                  if get_encoder(n).width <= REAL_SIZE_WIDTH])
def test_load_model_by_name_records_the_card(name: str, tmp_path: Path) -> None:
    spec = get_encoder(name)
    weights, _ = write_released(name, spec, tmp_path / name)
    net, info = load_model(name, weights=weights)
    assert (info.name, info.embed_dim, info.img_size, info.num_classes) == \
        (name, spec.embed_dim, spec.input_size, 0)
    assert (info.mean, info.std) == (spec.mean, spec.std)
    assert info.embedding == CARDS[name][0]
    assert not info.random_weights and len(info.checkpoint_sha256) == 64
    assert info.extra["encoder"]["embed_dim"] == spec.embed_dim


def test_normalisation_applied_is_the_cards() -> None:
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    for name, (*_, (mean, std)) in CARDS.items():
        spec = get_encoder(name)
        expected = (tiles / 255.0 - np.asarray(mean)) / np.asarray(std)
        batch = normalise_batch(torch.from_numpy(tiles), spec.mean, spec.std)
        np.testing.assert_allclose(batch.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(normalise_tile(tiles[0], spec.mean, spec.std), expected[0],
                                   atol=1e-5)


def test_random_weights_build_the_real_small_architecture() -> None:
    net, info = load_model("kaiko-vits16", weights="random", seed=3)
    again, _ = load_model("kaiko-vits16", weights="random", seed=3)
    assert info.random_weights and info.embed_dim == 384
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 again.state_dict().values()))


def _fails(name: str, weights: object, *patterns: str) -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_model(name, weights=weights)
    message = str(caught.value)
    assert "\n" not in message, message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)


def test_wrong_architecture_names_the_file_and_the_model(tmp_path: Path) -> None:
    small, _ = write_released("kaiko-vits16", get_encoder("kaiko-vits16"), tmp_path / "s")
    _fails("kaiko-vitb16", small, re.escape(str(small)), "not kaiko-vitb16's weights",
           "shapes differ")
    _fails("kaiko-vits8", small, "not kaiko-vits8's weights", r"patch_embed\.proj\.weight")
    _fails("virchow2", small, "not virchow2's weights", "missing keys")


def test_truncated_or_foreign_file_gets_one_line(tmp_path: Path) -> None:
    weights, _ = write_released("kaiko-vits16", get_encoder("kaiko-vits16"), tmp_path / "s")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights.read_bytes()[:4096])
    _fails("kaiko-vits16", truncated, re.escape(str(truncated)), "cannot read it as a state dict")
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    _fails("kaiko-vits16", text, re.escape(str(text)), "cannot read")
    _fails("kaiko-vits16", tmp_path / "absent.bin", "no such file or folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails("kaiko-vits16", empty, "no vits16.pth or model.safetensors")
    _fails("kaiko-vits16", None, "needs weights=")


def test_transformers_folder_problems_get_one_line(tmp_path: Path) -> None:
    folder, _ = write_released("phikon", get_encoder("phikon"), tmp_path / "phikon")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    _fails("phikon", no_config, re.escape(str(no_config)), "no config.json",
           "transformers folder")
    _fails("phikon", no_config / "model.safetensors", "no config.json")
    # another architecture's folder: phikon (ViT) given as Phikon-v2 (DINOv2)
    _fails("phikon_v2", folder, "config.json is not phikon_v2's", "model_type 'vit'")
    # Hibou with the wrong model family: a ViT folder of the right width has no registers
    vit = tmp_path / "vit14"
    transformers.ViTModel(transformers.ViTConfig(
        hidden_size=768, num_hidden_layers=1, num_attention_heads=12, patch_size=14,
        image_size=224)).save_pretrained(vit)
    _fails("hibou_b", vit, "not hibou_b's code|5 prefix tokens")
    # weights of a smaller model in a folder whose config says phikon
    wrong = tmp_path / "wrong"
    folder_copy = write_released("phikon", get_encoder("phikon"), wrong)[0]
    config = json.loads((folder_copy / "config.json").read_text())
    transformers.ViTModel(transformers.ViTConfig(
        **{**config, "num_hidden_layers": 1})).save_pretrained(tmp_path / "one_layer")
    (folder_copy / "model.safetensors").write_bytes(
        (tmp_path / "one_layer" / "model.safetensors").read_bytes())
    _fails("phikon", folder_copy, "not phikon's weights", "missing keys")


def test_hibou_pooler_must_be_the_class_token(tmp_path: Path) -> None:
    """The rule reads pooler_output as DINOv2's final-norm class token; a model whose
    pooler_output is something else is refused rather than embedded differently."""
    spec = spec_under_test("hibou_b")
    folder, _ = write_released("hibou_b", spec, tmp_path / "hibou")
    code = (folder / "modeling_hibou_test.py").read_text()
    code += '''

    def forward(self, pixel_values=None, **kwargs):
        output = super().forward(pixel_values=pixel_values, **kwargs)
        output.pooler_output = output.last_hidden_state.mean(1)
        return output
'''
    (folder / "modeling_hibou_test.py").write_text(code)
    with pytest.raises(Exception, match="pooler_output is not its final-norm class token"):
        from equivit_plugin.models import load_foundation_model

        load_foundation_model(spec, folder)


def test_conch_needs_its_package_and_uses_encode_image(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"weights")
    monkeypatch.setitem(sys.modules, "conch", None)
    _fails("conch_v1", weights, "needs the package conch", "pip install")

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(3, 512)

        def encode_image(self, x: torch.Tensor, proj_contrast: bool, normalize: bool
                         ) -> torch.Tensor:
            assert (proj_contrast, normalize) == (False, False)  # TRIDENT's and the card's
            return self.proj(x.mean((2, 3)))

    calls = []

    def create_model_from_pretrained(name: str, checkpoint_path: str):
        calls.append((name, checkpoint_path))
        return Tower(), None

    package = types.ModuleType("conch")
    custom = types.ModuleType("conch.open_clip_custom")
    custom.create_model_from_pretrained = create_model_from_pretrained
    monkeypatch.setitem(sys.modules, "conch", package)
    monkeypatch.setitem(sys.modules, "conch.open_clip_custom", custom)
    net, info = load_model("conch_v1", weights=weights)
    assert calls == [("conch_ViT-B-16", str(weights))]
    x = torch.randn(2, 3, 448, 448)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.backbone.encode_image(x, False, False))
    assert (info.img_size, info.embed_dim, info.embedding) == (448, 512, "encode_image")


def test_other_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="weights= .* is for the foundation models"):
        load_model("vit_tiny_patch16_224", weights=tmp_path / "w.bin")
    with pytest.raises(ModelLoadError, match="no classifier head"):
        load_model("kaiko-vits16", weights="random", num_classes=3)
    with pytest.raises(ModelLoadError, match="embeds 224 px tiles"):
        load_model("kaiko-vits16", weights="random", img_size=256)


def test_encoders_command_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    for name in encoder_names():
        spec = get_encoder(name)
        assert re.search(rf"^{re.escape(name)}\s+{spec.embed_dim}\s", out, re.M), name
        assert spec.weights_url in out
    assert main(["encoders", "virchow2"]) == 0
    out = capsys.readouterr().out
    assert "cls+mean" in out and "2560 dims (5 prefix tokens)" in out and "SwiGLUPacked" in out
    assert main(["encoders", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["midnight12k"]["embed_dim"] == 3072
    assert main(["encoders", "uni_v3"]) == 2
    assert "not a registered foundation model" in capsys.readouterr().err


def test_docs_table_is_the_registry() -> None:
    text = (REPO / "docs" / "distillation.md").read_text()
    assert format_encoders("markdown") in text


# -- the doors: extract-features, distill, rotation-report, TIAToolbox, by name -------------

@pytest.fixture(scope="module")
def kaiko_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A random ``vit_small_patch16_224`` state dict saved as ``pytorch_model.bin``: what the
    issue's bar gives ``--model kaiko-vits16 --weights``."""
    folder = tmp_path_factory.mktemp("kaiko")
    torch.manual_seed(11)
    net = timm.create_model("vit_small_patch16_224", num_classes=0).eval()
    torch.save(net.state_dict(), folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin", net


def _slide(shared_data: Path) -> Path:
    return shared_data / "slides" / "CMU-1-Small-Region.svs"


def _tiles_from_coords(slide: Path, h5: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The regions embedded for the first ``count`` cells, read back from the file's coords
    (level-0 top-left) and attributes (the context around each cell), and all features."""
    import h5py
    from tiatoolbox.wsicore.wsireader import WSIReader

    from equivit_plugin.features.reader import read_as_embedded

    with h5py.File(h5, "r") as handle:
        features, coords = handle["features"][:], handle["coords"][:]
        attrs = handle["coords"].attrs
        side, margin = int(attrs["context_size"]), int(attrs["context_margin_level0"])
        mpp = float(attrs["target_mpp"])
    reader = WSIReader.open(slide)
    # as embedded: read at TIAToolbox's level, resized in floating point (within OpenCV's
    # rounding of read_rect at the target resolution; this 0.499 um/px slide is resized)
    tiles = [read_as_embedded(reader, (int(x) - margin, int(y) - margin), side, mpp)
             for x, y in coords[:count]]
    return np.stack(tiles), features


def test_extract_features_by_name_equals_timm_with_the_cards_normalisation(
        kaiko_weights: tuple[Path, torch.nn.Module], shared_data: Path, tmp_path: Path) -> None:
    """The issue's bar: 384-wide features equal to timm's class token on the tiles read back
    from the coords, normalised with 0.5/0.5 (not ImageNet)."""
    weights, net = kaiko_weights
    slide = _slide(shared_data)
    assert main(["extract-features", str(slide), "--model", "kaiko-vits16", "--weights",
                 str(weights), "--out", str(tmp_path), "--workers", "0"]) == 0
    h5 = tmp_path / "h5_files" / f"{slide.stem}.h5"
    tiles, features = _tiles_from_coords(slide, h5, 12)
    assert features.shape[1] == 384 and len(features) > 12 and tiles.shape[1] == 224
    x = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        expected = net(x).numpy()
    np.testing.assert_allclose(features[:12], expected, atol=1e-4, rtol=1e-4)
    imagenet = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
                - torch.tensor(IMAGENET[0]).view(3, 1, 1)) / torch.tensor(IMAGENET[1]).view(3, 1, 1)
    with torch.no_grad():
        assert np.abs(net(imagenet).numpy() - features[:12]).max() > 1e-2  # it would differ
    import h5py

    with h5py.File(h5, "r") as handle:
        attrs = dict(handle["features"].attrs)
    assert attrs["encoder"] == "kaiko-vits16" and attrs["embedding"] == "cls"
    np.testing.assert_allclose(attrs["normalisation_mean"], [0.5] * 3)


def test_extract_features_bad_weights_is_one_line(shared_data: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "uni.bin"
    bad.write_bytes(b"\0" * 100)
    code = main(["extract-features", str(_slide(shared_data)), "--model", "uni_v1",
                 "--weights", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("equivit extract-features: error: --weights") or \
        err[0].startswith("equivit extract-features: error: --model"), err
    assert str(bad) in err[0] and "cannot read it as a state dict" in err[0]
    code = main(["extract-features", str(_slide(shared_data)), "--model", "uni_v1",
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "needs --weights" in capsys.readouterr().err


def test_distill_from_a_foundation_model_by_name(kaiko_weights: tuple[Path, torch.nn.Module],
                                                 shared_data: Path, tmp_path: Path) -> None:
    """``equivit distill --teacher kaiko-vits16 --teacher-weights W`` writes a student that
    records its teacher (name, embedding rule, normalisation) and that extract-features
    uses, normalised as the student was trained."""
    weights, _ = kaiko_weights
    student = tmp_path / "student.pt"
    assert main(["distill", "--teacher", "kaiko-vits16", "--teacher-weights", str(weights),
                 "--tiles", str(shared_data / "crc_tiles"), "--max-tiles", "8",
                 "--student", "equivit_disc_tiny_patch16_224", "--out", str(student),
                 "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress",
                 "--device", "cpu"]) == 0
    payload = torch.load(student, map_location="cpu", weights_only=True)
    teacher = payload["distilled_from"]
    assert (teacher["name"], teacher["embedding"], teacher["mean"], teacher["std"]) == \
        ("kaiko-vits16", "cls", [0.5] * 3, [0.5] * 3)
    # the student itself is normalised as it was trained: ImageNet, like every checkpoint of
    # the package (the bundle fine-tunes it with those inputs)
    assert payload["mean"] == list(IMAGENET[0]) and payload["model_kwargs"]["feature_dim"] == 384
    net, info = load_model(student)
    assert info.mean == IMAGENET[0] and info.embed_dim == 384
    out = tmp_path / "features"
    assert main(["extract-features", str(_slide(shared_data)), "--model", str(student),
                 "--out", str(out), "--workers", "0"]) == 0
    tiles, features = _tiles_from_coords(_slide(shared_data), out / "h5_files" /
                                         "CMU-1-Small-Region.h5", 4)
    assert tiles.shape[1] == 320  # a disc student sees a context whose disc covers the cell
    net, _ = load_model(student, dynamic_img_size=True)
    x = torch.from_numpy(np.stack([normalise_tile(t) for t in tiles])).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = net.forward_head(net.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_allclose(features[:4], expected, atol=1e-4, rtol=1e-4)


def test_rotation_report_takes_weights_after_their_model(
        kaiko_weights: tuple[Path, torch.nn.Module], shared_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    weights, _ = kaiko_weights
    assert main(["rotation-report", str(_slide(shared_data)), "--model", "kaiko-vits16",
                 "--weights", str(weights), "--model", "vit_tiny_patch16_224",
                 "--out", str(tmp_path), "--regions", "12", "--k", "3", "--angle-step", "90",
                 "--shifts", "--no-progress"]) == 0
    report = json.loads((tmp_path / "rotation_report.json").read_text())
    models = {m["label"]: m for m in report["models"]}
    assert set(models) == {"kaiko-vits16", "vit_tiny_patch16_224"}
    assert models["kaiko-vits16"]["data_config"]["mean"] == [0.5] * 3
    assert models["kaiko-vits16"]["checkpoint_sha256"] is not None
    capsys.readouterr()
    assert main(["rotation-report", str(_slide(shared_data)), "--weights", str(weights),
                 "--out", str(tmp_path)]) == 2
    assert "--weights must follow the --model" in capsys.readouterr().err


def test_tiatoolbox_encoder_by_name_normalises_as_the_card(
        kaiko_weights: tuple[Path, torch.nn.Module]) -> None:
    from tiatoolbox.models.engine.deep_feature_extractor import DeepFeatureExtractor

    from equivit_plugin.tiatoolbox import EquiViTEncoder, make_ioconfig

    weights, net = kaiko_weights
    encoder = EquiViTEncoder.create("kaiko-vits16", weights=weights)
    rng = np.random.default_rng(2)
    tiles = rng.integers(0, 256, size=(3, 224, 224, 3), dtype=np.uint8)
    out = DeepFeatureExtractor(model=encoder, batch_size=3).run(
        images=tiles, patch_mode=True, ioconfig=make_ioconfig())
    x = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        expected = net(x).numpy()
    np.testing.assert_allclose(np.asarray(out["features"]), expected, atol=1e-4, rtol=1e-4)
