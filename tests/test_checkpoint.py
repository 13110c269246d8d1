"""Self-describing checkpoints and the one model factory (load_model): round trip, half
precision, what ModelInfo reports, clear errors; the atomic-write helper."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
import torch

from equivit_plugin.models import (
    ModelLoadError,
    create_model,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from equivit_plugin.utils.atomic import atomic_save, atomic_write_json, default_file_mode

NAME = "equivit_ri_tiny_patch16_224"
KWARGS = {"img_size": 64, "depth": 1}


@pytest.fixture()
def model() -> torch.nn.Module:
    return create_model(NAME, num_classes=3, **KWARGS).eval()


@pytest.mark.parametrize("half", [False, True])
def test_round_trip_rebuilds_model_and_describes_it(tmp_path, model, half: bool) -> None:
    path = save_checkpoint(tmp_path / "m.pt", model, NAME, ["aca", "n", "scc"], KWARGS,
                           half=half, epoch=4)
    rebuilt, info = load_model(path)
    assert not rebuilt.training
    assert info.class_names == ("aca", "n", "scc") and info.class_dict == {0: "aca", 1: "n",
                                                                           2: "scc"}
    assert (info.name, info.num_classes, info.img_size, info.embed_dim) == (NAME, 3, 64, 192)
    assert info.random_weights is False and info.extra["epoch"] == 4
    assert info.checkpoint == str(path)
    assert info.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tolerance = 2e-3 if half else 0.0
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=tolerance)


def test_registered_name_gives_seeded_random_weights() -> None:
    a, info = load_model(NAME, class_names=["x", "y"], seed=7, **KWARGS)
    b, _ = load_model(NAME, num_classes=2, seed=7, **KWARGS)
    c, _ = load_model(NAME, num_classes=2, seed=8, **KWARGS)
    assert info.random_weights and info.checkpoint == "" and info.checkpoint_sha256 == ""
    assert (info.num_classes, info.class_names, info.img_size) == (2, ("x", "y"), 64)
    torch.testing.assert_close(a.head.weight, b.head.weight, rtol=0, atol=0)
    assert not torch.equal(a.head.weight, c.head.weight)
    features, info = load_model(NAME, **KWARGS)
    assert info.num_classes == 0 and info.class_names is None
    assert features(torch.randn(1, 3, 64, 64)).shape == (1, 192)


def test_clear_errors(tmp_path, model) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ModelLoadError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a readable torch checkpoint"):
        load_model(tmp_path / "junk.pt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="bare.pt is not an equivit checkpoint"):
        load_checkpoint(tmp_path / "bare.pt")
    with pytest.raises(ModelLoadError, match="'no_such_model' is not a registered timm model"):
        load_model("no_such_model")
    path = save_checkpoint(tmp_path / "m.pt", model, NAME, ["a", "b", "c"], KWARGS)
    with pytest.raises(ModelLoadError, match=r"3-class head.*num_classes=9"):
        load_model(path, num_classes=9)
    with pytest.raises(ModelLoadError, match=r"takes 64 px inputs, but img_size=224"):
        load_model(path, img_size=224)
    with pytest.raises(ValueError, match=r"2 class names \['a', 'b'\] for a 3-class head"):
        save_checkpoint(tmp_path / "bad.pt", model, NAME, ["a", "b"], {"num_classes": 3})
    unnamed = save_checkpoint(tmp_path / "unnamed.pt", model, NAME, None,
                              {"num_classes": 3, **KWARGS})
    assert load_model(unnamed)[1].class_names is None
    with pytest.raises(ModelLoadError, match="unnamed.pt has no class names"):
        load_model(unnamed, require_class_names=True)


def test_atomic_writes_keep_the_old_file_and_use_normal_permissions(tmp_path) -> None:
    path = atomic_save({"a": 1}, tmp_path / "x.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.load(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.pt"], "temporary file left behind"
    json_path = atomic_write_json({"b": 2}, tmp_path / "sub" / "y.json")
    for written in (path, json_path):
        assert stat.S_IMODE(written.stat().st_mode) == default_file_mode() == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_hub_names_are_sources_and_fail_in_one_line_without_internet(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from equivit_plugin.models import ModelLoadError, load_model, unknown_source_reason

    assert unknown_source_reason("hf-hub:owner/model") is None
    assert unknown_source_reason("vit_tiny_patch16_224") is None
    assert "is neither a foundation model" in unknown_source_reason("no_such_model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here either way: fail at once
    with pytest.raises(ModelLoadError, match="cannot load it from the Hugging Face Hub"):
        load_model("hf-hub:equivit/no-such-model")
