"""What the models take as input: RGB tiles scaled to ``[0, 1]`` and normalised with the mean
and standard deviation the model was trained with (``ModelInfo.mean``/``.std``: ImageNet's for
this package's own training, a foundation model's card otherwise).

One arithmetic for every door: ``x * scale - shift`` with ``scale = 1 / (255 std)`` and
``shift = mean / std`` (computed once in float64, applied in float32), on numpy tiles
(TIAToolbox's ``preproc``) and on torch batches on the device (the feature pipeline). The MONAI
bundle's transforms use the ImageNet mean and std. :class:`TileTransform` is the same
arithmetic as a torchvision-style callable on PIL tiles, for the frameworks that take one
(TRIDENT, LazySlide).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

if TYPE_CHECKING:
    from .factory import ModelInfo

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TileTransform", "input_normalisation",
           "normalise_batch", "normalise_tile", "tile_transform"]

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)


@functools.lru_cache(maxsize=32)
def _scale_shift(mean: tuple[float, ...], std: tuple[float, ...]
                 ) -> tuple[np.ndarray, np.ndarray]:
    mean64, std64 = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    if mean64.shape != (3,) or std64.shape != (3,) or not (std64 > 0).all():
        raise ValueError(f"expected 3 means and 3 positive standard deviations, got mean={mean} "
                         f"std={std}")
    return (1.0 / (255.0 * std64)).astype(np.float32), (mean64 / std64).astype(np.float32)


def _key(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def normalise_tile(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """``(H, W, 3)`` 0-255 tile -> float32 ``(H, W, 3)``, channels last, normalised with
    ``mean``/``std`` (of ``[0, 1]`` RGB).

    Raises:
        ValueError: not an ``(H, W, 3)`` array.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB tile, got shape {image.shape}")
    scale, shift = _scale_shift(_key(mean), _key(std))
    out = image.astype(np.float32)
    out *= scale
    out -= shift
    return out


@functools.lru_cache(maxsize=32)
def _affine(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    # Kept on the device: no small host-to-device copies per batch. Made outside inference
    # mode, so the cached tensors are usable whatever mode the first caller was in.
    scale, shift = _scale_shift(mean, std)
    with torch.inference_mode(False):
        return (torch.from_numpy(scale).view(1, 3, 1, 1).to(device),
                torch.from_numpy(shift).view(1, 3, 1, 1).to(device))


def normalise_batch(batch: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float32 ``(B, 3, H, W)`` on ``batch``'s device (two in-place
    passes; the same values as :func:`normalise_tile`)."""
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected a (B, H, W, 3) batch, got shape {tuple(batch.shape)}")
    scale, shift = _affine(batch.device, _key(mean), _key(std))
    return batch.permute(0, 3, 1, 2).to(torch.float32).mul_(scale).sub_(shift)


def input_normalisation(info: ModelInfo) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` a model's ``[0, 1]`` RGB inputs are normalised with: what
    :func:`~equivit_plugin.models.load_model` recorded in ``info`` (a checkpoint's own
    statistics, ImageNet's for this package's training; a foundation model's card; timm's
    config for a registered name - e.g. 0.5/0.5 for timm's ViTs).

    Args:
        info: what :func:`~equivit_plugin.models.load_model` said about it.
    """
    return tuple(float(v) for v in info.mean), tuple(float(v) for v in info.std)


class TileTransform:
    """A torchvision-style transform: a PIL image or ``(H, W, 3)`` uint8 array -> float32
    ``(3, S, S)`` tensor, normalised as :func:`normalise_tile` normalises.

    A tile of another size is resized to ``S x S`` first: area averaging to shrink (what the
    feature pipeline's reader does), bicubic to enlarge. Grayscale and RGBA PIL images are
    converted to RGB. Picklable, so DataLoader workers can run it.

    Args:
        img_size: the model's input side ``S``; ``None`` keeps each tile's size.
        mean, std: the model's normalisation of ``[0, 1]`` RGB (``ModelInfo.mean``/``.std``).
    """

    def __init__(self, img_size: int | None = 224, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.img_size = None if img_size is None else int(img_size)
        self.mean, self.std = _key(mean), _key(std)
        _scale_shift(self.mean, self.std)  # a bad mean/std fails here, not in a worker

    def __call__(self, tile: Any) -> torch.Tensor:
        if hasattr(tile, "convert"):  # PIL
            tile = tile.convert("RGB")
        image = np.asarray(tile)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected an RGB tile (PIL image or (H, W, 3) array), got shape "
                             f"{image.shape}")
        size = self.img_size
        if size is not None and image.shape[:2] != (size, size):
            import cv2

            shrink = image.shape[0] >= size and image.shape[1] >= size
            image = cv2.resize(np.ascontiguousarray(image, dtype=np.uint8), (size, size),
                               interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
        normalised = normalise_tile(image, self.mean, self.std)
        return torch.from_numpy(normalised).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(img_size={self.img_size}, mean={self.mean}, "
                f"std={self.std})")


def tile_transform(info: ModelInfo, resize: bool = True) -> TileTransform:
    """The :class:`TileTransform` of a model: its input size and normalisation (``info``
    from :func:`~equivit_plugin.models.load_model`); ``resize=False`` keeps tiles' sizes."""
    return TileTransform(info.img_size if resize else None, *input_normalisation(info))
