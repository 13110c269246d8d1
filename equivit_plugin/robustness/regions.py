"""Tissue regions for the rotation report, read through the feature pipeline.

A region is a square of side ``2T`` pixels at the target resolution around a level-0 centre,
where ``T`` is a model's input size: the central ``T x T`` crop of the region rotated by any
angle about its centre stays inside it (its corners are ``T / sqrt(2) < T`` from the centre),
so no padding is ever read. Regions are *defined by their centres*: a model with a smaller
input size reads its own, smaller ``2T`` square around the same centres, so every model is
measured on the same tissue.

Candidates are the ``2T`` grid cells of
:func:`~equivit_plugin.features.tiles.tile_grid` that show enough tissue (TIAToolbox mask);
the quota is spread over the slides as evenly as their candidates allow and drawn at random
(``seed``), so a report is reproducible.

Folders of tile images are sources too (:func:`tile_regions`): a tile, read as the bundle
reads tiles (resized to ``T``), is the centre of a ``2T`` context whose rest is its mirror
image (:class:`~equivit_plugin.bundle.data.TileContextReader`, as distillation reads tiles),
so a view turned or shifted about the tile's centre reads tile pixels at its centre and
mirrored ones towards its corners.

Every region belongs to a *source*: its slide (the file stem) or its tile folder (the
folder's name). The report compares features within each source as well as over all of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..bundle.data import TileContextReader, image_files_below
from ..features.config import DEFAULT_MPP
from ..features.slides import OpenedSlide, SlideError, open_slide, resolve_slides
from ..features.tiles import read_tile, tile_grid
from .config import (
    DEFAULT_MIN_TISSUE,
    DEFAULT_REGION_STRIDE,
    DEFAULT_REGIONS,
    TISSUE_MASKS,
    RotationReportError,
)

__all__ = ["RegionSet", "Regions", "TileRegions", "sample_regions", "spread_quota",
           "tile_regions"]


@dataclass
class Regions:
    """Regions of tissue, as level-0 centres, and reading them at any tile size.

    Attributes:
        slides: the slide files searched, in :func:`resolve_slides` order.
        slide_index: ``(N,)`` int64, the slide (index into ``slides``) of each region.
        centres: ``(N, 2)`` float64 level-0 ``(x, y)`` centre of each region.
        tile_size: the tile side ``T`` the regions were sampled for (their grid cells are
            ``2T`` wide at ``target_mpp``); :meth:`read` accepts ``T`` up to this.
        target_mpp: resolution regions are read at, micrometres per pixel.
        slide_mpp: resolution assumed for slides without metadata (``None``: metadata only).
        candidates: tissue grid cells found per slide (same order as ``slides``).
        requested: how many regions were asked for.
    """

    slides: tuple[Path, ...]
    slide_index: np.ndarray
    centres: np.ndarray
    tile_size: int
    target_mpp: float
    slide_mpp: float | None = None
    candidates: tuple[int, ...] = ()
    requested: int = 0
    _opened: dict[int, OpenedSlide] = field(default_factory=dict, repr=False, compare=False)
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.centres)

    @property
    def slide_names(self) -> list[str]:
        """The slide file stem of each region (``N`` names)."""
        return [self.slides[i].stem for i in self.slide_index]

    @property
    def source_names(self) -> list[str]:
        """The source of each region: its slide's file stem (``N`` names)."""
        return self.slide_names

    def _slide(self, index: int) -> OpenedSlide:
        if index not in self._opened:
            self._opened[index] = open_slide(self.slides[index], self.slide_mpp)
        return self._opened[index]

    def top_left(self, tile_size: int) -> np.ndarray:
        """``(N, 2)`` int64 level-0 top-left corners of the ``2 * tile_size`` squares around
        the centres (rounded to whole level-0 pixels, as the feature pipeline's tiles are)."""
        corners = np.zeros((len(self), 2), dtype=np.int64)
        for index in np.unique(self.slide_index):
            rows = self.slide_index == index
            mpp = np.asarray(self._slide(int(index)).level0_mpp)
            half = tile_size * self.target_mpp / mpp  # T px at the target resolution
            corners[rows] = np.rint(self.centres[rows] - half[None]).astype(np.int64)
        return corners

    def read(self, tile_size: int | None = None, *, progress: bool = False) -> np.ndarray:
        """The regions for a model of input side ``T = tile_size``.

        Args:
            tile_size: ``T`` (default :attr:`tile_size`); at most :attr:`tile_size`, so the
                square stays inside the grid cell that was checked for tissue.
            progress: a tqdm bar over the regions.

        Returns:
            ``(N, 2T, 2T, 3)`` uint8 RGB, read once per tile size and cached (the returned
            array is shared: do not modify it).

        Raises:
            ValueError: ``tile_size`` is larger than the regions were sampled for.
            SlideError: a slide cannot be opened or read (the message names it).
        """
        size = self.tile_size if tile_size is None else int(tile_size)
        if not 0 < size <= self.tile_size:
            raise ValueError(f"these regions were sampled for tiles of at most "
                             f"{self.tile_size} px, got tile_size={tile_size}")
        if size not in self._cache:
            corners = self.top_left(size)
            out = np.empty((len(self), 2 * size, 2 * size, 3), dtype=np.uint8)
            for row in tqdm(range(len(self)), desc=f"reading {2 * size} px regions",
                            unit="region", disable=not progress, leave=False):
                slide = self._slide(int(self.slide_index[row]))
                try:
                    out[row] = read_tile(slide.reader, corners[row], 2 * size, self.target_mpp)
                except Exception as error:  # OpenSlide, tifffile... each has its own errors
                    raise SlideError(f"{slide.path}: cannot read the region at level-0 "
                                     f"{tuple(corners[row])} ({type(error).__name__}: "
                                     f"{error})") from error
            self._cache[size] = out
        return self._cache[size]

    def describe(self) -> dict[str, Any]:
        """JSON-able ``{"slides": [...], "regions": {...}}``: per slide its path, tissue cells
        and regions drawn; per region its slide (index into ``slides``) and level-0 centre."""
        counts = np.bincount(self.slide_index, minlength=len(self.slides))
        candidates = self.candidates or (None,) * len(self.slides)
        return {
            "slides": [{"path": str(path), "name": path.stem, "kind": "slide",
                        "tissue_regions": found, "regions": int(count)}
                       for path, found, count in zip(self.slides, candidates, counts)],
            "regions": {
                "slide_index": [int(i) for i in self.slide_index],
                "centres_level0": [[round(float(x), 2), round(float(y), 2)]
                                   for x, y in self.centres],
            },
        }


def spread_quota(available: Sequence[int], total: int) -> list[int]:
    """Split ``total`` over slides as evenly as their ``available`` candidates allow.

    Water filling: every slide with candidates left gets an equal share (the first ones one
    more when it does not divide), capped at what it has; what a slide could not take goes
    to the others. ``sum(result) == min(total, sum(available))``.
    """
    quota = [0] * len(available)
    remaining = int(total)
    open_slides = [i for i, count in enumerate(available) if count > 0]
    while remaining > 0 and open_slides:
        share, extra = divmod(remaining, len(open_slides))
        for order, i in enumerate(open_slides):
            give = min(share + (order < extra), available[i] - quota[i])
            quota[i] += give
            remaining -= give
        open_slides = [i for i in open_slides if quota[i] < available[i]]
    return quota


def sample_regions(slides: str | Path | Sequence[str | Path], *, tile_size: int,
                   target_mpp: float = DEFAULT_MPP, n_regions: int = DEFAULT_REGIONS,
                   min_tissue: float = DEFAULT_MIN_TISSUE, tissue_mask: str = "morphological",
                   region_stride: float = DEFAULT_REGION_STRIDE,
                   seed: int = 0, slide_mpp: float | None = None,
                   progress: bool = False) -> Regions:
    """Draw up to ``n_regions`` tissue regions of ``2 * tile_size`` px from ``slides``.

    Args:
        slides: slide files, folders, globs or ``.txt``/``.csv`` lists
            (:func:`~equivit_plugin.features.slides.resolve_slides`).
        tile_size: the largest model input side ``T`` the regions will be read for.
        target_mpp: resolution, micrometres per pixel.
        n_regions: regions wanted; fewer when the slides hold fewer tissue cells.
        min_tissue: tissue fraction a ``2T`` cell needs (TIAToolbox mask).
        tissue_mask: ``"morphological"``, ``"otsu"`` or ``"none"``.
        region_stride: step between candidate cells, in tile sizes (``2``: disjoint cells;
            the default ``0.5`` lets them overlap, so small slides give enough regions).
        seed: which cells are drawn (``numpy.random.default_rng(seed)``).
        slide_mpp: resolution of slides without metadata.
        progress: a tqdm bar over the slides.

    Returns:
        The :class:`Regions` (their centres, sorted per slide in grid order).

    Raises:
        RotationReportError: no slides, a slide that cannot be opened, or no tissue region in
            any slide (``.argument`` is ``"slides"``); a bad ``tile_size``, ``n_regions``,
            ``tissue_mask`` or ``min_tissue``.
    """
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise RotationReportError(f"tile_size= must be a positive integer, got {tile_size!r}",
                                  "tile_size")
    if isinstance(n_regions, bool) or not isinstance(n_regions, int) or n_regions < 1:
        raise RotationReportError(f"n_regions= must be a positive integer, got {n_regions!r}",
                                  "n_regions")
    if tissue_mask not in TISSUE_MASKS:
        raise RotationReportError(f"tissue_mask= must be one of {list(TISSUE_MASKS)}, got "
                                  f"{tissue_mask!r}", "tissue_mask")
    if not 0.0 <= min_tissue < 1.0:
        raise RotationReportError(f"min_tissue= must be in [0, 1), got {min_tissue!r}",
                                  "min_tissue")
    try:
        paths = tuple(resolve_slides(slides))
    except ValueError as error:
        raise RotationReportError(f"slides= {error}", "slides") from error
    if not 0.0 < region_stride <= 2.0:
        raise RotationReportError(f"region_stride= must be in (0, 2] tile sizes, got "
                                  f"{region_stride!r}", "region_stride")
    region = 2 * tile_size
    step = max(1, round(region_stride * tile_size))
    opened: dict[int, OpenedSlide] = {}
    centres: list[np.ndarray] = []
    for index, path in enumerate(tqdm(paths, desc="finding tissue regions", unit="slide",
                                      disable=not progress, leave=False)):
        try:
            slide = opened[index] = open_slide(path, slide_mpp)
        except SlideError as error:
            raise RotationReportError(f"slides= {error}", "slides") from error
        grid = tile_grid(slide, target_mpp=target_mpp, patch_size=region, stride=step,
                         tissue_mask=tissue_mask, min_tissue=min_tissue)
        # Centres from the unrounded cell size: rounding the top-left back out of them gives
        # the grid's own corners for the sampling tile size.
        half = region / 2 * target_mpp / np.asarray(slide.level0_mpp)
        centres.append(grid.coords.astype(np.float64) + half[None])
    available = [len(c) for c in centres]
    if not sum(available):
        names = ", ".join(p.name for p in paths)
        raise RotationReportError(
            f"slides= no region of {region} x {region} px at {target_mpp} um/px with tissue "
            f"fraction above {min_tissue} in {names}; give other slides, a lower min_tissue= "
            f"or a smaller model", "slides")
    rng = np.random.default_rng(seed)
    chosen_index, chosen_centres = [], []
    for index, quota in enumerate(spread_quota(available, n_regions)):
        rows = np.sort(rng.choice(available[index], size=quota, replace=False))
        chosen_index.append(np.full(quota, index, dtype=np.int64))
        chosen_centres.append(centres[index][rows].reshape(-1, 2))
    return Regions(slides=paths, slide_index=np.concatenate(chosen_index),
                   centres=np.concatenate(chosen_centres), tile_size=tile_size,
                   target_mpp=float(target_mpp), slide_mpp=slide_mpp,
                   candidates=tuple(available), requested=n_regions, _opened=opened)


@dataclass
class TileRegions:
    """Tile images as regions, one source: each tile the centre of a mirrored ``2T`` context.

    Attributes:
        name: the source's name (the folder's, unless given).
        folder: where the tiles were found.
        files: ``N`` tile files, one region each.
        tile_size: the tile side ``T`` (tiles are resized to it as the bundle reads them);
            :meth:`read` accepts ``T`` up to this.
        target_mpp: the resolution the tiles are taken to have (recorded, not checked: tiles
            carry no resolution).
        found: image files in the folder (``files`` are drawn from them).
        requested: how many regions were asked for.
    """

    name: str
    folder: Path
    files: tuple[Path, ...]
    tile_size: int
    target_mpp: float
    found: int = 0
    requested: int = 0
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def source_names(self) -> list[str]:
        """The source of each region: :attr:`name` (``N`` names)."""
        return [self.name] * len(self)

    def read(self, tile_size: int | None = None, *, progress: bool = False) -> np.ndarray:
        """The regions for a model of input side ``T' = tile_size``: the central ``2T'``
        square of each tile's ``2T`` context.

        Returns:
            ``(N, 2T', 2T', 3)`` uint8 RGB, cached per size (shared: do not modify it).

        Raises:
            ValueError: ``tile_size`` is larger than the tiles were read for.
            TileReadError: a tile cannot be read (the message names the file).
        """
        size = self.tile_size if tile_size is None else int(tile_size)
        if not 0 < size <= self.tile_size:
            raise ValueError(f"these tiles were read for models of at most {self.tile_size} "
                             f"px, got tile_size={tile_size}")
        if self.tile_size not in self._cache:
            contexts = TileContextReader(self.tile_size)
            out = np.empty((len(self), 2 * self.tile_size, 2 * self.tile_size, 3),
                           dtype=np.uint8)
            for row, path in enumerate(tqdm(self.files, desc=f"reading {self.name} tiles",
                                            unit="tile", disable=not progress, leave=False)):
                out[row] = contexts(path)
            self._cache[self.tile_size] = out
        if size not in self._cache:
            start = self.tile_size - size
            self._cache[size] = np.ascontiguousarray(
                self._cache[self.tile_size][:, start:start + 2 * size, start:start + 2 * size])
        return self._cache[size]

    def describe(self) -> dict[str, Any]:
        """JSON-able ``{"sources": [...], "tiles": [...]}``: the folder, the tiles found and
        used, and each region's file."""
        return {
            "sources": [{"path": str(self.folder), "name": self.name, "kind": "tiles",
                         "tiles_found": self.found, "regions": len(self),
                         "context": "reflect"}],
            "tiles": [str(path) for path in self.files],
        }


RegionSet = Regions | TileRegions
"""Regions of one or more slides, or of one tile folder."""


def tile_regions(tiles: str | Path | Sequence[str | Path], *, tile_size: int,
                 target_mpp: float = DEFAULT_MPP, n_regions: int | None = None, seed: int = 0,
                 name: str | None = None) -> TileRegions:
    """Tile images as one source of regions.

    Args:
        tiles: a folder of tiles (``.png``, ``.jpg``, ``.tif``..., searched recursively), or
            the tile files themselves.
        tile_size: the largest model input side ``T``; tiles are resized to it.
        target_mpp: the tiles' resolution, recorded in the report (tiles carry none).
        n_regions: tiles to draw at random (``seed``); ``None``: all of them.
        seed: which tiles are drawn.
        name: the source's name (default: the folder's, or the files' common folder's).

    Raises:
        RotationReportError: a missing folder or file, or no image (``.argument`` is
            ``"tiles"``); ``tile_size``/``n_regions`` that are not positive integers.
    """
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise RotationReportError(f"tile_size= must be a positive integer, got {tile_size!r}",
                                  "tile_size")
    if n_regions is not None and (isinstance(n_regions, bool) or not isinstance(n_regions, int)
                                  or n_regions < 1):
        raise RotationReportError(f"n_regions= must be a positive integer or None, got "
                                  f"{n_regions!r}", "n_regions")
    if isinstance(tiles, (str, Path)):
        try:
            files = image_files_below(tiles)
        except (OSError, ValueError) as error:
            raise RotationReportError(f"tiles= {error}", "tiles") from error
        folder = Path(tiles).resolve()
    else:
        files = [Path(path).resolve() for path in tiles]
        if not files:
            raise RotationReportError("tiles= no tile files given", "tiles")
        missing = [str(path) for path in files if not path.is_file()]
        if missing:
            raise RotationReportError(f"tiles= {missing[0]}: no such file", "tiles")
        folder = Path(os.path.commonpath([path.parent for path in files]))
    chosen = files
    if n_regions is not None and n_regions < len(files):
        rows = np.sort(np.random.default_rng(seed).choice(len(files), n_regions, replace=False))
        chosen = [files[i] for i in rows]
    return TileRegions(name=name or folder.name, folder=folder, files=tuple(chosen),
                       tile_size=tile_size, target_mpp=float(target_mpp), found=len(files),
                       requested=len(files) if n_regions is None else n_regions)
