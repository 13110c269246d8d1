"""The tiles a student learns from, each with the context its rotated views are cut from.

A tile is the central ``T x T`` of a ``2T x 2T`` context (``T``: the teacher's input side), as
in the rotation report: turned about its centre by any angle and shifted by a few pixels, the
tile's corners stay inside the context (they are ``T / sqrt(2) < T`` from its centre), so no
view reads padding.

* **Slides**: the context is real tissue. The feature pipeline's tiling
  (:func:`~equivit_plugin.features.tiles.tile_grid`, TIAToolbox tissue masks) lays ``2T``
  cells at ``stride`` px over each slide; each cell with enough tissue gives one tile.
* **Folders of tile images**: the tile (centre-cropped and resized to ``T``, as the bundle
  reads tiles) is the context's centre and the rest is its mirror image (``numpy.pad``
  ``"reflect"``), the border MONAI's ``RandAffined`` augmentation uses.

Tiles are read lazily (a ``DataLoader`` worker opens its own slide readers), so a run over
100,000 tiles holds none of them in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..bundle.data import TileContextReader, image_files_below
from ..features.slides import OpenedSlide, SlideError, open_slide, reopen, resolve_slides
from ..features.tiles import read_tile, tile_grid
from .config import DistillError

__all__ = ["DistillTiles", "collect_tiles", "tile_files"]


def tile_files(folders: Sequence[str | os.PathLike]) -> list[Path]:
    """Every image file under ``folders`` (recursively), sorted per folder.

    Raises:
        DistillError: a folder that does not exist or holds no image (``.argument ==
            "tiles"``).
    """
    files: list[Path] = []
    for folder in folders:
        try:
            files += image_files_below(folder)
        except (OSError, ValueError) as error:
            raise DistillError(f"tiles= {error}", "tiles") from error
    return files


@dataclass
class DistillTiles:
    """Tiles from folders and slides, in a fixed order: the files first, then the slide tiles.

    Attributes:
        tile_size: ``T``, the tile side (the teacher's input side); contexts are ``2T``.
        files: tile image files.
        slides: the slide files, in :func:`resolve_slides` order.
        slide_index: ``(M,)`` the slide of each slide tile.
        context_xy: ``(M, 2)`` level-0 top-left ``(x, y)`` of each slide tile's context.
        target_mpp: resolution slide contexts are read at.
        slide_mpp: resolution assumed for slides without metadata.
    """

    tile_size: int
    files: tuple[Path, ...] = ()
    slides: tuple[Path, ...] = ()
    slide_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    context_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    target_mpp: float = 0.5
    slide_mpp: float | None = None
    _readers: dict[int, Any] = field(default_factory=dict, repr=False)
    _tile_contexts: TileContextReader | None = field(default=None, repr=False)
    _pid: int = field(default_factory=os.getpid, repr=False)

    def __len__(self) -> int:
        return len(self.files) + len(self.slide_index)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"] = {}  # slide readers are reopened in the receiving process
        return state

    def key(self, index: int) -> str:
        """A stable name of tile ``index``: ``file:<path>`` or ``slide:<name>:<x>:<y>``."""
        if index < len(self.files):
            return f"file:{self.files[index]}"
        row = index - len(self.files)
        x, y = (int(v) for v in self.context_xy[row])
        return f"slide:{self.slides[int(self.slide_index[row])]}:{x}:{y}"

    def keys(self) -> list[str]:
        return [self.key(i) for i in range(len(self))]

    def fingerprint(self) -> str:
        """SHA-256 of the tile keys, the tile size and the resolution."""
        digest = hashlib.sha256(f"{self.tile_size}|{self.target_mpp}|".encode())
        for key in self.keys():
            digest.update(key.encode() + b"\n")
        return digest.hexdigest()

    def _reader(self, slide: int) -> Any:
        if self._pid != os.getpid():  # a forked worker: never share the parent's handles
            self._readers, self._pid = {}, os.getpid()
        if slide not in self._readers:
            mpp = None if self.slide_mpp is None else (self.slide_mpp, self.slide_mpp)
            self._readers[slide] = reopen(self.slides[slide], mpp)
        return self._readers[slide]

    def context(self, index: int) -> np.ndarray:
        """The ``2T x 2T`` context of tile ``index``: uint8 ``(2T, 2T, 3)``.

        Raises:
            OSError, ValueError, RuntimeError: the file or slide region cannot be read (the
                caller names the tile with :meth:`key`).
        """
        if index < len(self.files):
            if self._tile_contexts is None:  # the bundle's tile reading, built once
                self._tile_contexts = TileContextReader(self.tile_size)
            return self._tile_contexts(self.files[index])
        row = index - len(self.files)
        return read_tile(self._reader(int(self.slide_index[row])), self.context_xy[row],
                         2 * self.tile_size, self.target_mpp)

    def tile(self, index: int) -> np.ndarray:
        """The tile itself, the context's centre: uint8 ``(T, T, 3)``."""
        size = self.tile_size
        return self.context(index)[size // 2:size // 2 + size, size // 2:size // 2 + size]


def collect_tiles(tile_size: int, *, tiles: Sequence[str | os.PathLike] = (),
                  slides: Sequence[str | os.PathLike] = (), target_mpp: float = 0.5,
                  stride: int = 112, min_tissue: float = 0.5,
                  tissue_mask: str = "morphological", slide_mpp: float | None = None,
                  progress: bool = False) -> DistillTiles:
    """Find the tiles of folders and slides.

    Args:
        tile_size: ``T``, the teacher's input side.
        tiles: folders of tile images.
        slides: slides, folders of slides, globs or ``.txt``/``.csv`` lists.
        target_mpp: resolution of slide tiles, micrometres per pixel.
        stride: step between slide tiles at ``target_mpp``, pixels.
        min_tissue: tissue fraction a ``2T`` context needs.
        tissue_mask: ``"morphological"``, ``"otsu"`` or ``"none"``.
        slide_mpp: resolution of slides without metadata.
        progress: a bar over the slides.

    Raises:
        DistillError: a missing or empty folder, a slide that cannot be opened, or no tile at
            all (``.argument`` is ``"tiles"`` or ``"slides"``).
    """
    files = tuple(tile_files(tiles))
    slide_paths: tuple[Path, ...] = ()
    index, coords = [np.zeros(0, dtype=np.int64)], [np.zeros((0, 2), dtype=np.int64)]
    if slides:
        try:
            slide_paths = tuple(Path(p).resolve() for p in resolve_slides(list(slides)))
        except ValueError as error:
            raise DistillError(f"slides= {error}", "slides") from error
        for number, path in enumerate(tqdm(slide_paths, desc="tiling slides", unit="slide",
                                           disable=not progress, leave=False)):
            try:
                slide: OpenedSlide = open_slide(path, slide_mpp)
            except SlideError as error:
                raise DistillError(f"slides= {error}", "slides") from error
            grid = tile_grid(slide, target_mpp=target_mpp, patch_size=2 * tile_size,
                             stride=stride, tissue_mask=tissue_mask, min_tissue=min_tissue)
            index.append(np.full(len(grid.coords), number, dtype=np.int64))
            coords.append(grid.coords.astype(np.int64).reshape(-1, 2))
    found = DistillTiles(tile_size=int(tile_size), files=files, slides=slide_paths,
                         slide_index=np.concatenate(index), context_xy=np.concatenate(coords),
                         target_mpp=float(target_mpp), slide_mpp=slide_mpp)
    if not len(found):
        raise DistillError(
            f"slides= no {2 * tile_size} px region with tissue fraction above {min_tissue} at "
            f"{target_mpp} um/px in {', '.join(p.name for p in slide_paths)}; give tiles=, "
            f"other slides or a lower min_tissue=", "slides")
    return found
