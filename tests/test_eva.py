"""The kaiko eva door against eva's contract (kaiko-eva 0.4.5).

Built the way eva builds it: ``eva.core.models.wrappers.ModelFromFunction(path=..., arguments=...)``
(``eva/core/models/wrappers/from_function.py``) and from the YAML configs of ``docs/eva/``,
parsed and instantiated with eva's own classes in eva's parser mode (``omegaconf``). Without
``out_indices``: ``(B, D)`` equal to ``load_encoder``'s; with it: the maps of timm's
``features_only`` model that eva's ``TimmModel`` builds (``eva/vision/models/wrappers/
from_timm.py``). CPU, tiny random-weight models (the ``small`` default only in the configs).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonargparse
import pytest
import timm
import torch
from conftest import REPO_ROOT
from eva.core import trainers
from eva.core.models import modules
from eva.core.models.wrappers import ModelFromFunction
from test_docs import python_blocks

from equivit_plugin import eva as eva_door
from equivit_plugin.eva import DEFAULT_MODEL, IntermediateFeatures, backbone
from equivit_plugin.models import (
    ModelLoadError,
    PooledEncoder,
    load_encoder,
    load_model,
    pooled_embedding,
    save_checkpoint,
)

RIC_TINY = "equivit_ric_tiny_patch16_224"  # every token kept: maps for segmentation
DISC_TINY = "equivit_disc_tiny_patch16_224"  # the inscribed disc only
PLAIN_TINY = "equivit_tiny_patch16_224"  # learned absolute position embedding: not invariant
CONFIGS = sorted((REPO_ROOT / "docs" / "eva").glob("*.yaml"))
CONFIG_ENV = ("MODEL_NAME", "CHECKPOINT", "WEIGHTS", "D4_AVERAGE", "IN_FEATURES", "OUTPUT_ROOT",
              "EMBEDDINGS_ROOT", "DATA_ROOT", "DOWNLOAD_DATA")
DATASETS = {"bach": "BACH", "crc": "CRC", "patch_camelyon": "PatchCamelyon"}


@pytest.fixture(scope="module")
def tiles() -> torch.Tensor:
    """Two normalised-tile stand-ins, ``(2, 3, 224, 224)``."""
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tile(tiles: torch.Tensor) -> torch.Tensor:
    """One of them, ``(1, 3, 224, 224)``: where the batch size does not matter (2 CPU cores)."""
    return tiles[:1]


def _eva(arguments: dict, **kwargs) -> ModelFromFunction:
    """The backbone as eva's ``ModelFromFunction`` builds it."""
    return ModelFromFunction(path=backbone, arguments=arguments, **kwargs)


def _turns(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` turned by 90 degrees and mirrored: the two generators of the 8 rotations/flips
    (invariance to both is invariance to all)."""
    return [torch.rot90(x, 1, dims=(-2, -1)), torch.flip(x, dims=(-1,))]


@torch.no_grad()
def test_pooled_features_are_load_encoders(tiles: torch.Tensor) -> None:
    model = _eva({"model_name": DISC_TINY, "seed": 0})
    assert isinstance(model.model, PooledEncoder) and not model.model.training
    features = model(tiles)
    reference, info = load_encoder(DISC_TINY, seed=0)
    assert features.shape == (2, info.embed_dim) == (2, 192)
    assert torch.equal(features, reference(tiles))


@torch.no_grad()
@pytest.mark.parametrize("out_indices", [2, [0, -1]])
def test_feature_maps_are_forward_intermediates_and_timms_features_only(
        tiles: torch.Tensor, out_indices: int | list[int]) -> None:
    model = _eva({"model_name": RIC_TINY, "seed": 0, "out_indices": out_indices})
    maps = model(tiles)
    assert isinstance(maps, list) and len(maps) == 2
    assert all(m.shape == (2, 192, 14, 14) for m in maps)
    # The unpruned model's own forward_intermediates (what the decoders' docs describe).
    net = load_encoder(RIC_TINY, seed=0)[0].net
    expected = net.forward_intermediates(tiles, indices=out_indices, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(maps, expected))
    # eva's TimmModel.load_model call (from_timm.py), with our weights: the same module.
    features_only = timm.create_model(model_name=RIC_TINY, pretrained=False, pretrained_cfg={},
                                      out_indices=out_indices, features_only=True)
    features_only.load_state_dict(model.model.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(maps, features_only(tiles)))


@torch.no_grad()
@pytest.mark.parametrize("name", [DISC_TINY, RIC_TINY])
def test_pooled_features_are_exactly_invariant_in_float64(tile: torch.Tensor,
                                                          name: str) -> None:
    model = _eva({"model_name": name, "seed": 0}).double()
    x = tile.double()
    # The module's output, and the float64 embedding it is made of.
    for embed in (model, lambda t: pooled_embedding(model.model.net, t)):
        features = embed(x)
        assert features.dtype == torch.float64  # only bf16/fp16 outputs are upcast
        errors = [(embed(turned) - features).abs().max().item() for turned in _turns(x)]
        assert max(errors) < 1e-10, errors
        assert features.abs().max() > 0.1  # not invariant by being zero


@torch.no_grad()
def test_pooled_features_are_invariant_in_float32(tile: torch.Tensor) -> None:
    model = _eva({"model_name": DISC_TINY, "seed": 0})
    features = model(tile)
    assert max((model(t) - features).abs().max().item() for t in _turns(tile)) < 1e-5


@torch.no_grad()
def test_d4_average_makes_any_model_invariant(tile: torch.Tensor) -> None:
    # float32: 8 views per tile in float64 cost more than the rest of this file's forwards.
    plain = _eva({"model_name": PLAIN_TINY, "seed": 0})
    averaged = _eva({"model_name": PLAIN_TINY, "seed": 0, "d4_average": True})
    # The learned position table breaks invariance; averaging over the 8 views restores it.
    assert max((plain(t) - plain(tile)).abs().max().item() for t in _turns(tile)) > 1e-3
    assert max((averaged(t) - averaged(tile)).abs().max().item() for t in _turns(tile)) < 1e-5


@torch.no_grad()
def test_feature_maps_turn_with_the_tile(tile: torch.Tensor) -> None:
    model = _eva({"model_name": RIC_TINY, "seed": 0, "out_indices": [4, -1]}).double()
    x = tile.double()
    maps, turned = model(x), model(torch.rot90(x, 1, dims=(-2, -1)))
    assert all((torch.rot90(m, 1, dims=(-2, -1)) - t).abs().max() < 1e-10
               for m, t in zip(maps, turned))


@torch.no_grad()
def test_a_checkpoint_loads_with_its_architecture(tmp_path: Path, tile: torch.Tensor) -> None:
    net, info = load_model(RIC_TINY, num_classes=4, seed=3)
    path = save_checkpoint(tmp_path / "ric.pt", net, info.name, model_kwargs=info.model_kwargs)
    model = _eva({"checkpoint": str(path)})
    assert torch.equal(model(tile), pooled_embedding(net, tile))
    assert torch.equal(_eva({"checkpoint": str(path), "model_name": RIC_TINY})(tile),
                       pooled_embedding(net, tile))
    maps = backbone(checkpoint=path, out_indices=[1])(tile)
    assert torch.equal(maps[0], net.forward_intermediates(tile, indices=[1],
                                                          intermediates_only=True)[0])
    with pytest.raises(ModelLoadError, match=r"holds equivit_ric_tiny_patch16_224, but "
                                             r"model_name='equivit_disc_tiny_patch16_224'"):
        backbone(model_name=DISC_TINY, checkpoint=path)


@torch.no_grad()
@pytest.mark.parametrize("out_indices", [None, [2]])
def test_evas_own_checkpoint_path_loads_the_modules_state_dict(
        tmp_path: Path, tile: torch.Tensor, out_indices: list[int] | None) -> None:
    saved = backbone(RIC_TINY, seed=0, out_indices=out_indices)
    torch.save(saved.state_dict(), tmp_path / "state.pt")
    arguments = {"model_name": RIC_TINY, "seed": 1, "out_indices": out_indices}
    loaded = _eva(arguments, checkpoint_path=str(tmp_path / "state.pt"))
    fresh = _eva(arguments)
    expected, got, other = saved(tile), loaded(tile), fresh(tile)
    if out_indices is not None:
        expected, got, other = expected[0], got[0], other[0]
    assert torch.equal(got, expected) and not torch.equal(other, expected)


@torch.no_grad()
def test_a_foundation_models_maps_come_from_its_timm_backbone(tile: torch.Tensor) -> None:
    # weights="random": the card's architecture (Kaiko's ViT-S/16) without its weights file.
    maps = backbone("kaiko-vits16", weights="random", seed=0, out_indices=1)
    assert isinstance(maps, IntermediateFeatures)
    assert [m.shape for m in maps(tile)] == [(1, 384, 14, 14)]


@pytest.mark.parametrize(("arguments", "error", "message"), [
    ({"model_name": "not_a_model"}, ModelLoadError, "model_name='not_a_model' is neither"),
    ({"model_name": 3}, ValueError, "model_name= must be a model name"),
    ({"model_name": "models/x.pt"}, ValueError, "pass it as checkpoint="),
    ({"checkpoint": "missing.pt"}, FileNotFoundError, "checkpoint='missing.pt': no such file"),
    ({"checkpoint": "missing.pt", "weights": "w.pth"}, ValueError, "weights= is for a "),
    ({"model_name": RIC_TINY, "weights": "w.pth"}, ModelLoadError, "weights= 'w.pth' is for"),
    ({"model_name": RIC_TINY, "out_indices": 0}, ValueError, "out_indices=0 asks for the last"),
    ({"model_name": RIC_TINY, "out_indices": [10]}, ValueError,
     r"out_indices=\[10\]: 10 is not a block of a 10-block model"),
    ({"model_name": RIC_TINY, "out_indices": "1"}, ValueError, "out_indices= must be an int"),
    ({"model_name": RIC_TINY, "out_indices": []}, ValueError, "out_indices= must be an int"),
    ({"model_name": RIC_TINY, "out_indices": True}, ValueError, "out_indices= must be an int"),
    ({"model_name": DISC_TINY, "out_indices": 1}, ValueError,
     "only to the 156 of 196 patch tokens inside the tile's inscribed disc"),
    ({"model_name": RIC_TINY, "d4_average": "false"}, ValueError, "d4_average= must be true or"),
    ({"model_name": RIC_TINY, "d4_average": True, "out_indices": 1}, ValueError,
     "d4_average=True averages"),
    ({"model_name": RIC_TINY, "seed": "0"}, ValueError, "seed= must be an integer"),
])
def test_errors_are_one_line_and_name_the_argument(arguments: dict, error: type[Exception],
                                                   message: str) -> None:
    with pytest.raises(error, match=message) as caught:
        _eva(arguments)
    assert "\n" not in str(caught.value)


def test_the_default_model_and_the_configs_default_agree() -> None:
    # IN_FEATURES' default in eva's configs (384) is the default model's width.
    assert DEFAULT_MODEL == "equivit_disc_small_patch16_224"
    assert load_model(DEFAULT_MODEL)[1].embed_dim == 384
    assert eva_door.__all__ == ["DEFAULT_MODEL", "IntermediateFeatures", "backbone"]


def _parse_config(path: Path):
    """The config's trainer and model sections parsed and instantiated as eva's CLI does
    (``jsonargparse.CLI(Interface, parser_mode="omegaconf")``, ``eva/core/cli/cli.py``); the
    data section stays a dict (its classes need eva's vision extra)."""
    parser = jsonargparse.ArgumentParser(parser_mode="omegaconf", exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_argument("--trainer", type=trainers.Trainer)
    parser.add_argument("--model", type=modules.ModelModule)
    parser.add_argument("--data", type=dict)
    config = parser.parse_args(["--config", str(path)])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return config, instantiate(config)


@torch.no_grad()
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_the_configs_build_a_working_backbone(config: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              tiles: torch.Tensor) -> None:
    for name in CONFIG_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # the trainer's log folder is relative
    parsed, built = _parse_config(config)
    writer = next(c for c in built.trainer.callbacks
                  if type(c).__name__ == "ClassificationEmbeddingsWriter")
    assert isinstance(writer._backbone, ModelFromFunction)
    encoder = writer._backbone.model
    assert isinstance(encoder, PooledEncoder) and not encoder.d4_average
    assert len(encoder.net.blocks) == 10 and encoder.net.embed_dim == 384  # disc small
    # What the writer stores for a batch (ClassificationEmbeddingsWriter._get_embeddings).
    embeddings = writer._get_embeddings(tiles)
    assert torch.equal(embeddings, pooled_embedding(encoder.net, tiles))
    assert embeddings.shape == (2, int(built.model.head["init_args"]["in_features"]))
    assert f"embeddings/{DEFAULT_MODEL}/" in writer._output_dir
    task = config.stem.removeprefix("equivit_disc_small_")
    predict = parsed.data["init_args"]["datasets"]["predict"][0]  # eva's, as eva wrote it
    assert predict["class_path"] == f"eva.vision.datasets.{DATASETS[task]}"
    assert predict["init_args"]["root"] == f"./data/{task}"


@torch.no_grad()
def test_the_config_takes_a_checkpoint_and_d4_average_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tile: torch.Tensor) -> None:
    net, info = load_model(RIC_TINY, num_classes=4, seed=5)
    path = save_checkpoint(tmp_path / "ric.pt", net, info.name, model_kwargs=info.model_kwargs)
    for name in CONFIG_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODEL_NAME", RIC_TINY)
    monkeypatch.setenv("CHECKPOINT", str(path))
    monkeypatch.setenv("D4_AVERAGE", "true")
    monkeypatch.setenv("IN_FEATURES", "192")
    monkeypatch.chdir(tmp_path)
    _, built = _parse_config(REPO_ROOT / "docs" / "eva" / "equivit_disc_small_bach.yaml")
    writer = next(c for c in built.trainer.callbacks
                  if type(c).__name__ == "ClassificationEmbeddingsWriter")
    assert writer._backbone.model.d4_average is True
    expected = load_encoder(path, d4_average=True)[0](tile)
    embeddings = writer._get_embeddings(tile)
    assert torch.equal(embeddings, expected)
    assert embeddings.shape == (1, int(built.model.head["init_args"]["in_features"])) == (1, 192)
    assert f"embeddings/{RIC_TINY}/bach" in writer._output_dir


def test_importing_the_door_does_not_import_eva() -> None:
    code = ("import sys, equivit_plugin.eva\n"
            "print(sorted(m for m in ('eva', 'lightning', 'jsonargparse') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_the_pages_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = python_blocks(REPO_ROOT / "docs" / "eva.md")
    assert code, "no python examples in docs/eva.md"
    monkeypatch.chdir(tmp_path)  # the example writes its checkpoint to the working directory
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(code, "docs/eva.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[:3] == ["(2, 192) True", "[(2, 192, 14, 14), (2, 192, 14, 14)]", "(2, 192)"]
    assert printed[3] == "mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225)"
    assert (tmp_path / "equivit_ric_tiny.pt").is_file()


def test_eva_predict_fit_runs_the_bach_config_up_to_the_dataset(tmp_path: Path) -> None:
    """The documented command itself: eva's CLI parses the whole config (trainer, model with
    this backbone, data) and stops only where the BACH images should be (no download here)."""
    import os
    import shutil

    eva_cli = shutil.which("eva", path=str(Path(sys.executable).parent))
    assert eva_cli is not None, "kaiko-eva's `eva` command is not installed"
    config = REPO_ROOT / "docs" / "eva" / "equivit_disc_small_bach.yaml"
    environment = {**os.environ, "DATA_ROOT": str(tmp_path / "bach"),
                   "OUTPUT_ROOT": str(tmp_path / "out"),
                   "EMBEDDINGS_ROOT": str(tmp_path / "embeddings")}
    done = subprocess.run([eva_cli, "predict_fit", "--config", str(config)], cwd=tmp_path,
                          env=environment, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"Dataset not found at '{tmp_path / 'bach'}'" in output, output[-3000:]
