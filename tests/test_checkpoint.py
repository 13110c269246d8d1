"""Self-describing checkpoints: atomic writes, round trip, half precision, clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from equivit_plugin.models import (
    atomic_save,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from equivit_plugin.networks import create_network

NAME = "equivit_ri_tiny_patch16_224"
KWARGS = {"img_size": 64, "depth": 1}


@pytest.fixture()
def model() -> torch.nn.Module:
    return create_network(NAME, num_classes=3, **KWARGS).eval()


@pytest.mark.parametrize("half", [False, True])
def test_round_trip_rebuilds_model_and_class_names(tmp_path, model, half: bool) -> None:
    path = save_checkpoint(tmp_path / "m.pt", model, NAME, ["aca", "n", "scc"], KWARGS,
                           half=half, epoch=4)
    rebuilt, info = model_from_checkpoint(path)
    assert info["class_names"] == ["aca", "n", "scc"] and info["epoch"] == 4
    assert info["model_kwargs"]["num_classes"] == 3
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tolerance = 2e-3 if half else 0.0
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=tolerance)


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path) -> None:
    path = atomic_save({"a": 1}, tmp_path / "x.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.load(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.pt"], "temporary file left behind"


def test_clear_errors(tmp_path, model) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="bare.pt is not an equivit checkpoint"):
        load_checkpoint(tmp_path / "bare.pt")
    path = save_checkpoint(tmp_path / "m.pt", model, NAME, ["a", "b", "c"], KWARGS)
    with pytest.raises(ValueError, match=r"3-class head.*9 classes"):
        model_from_checkpoint(path, num_classes=9)
