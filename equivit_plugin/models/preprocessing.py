"""What the models take as input: RGB tiles scaled to ``[0, 1]`` and normalised with the
ImageNet mean and standard deviation (timm's ``IMAGENET_DEFAULT_MEAN``/``_STD``).

One arithmetic for every door: ``x * scale - shift`` with ``scale = 1 / (255 std)`` and
``shift = mean / std`` (computed once in float64, applied in float32), on numpy tiles
(TIAToolbox's ``preproc``) and on torch batches on the device (the feature pipeline). The MONAI
bundle's transforms use the same mean and std.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import timm.data
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

if TYPE_CHECKING:
    from .factory import ModelInfo

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "input_normalisation", "normalise_batch",
           "normalise_tile"]

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)

_MEAN64 = np.asarray(IMAGENET_MEAN, dtype=np.float64)
_STD64 = np.asarray(IMAGENET_STD, dtype=np.float64)
_SCALE = (1.0 / (255.0 * _STD64)).astype(np.float32)
_SHIFT = (_MEAN64 / _STD64).astype(np.float32)


def normalise_tile(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` 0-255 tile -> float32 ``(H, W, 3)``, channels last.

    Raises:
        ValueError: not an ``(H, W, 3)`` array.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB tile, got shape {image.shape}")
    out = image.astype(np.float32)
    out *= _SCALE
    out -= _SHIFT
    return out


@functools.lru_cache(maxsize=8)
def _affine(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Kept on the device: no small host-to-device copies per batch. Made outside inference
    # mode, so the cached tensors are usable whatever mode the first caller was in.
    with torch.inference_mode(False):
        return (torch.from_numpy(_SCALE).view(1, 3, 1, 1).to(device),
                torch.from_numpy(_SHIFT).view(1, 3, 1, 1).to(device))


def normalise_batch(batch: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float32 ``(B, 3, H, W)`` on ``batch``'s device (two in-place
    passes; the same values as :func:`normalise_tile`)."""
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected a (B, H, W, 3) batch, got shape {tuple(batch.shape)}")
    scale, shift = _affine(batch.device)
    return batch.permute(0, 3, 1, 2).to(torch.float32).mul_(scale).sub_(shift)


def input_normalisation(net: nn.Module, info: ModelInfo
                        ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` a model's ``[0, 1]`` RGB inputs are normalised with.

    A checkpoint of this package was trained on inputs normalised with the ImageNet mean and
    std (the bundle, distillation and the feature pipeline all use them) unless it names its own
    (``"mean"``/``"std"`` entries); a model built by name (or from the Hub) expects what its
    timm pretrained config says - e.g. 0.5/0.5 for timm's ViTs - which is not what the bundle
    trained a ``vit_*`` checkpoint with.

    Args:
        net: the model.
        info: what :func:`~equivit_plugin.models.load_model` said about it (``checkpoint``:
            loaded from a checkpoint of this package; ``extra``: its other entries).
    """
    if info.checkpoint:
        mean = info.extra.get("mean", IMAGENET_MEAN)
        std = info.extra.get("std", IMAGENET_STD)
    else:
        config = timm.data.resolve_data_config({}, model=net)
        mean, std = config["mean"], config["std"]
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
