"""Where the tiles of a slide are (TIAToolbox's tissue mask + patch grid) and reading them.

Coordinates come from TIAToolbox: ``PatchExtractor.get_coordinates`` lays the grid at the
target resolution (only tiles wholly inside the slide), ``WSIReader.tissue_mask`` builds the
mask and ``PatchExtractor.filter_coordinates`` keeps the grid tiles that touch tissue. Each
kept grid position is then converted to level-0 pixels and *rounded*, so the saved top-left
corner is an exact integer and a tile is ``reader.read_rect(location=(x, y),
size=(patch_size, patch_size), resolution=target_mpp, units="mpp")`` with those coordinates:
whoever re-reads a tile from the ``coords`` of an output file gets exactly the pixels that
were embedded.

The region embedded for a cell may be larger than the cell (a *context*, ``context_size``
pixels at the target resolution, centred on the cell: a model that sees only its inscribed
disc needs one to see the cell's corners). It is read the same way, from a corner
``context_margin_level0`` level-0 pixels left of and above the cell's:
``reader.read_rect(location=(x - m, y - m), size=(context_size, context_size),
resolution=target_mpp, units="mpp")``; where it reaches past the slide's border TIAToolbox
pads it, as it would any read there. ``context_size == patch_size`` is the cell alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import TISSUE_MASKS
from .slides import OpenedSlide, quiet_tiatoolbox, reopen

__all__ = ["MASK_MPP", "TISSUE_MASKS", "TileDataset", "TileGrid", "context_margin", "read_tile",
           "tile_grid"]

MASK_MPP = 8.0
"""Resolution of the tissue mask, micrometres per pixel (about 1.25x): a 224-px tile at
0.5 um/px covers 14 x 14 mask pixels, and a whole slide's mask is a few megapixels at most."""


@dataclass
class TileGrid:
    """The tiles of one slide.

    Attributes:
        coords: ``(N, 2)`` int64 level-0 top-left ``(x, y)`` of each tile, row-major order.
        patch_size: tile side at the target resolution (pixels).
        patch_size_level0: tile side in level-0 pixels (rounded).
        target_mpp: target resolution, micrometres per pixel.
        n_grid: tiles in the full grid before the tissue filter.
        context_size: side of the region embedded around each tile, at the target
            resolution (``patch_size``, the default: the tile alone).
        context_margin_level0: level-0 pixels between a region's top-left corner and its
            tile's, along each axis (:func:`context_margin`; ``0`` for the tile alone).
    """

    coords: np.ndarray
    patch_size: int
    patch_size_level0: int
    target_mpp: float
    n_grid: int
    context_size: int | None = None
    context_margin_level0: int = 0

    def __post_init__(self) -> None:
        if self.context_size is None:
            self.context_size = self.patch_size


def context_margin(patch_size: int, context_size: int, target_mpp: float,
                   level0_mpp: float) -> int:
    """Level-0 pixels from a ``context_size`` region's top-left corner to that of the
    ``patch_size`` cell it is centred on: ``(context_size - patch_size) // 2`` target pixels,
    converted and rounded (so the region is centred to within half a target pixel when the
    difference is odd, and to within a level-0 pixel of rounding)."""
    if context_size < patch_size:
        raise ValueError(f"context_size {context_size} is smaller than patch_size {patch_size}")
    return int(round((context_size - patch_size) // 2 * target_mpp / level0_mpp))


def tile_grid(slide: OpenedSlide, *, target_mpp: float, patch_size: int, stride: int,
              tissue_mask: str = "morphological", min_tissue: float = 0.0,
              context_size: int | None = None) -> TileGrid:
    """Grid tiles of ``slide`` at ``target_mpp`` that show tissue.

    Args:
        slide: from :func:`~equivit_plugin.features.slides.open_slide`.
        target_mpp: resolution tiles are read at (micrometres per pixel).
        patch_size: tile side at ``target_mpp``.
        stride: grid step at ``target_mpp`` (``patch_size``: no overlap).
        tissue_mask: ``"otsu"``, ``"morphological"`` (TIAToolbox's maskers at
            :data:`MASK_MPP`) or ``"none"`` (keep every tile).
        min_tissue: keep tiles whose tissue fraction is above this (``0``: any tissue).
        context_size: side of the region embedded around each tile at ``target_mpp``
            (default ``patch_size``). It changes neither the grid nor which tiles are kept:
            the cells, their tissue and their coordinates are the same for every context.

    Returns:
        The :class:`TileGrid` (possibly with no tiles).
    """
    from tiatoolbox.tools.patchextraction import PatchExtractor

    if tissue_mask not in TISSUE_MASKS:
        raise ValueError(f"tissue_mask must be one of {TISSUE_MASKS}, got {tissue_mask!r}")
    reader = slide.reader
    width, height = (int(v) for v in reader.slide_dimensions(resolution=target_mpp,
                                                             units="mpp"))
    if width < patch_size or height < patch_size:
        boxes = np.zeros((0, 4), dtype=np.int64)
    else:
        # (N, 4) [x0, y0, x1, y1] at the target resolution; only tiles inside the slide, so
        # no tile is padded with invented background.
        boxes = PatchExtractor.get_coordinates(
            image_shape=(width, height), patch_input_shape=(patch_size, patch_size),
            stride_shape=(stride, stride), input_within_bound=True).astype(np.int64)
    n_grid = len(boxes)
    if n_grid and tissue_mask != "none":
        with quiet_tiatoolbox():
            mask = reader.tissue_mask(method=tissue_mask,
                                      resolution=max(MASK_MPP, target_mpp), units="mpp")
        keep = PatchExtractor.filter_coordinates(mask, boxes, wsi_shape=(width, height),
                                                 min_mask_ratio=min_tissue)
        boxes = boxes[np.asarray(keep, dtype=bool)]
    scale = np.asarray([target_mpp / slide.level0_mpp[0], target_mpp / slide.level0_mpp[1]])
    coords = np.rint(boxes[:, :2] * scale[None]).astype(np.int64).reshape(-1, 2)
    context = patch_size if context_size is None else int(context_size)
    return TileGrid(coords=coords, patch_size=patch_size,
                    patch_size_level0=int(round(patch_size * scale[0])),
                    target_mpp=float(target_mpp), n_grid=n_grid, context_size=context,
                    context_margin_level0=context_margin(patch_size, context, target_mpp,
                                                         slide.level0_mpp[0]))


def read_tile(reader: Any, xy: tuple[int, int] | np.ndarray, patch_size: int,
              target_mpp: float) -> np.ndarray:
    """The tile (or context region) at level-0 top-left ``xy``: uint8
    ``(patch_size, patch_size, 3)``; TIAToolbox pads what lies past the slide's border."""
    tile = reader.read_rect(location=(int(xy[0]), int(xy[1])), size=(patch_size, patch_size),
                            resolution=target_mpp, units="mpp")
    return np.ascontiguousarray(np.asarray(tile)[..., :3], dtype=np.uint8)


class TileDataset(Dataset):
    """The tiles of one slide as uint8 ``(patch_size, patch_size, 3)`` tensors, in
    ``coords`` order (use an unshuffled ``DataLoader``: features are written in that order);
    with ``context_size``, the ``(context_size, context_size, 3)`` region centred on each tile
    instead, read from ``coords - context_margin_level0`` (:class:`TileGrid` has both).

    The slide is opened lazily, once per process (the main process for ``num_workers=0``,
    each worker otherwise): TIAToolbox/OpenSlide readers cannot be pickled and must not be
    shared across a fork. An open ``reader`` may be handed in for use in this process only.

    Tiles stay uint8 until they reach the device (4x less host-to-device traffic);
    :func:`equivit_plugin.models.normalise_batch` does the rest there.
    """

    def __init__(self, slide: OpenedSlide, coords: np.ndarray, patch_size: int,
                 target_mpp: float, *, context_size: int | None = None,
                 context_margin_level0: int = 0, reuse_reader: bool = True) -> None:
        self.path = slide.path
        self.mpp_override = slide.mpp_override
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.patch_size = int(patch_size)
        self.context_size = self.patch_size if context_size is None else int(context_size)
        self.context_margin_level0 = int(context_margin_level0)
        self.target_mpp = float(target_mpp)
        self._reader = slide.reader if reuse_reader else None
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.coords)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None  # reopened in the receiving process
        return state

    def _get_reader(self) -> Any:
        if self._reader is None or self._pid != os.getpid():
            # First use in this process, or a forked worker that inherited the parent's handle.
            self._reader = reopen(self.path, self.mpp_override)
            self._pid = os.getpid()
        return self._reader

    def __getitem__(self, index: int) -> torch.Tensor:
        tile = read_tile(self._get_reader(), self.coords[index] - self.context_margin_level0,
                         self.context_size, self.target_mpp)
        return torch.from_numpy(tile)
