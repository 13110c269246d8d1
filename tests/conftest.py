"""Shared fixtures: real H&E data from ``$EQUIVIT_DATA`` (default ``../shared/data``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def data_root() -> Path:
    return Path(os.environ.get("EQUIVIT_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder; missing data fails under CI (never skips there)."""
    root = data_root()
    if not (root / "crc_tiles").is_dir():
        message = f"real H&E data not found at {root} (set EQUIVIT_DATA)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def crc_tiles(shared_data: Path) -> torch.Tensor:
    """Eight real colorectal tiles, ImageNet-normalised, ``(8, 3, 224, 224)`` float32."""
    from PIL import Image

    files = sorted((shared_data / "crc_tiles").glob("*/*.png"))[:8]
    assert len(files) == 8, f"expected PNG tiles under {shared_data / 'crc_tiles'}"
    arrays = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0 for f in files]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (batch - IMAGENET_MEAN) / IMAGENET_STD


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def small_checkpoint(path: Path, name: str, seed: int = 0, **model_kwargs) -> Path:
    """A random checkpoint of ``name`` saved as the package saves every checkpoint
    (``save_checkpoint``): features unless ``num_classes`` is given, 224 px unless
    ``img_size`` is; weights drawn under ``torch.manual_seed(seed)``."""
    from equivit_plugin.models import create_model, save_checkpoint

    torch.manual_seed(seed)
    kwargs = {"num_classes": 0, "img_size": 224, **model_kwargs}
    return save_checkpoint(path, create_model(name, **kwargs), name, model_kwargs=kwargs)
