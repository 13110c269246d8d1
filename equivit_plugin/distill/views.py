"""Training views: a tile turned by any angle, moved by a few pixels, maybe mirrored.

The student sees each tile the way tissue arrives on a slide - at any orientation and with the
patch grid cutting it anywhere - and learns to give the teacher's D4-mean target for all of
them. Views are cut from the tile's ``2T`` context, so they never show padding.

The work is split so that the CPU only reads: :class:`DistillationViews` (in the DataLoader
workers) returns each tile's uint8 context and its drawn view parameters, and
:class:`PrepareViews` (the engines' ``prepare_batch``) makes the whole batch of views on the
device in one pass (:func:`~equivit_plugin.equivariance.batched_region_views`, the batched
:func:`~equivit_plugin.equivariance.region_views`) and normalises it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.engines.utils import PrepareBatch
from torch.utils.data import Dataset

from ..equivariance.transforms import batched_region_views
from .config import DistillError
from .tiles import DistillTiles

__all__ = ["DistillationViews", "PrepareViews", "largest_shift", "random_view"]


def largest_shift(tile_size: int) -> int:
    """The largest shift (px, along each axis) a view of a ``T`` tile can have at any angle
    without reading outside its ``2T`` context: ``sqrt(2) (T / 2 + s) <= T - 1 / 2``."""
    return max(0, math.floor((tile_size - 0.5) / math.sqrt(2) - tile_size / 2))


def random_view(rng: np.random.Generator, max_shift: int) -> tuple[float, int, int, bool]:
    """``(angle in degrees, dx, dy, mirror)``: a uniform angle in ``[0, 360)``, independent
    uniform integer shifts in ``[-max_shift, max_shift]``, a mirror with probability 1/2."""
    angle = float(rng.uniform(0.0, 360.0))
    dx, dy = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
    return angle, dx, dy, bool(rng.random() < 0.5)


class DistillationViews(Dataset):
    """One training sample per tile: its context and the view to cut from it.

    ``{"context": (2T, 2T, 3) uint8, "angle": () float64 degrees, "shift": (2,) int64
    (dx, dy), "mirror": () bool, "label": (D,) float32 target}``. The view itself (turned
    ``angle`` counter-clockwise, crop moved ``dx`` px right and ``dy`` px down, then mirrored
    left-right) is made for the whole batch on the device by :class:`PrepareViews`: the
    workers only read, and the batch they hand over (``2T x 2T`` uint8) is as many bytes as
    the float32 ``T x T`` views it replaces.

    Args:
        tiles: the tiles (contexts are read lazily, in the worker).
        targets: ``(N, D)`` targets of all tiles.
        indices: the tiles this dataset serves (a train or validation split).
        max_shift: largest shift of a view, px.
        mean, std: the student's input normalisation, applied on the device
            (:meth:`prepare_batch`).
        fixed_seed: ``None``: a fresh random view at every access (training; the generator
            is seeded from torch's, which ``monai.utils.set_determinism`` and DataLoader
            workers control). An int: tile ``i`` always gets the same view (validation).
    """

    def __init__(self, tiles: DistillTiles, targets: np.ndarray, indices: Sequence[int], *,
                 max_shift: int, mean: Sequence[float], std: Sequence[float],
                 fixed_seed: int | None = None) -> None:
        limit = largest_shift(tiles.tile_size)
        if max_shift > limit:
            raise DistillError(f"max_shift= {max_shift} px is too large for {tiles.tile_size} px "
                               f"tiles: a view turned by 45 degrees would leave the "
                               f"{2 * tiles.tile_size} px context (at most {limit})",
                               "max_shift")
        self.tiles = tiles
        self.targets = np.asarray(targets, dtype=np.float32)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.max_shift = int(max_shift)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.fixed_seed = fixed_seed

    def __len__(self) -> int:
        return len(self.indices)

    def prepare_batch(self) -> PrepareViews:
        """The engines' ``prepare_batch`` that turns this dataset's batches into normalised
        views on the device."""
        return PrepareViews(self.tiles.tile_size, self.mean, self.std)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        index = int(self.indices[item])
        if self.fixed_seed is None:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        else:
            rng = np.random.default_rng([self.fixed_seed, index])
        angle, dx, dy, mirror = random_view(rng, self.max_shift)
        # As read, channels last: the worker copies nothing; the device reads it through a
        # permuted view (grid_sample and gather take any strides).
        context = torch.from_numpy(np.ascontiguousarray(self.tiles.context(index)))
        return {"context": context,
                "angle": torch.tensor(angle, dtype=torch.float64),  # region_views' float
                "shift": torch.tensor((dx, dy), dtype=torch.int64),
                "mirror": torch.tensor(mirror),
                "label": torch.from_numpy(self.targets[index])}


class PrepareViews(PrepareBatch):
    """MONAI ``prepare_batch``: a batch of :class:`DistillationViews` samples to
    ``(views, targets)`` on the engine's device.

    The uint8 contexts go to the device (``non_blocking`` from pinned memory: the engines'
    DataLoaders pin on CUDA), every view of the batch is made there in one pass
    (:func:`~equivit_plugin.equivariance.batched_region_views`), scaled to ``[0, 1]`` and
    normalised with ``mean`` / ``std``: the values of ``(region_views(context / 255, angle,
    T, (dx, dy)) [mirrored] - mean) / std`` to float32 rounding.

    Args:
        tile_size: the view side ``T``.
        mean, std: the student's input normalisation (3 values each).
    """

    def __init__(self, tile_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.tile_size = int(tile_size)
        # Folded into one multiply-add on the device: (v / 255 - mean) / std = v * scale +
        # offset, computed in float64 once.
        mean_t = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
        self._scale = (1.0 / (255.0 * std_t)).float()
        self._offset = (-mean_t / std_t).float()
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, batchdata: dict[str, torch.Tensor],
                 device: str | torch.device | None = None, non_blocking: bool = False,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``batchdata``: collated samples (``context`` ``(B, 2T, 2T, 3)`` uint8, ``angle``
        ``(B,)``, ``shift`` ``(B, 2)``, ``mirror`` ``(B,)``, ``label`` ``(B, D)``).

        Returns:
            ``(B, 3, T, T)`` float32 normalised views and ``(B, D)`` targets, on ``device``.
        """
        contexts = batchdata["context"].to(device=device, non_blocking=non_blocking, **kwargs)
        contexts = contexts.permute(0, 3, 1, 2)  # (B, 3, 2T, 2T), a view: no copy
        labels = batchdata["label"].to(device=device, non_blocking=non_blocking, **kwargs)
        # The view parameters stay on the host: they choose the exact (90-degree) path and
        # are checked there, without waiting on the device.
        views = batched_region_views(contexts, batchdata["angle"], batchdata["shift"],
                                     batchdata["mirror"], self.tile_size, dtype=torch.float32)
        if views.device not in self._on_device:
            self._on_device[views.device] = (self._scale.to(views.device),
                                             self._offset.to(views.device))
        scale, offset = self._on_device[views.device]
        return torch.addcmul(offset, views, scale), labels
