"""Training views: a tile turned by any angle, moved by a few pixels, maybe mirrored.

The student sees each tile the way tissue arrives on a slide - at any orientation and with the
patch grid cutting it anywhere - and learns to give the teacher's D4-mean target for all of
them. Views are cut from the tile's ``2T`` context
(:func:`~equivit_plugin.equivariance.region_views`), so they never show padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..equivariance.transforms import region_views
from .config import DistillError
from .tiles import DistillTiles

__all__ = ["DistillationViews", "largest_shift", "random_view"]


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
    """``{"image": (3, T, T) float32 normalised view, "label": (D,) float32 target}``.

    Args:
        tiles: the tiles (contexts are read lazily, in the worker).
        targets: ``(N, D)`` targets of all tiles.
        indices: the tiles this dataset serves (a train or validation split).
        max_shift: largest shift of a view, px.
        mean, std: the student's input normalisation.
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
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.fixed_seed = fixed_seed

    def __len__(self) -> int:
        return len(self.indices)

    def view(self, index: int, angle: float, dx: int, dy: int, mirror: bool) -> torch.Tensor:
        """The normalised ``(3, T, T)`` view of tile ``index`` (turned, then shifted, then
        mirrored left-right)."""
        context = torch.from_numpy(np.ascontiguousarray(self.tiles.context(index)))
        x = context.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        view = region_views(x, angle, self.tiles.tile_size, (dx, dy))[0]
        if mirror:
            view = view.flip(-1)
        return (view - self.mean) / self.std

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        index = int(self.indices[item])
        if self.fixed_seed is None:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        else:
            rng = np.random.default_rng([self.fixed_seed, index])
        image = self.view(index, *random_view(rng, self.max_shift))
        return {"image": image.contiguous(), "label": torch.from_numpy(self.targets[index])}
