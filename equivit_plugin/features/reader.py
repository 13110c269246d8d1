"""Slide regions read by decoding each stored tile of the slide once.

A slide is stored as a pyramid of compressed tiles (JPEG 240 or 256 px in an ``.svs``). Reading
each grid tile with its own ``read_rect`` (TIAToolbox, CLAM, TRIDENT) decodes every stored
tile that the region touches, for every region: a 224 px tile at 0.5 um/px of a 40x slide is
a 448 px region of level 0, which touches 4 to 9 stored 240 px tiles, shared with its
neighbours. Here a region is instead cut from a cache of decoded stored tiles
(:class:`RegionReader`); the regions of a slide are read in grid order, so the cache keeps only
the stored-tile rows that the next grid row still needs and each stored tile is decoded once.

What is read, and at which level, is TIAToolbox's choice (:func:`plan_read`:
``WSIReader.find_read_rect_params``): the level whose resolution is the coarsest one at least
as fine as the target, and the region's side at that level (``read_size``: 448 for a 224 px
tile at 0.5 um/px from a 0.25 um/px level 0). The regions are returned at that level's
resolution; the caller resizes them to the target on its device (:func:`resize_regions`), as
``read_rect`` would have on the CPU. A region whose level-0 corner is ``(x, y)`` starts at
level pixel ``round((x, y) / downsample)`` (TIAToolbox's ``level_location``).

Stored tiles are decoded by one of (:data:`DECODERS`):

* ``"openslide"``: OpenSlide's ``read_region`` of one stored tile at a time (the default for
  every slide TIAToolbox opens with OpenSlide: ``.svs``, ``.ndpi``, ``.mrxs``...);
* ``"tifffile"``: the tile's bytes decoded by tifffile's codecs (imagecodecs' libjpeg-turbo),
  for TIFF-based slides (``.svs``, pyramidal ``.tif``); the default where TIAToolbox itself
  reads the slide with tifffile (``TIFFWSIReader``);
* any other reader (a plain image, DICOM, OME-TIFF...) is read region by region with
  TIAToolbox's ``read_rect`` at the level (``"rect"``): correct, not decode-once.

A region that reaches past the level's border (a context at the slide's edge) is read with
``read_rect`` too, so it is padded exactly as TIAToolbox pads it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import DECODERS

__all__ = ["DECODERS", "LevelPlan", "RegionReader", "TileSource", "decoder_for", "open_tiles",
           "plan_read", "read_as_embedded", "resize_regions"]

_DEFAULT_TILE = 256
"""Side of the blocks a slide without a stored-tile size (a plain image) is read in."""


@dataclass(frozen=True)
class LevelPlan:
    """Where and how large a slide's regions are read.

    Attributes:
        level: pyramid level read (TIAToolbox's optimal read level).
        downsample: that level's downsample relative to level 0.
        read_size: side of a region at ``level`` (pixels).
        out_size: side of a region at the target resolution (pixels).
        level_dimensions: ``(width, height)`` of ``level``.
    """

    level: int
    downsample: float
    read_size: int
    out_size: int
    level_dimensions: tuple[int, int]

    def corners(self, level0_xy: np.ndarray) -> np.ndarray:
        """``(N, 2)`` level-0 top-left corners -> ``(N, 2)`` int64 level pixels."""
        xy = np.asarray(level0_xy, dtype=np.float64).reshape(-1, 2)
        return np.rint(xy / self.downsample).astype(np.int64)


def plan_read(reader: Any, out_size: int, target_mpp: float) -> LevelPlan:
    """The level and region side TIAToolbox's ``read_rect(..., (out_size, out_size),
    resolution=target_mpp, units="mpp")`` reads at, for ``reader`` (a ``WSIReader``)."""
    level, _, level_size, _, _ = reader.find_read_rect_params(
        location=(0, 0), size=(int(out_size), int(out_size)), resolution=float(target_mpp),
        units="mpp")
    info = reader.info
    width, height = (int(v) for v in info.level_dimensions[int(level)])
    return LevelPlan(level=int(level), downsample=float(info.level_downsamples[int(level)]),
                     read_size=int(level_size[0]), out_size=int(out_size),
                     level_dimensions=(width, height))


def decoder_for(reader: Any, decoder: str = "auto") -> str:
    """The decoder that reads ``reader``'s stored tiles: ``"openslide"``, ``"tifffile"`` or
    ``"rect"`` (region by region).

    Raises:
        ValueError: ``decoder`` is not one of :data:`DECODERS`, or ``"tifffile"`` was asked
            for a slide that is not a tiled TIFF.
    """
    from tiatoolbox.wsicore.wsireader import OpenSlideWSIReader, TIFFWSIReader

    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "tifffile":
        return "tifffile"
    if decoder == "openslide":
        if not isinstance(reader, OpenSlideWSIReader):
            raise ValueError(f"decoder='openslide': TIAToolbox reads this slide with "
                             f"{type(reader).__name__}, not OpenSlide; use decoder='auto'")
        return "openslide"
    if isinstance(reader, OpenSlideWSIReader):
        return "openslide"
    if type(reader) is TIFFWSIReader:  # not its OME-TIFF subclass: plain pyramidal TIFFs
        return "tifffile"
    return "rect"


class TileSource:
    """Decodes the stored tiles of one pyramid level.

    Attributes:
        tile_size: ``(width, height)`` of a stored tile.
        dimensions: ``(width, height)`` of the level.
    """

    tile_size: tuple[int, int]
    dimensions: tuple[int, int]

    def tile(self, row: int, col: int) -> np.ndarray:
        """The decoded tile ``(row, col)``: uint8 ``(h, w, C)``, cropped at the level's
        border; its first three channels are RGB."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the source holds open (nothing, unless it opened the file itself)."""

    def shape_of(self, row: int, col: int) -> tuple[int, int]:
        """``(h, w)`` of tile ``(row, col)`` inside the level."""
        tw, th = self.tile_size
        width, height = self.dimensions
        return min(th, height - row * th), min(tw, width - col * tw)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's RGBA composited over white, as TIAToolbox's ``background_composite`` does
    (transparent pixels lie outside the scanned area): uint8 ``(h, w, 3)``, contiguous (regions
    are cut from it by row copies; copying channels 0-2 out of RGBA pixel by pixel took 50
    times longer than OpenCV's conversion, as long as decoding the tile)."""
    import cv2

    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    weight = alpha[..., None].astype(np.float32) / 255.0
    return np.rint(rgb * weight + 255.0 * (1.0 - weight)).astype(np.uint8)


class _OpenSlideTiles(TileSource):
    def __init__(self, slide: Any, level: int) -> None:
        self.slide, self.level = slide, int(level)
        props = slide.properties
        width = props.get(f"openslide.level[{level}].tile-width")
        height = props.get(f"openslide.level[{level}].tile-height")
        self.tile_size = (int(width or _DEFAULT_TILE), int(height or _DEFAULT_TILE))
        self.dimensions = tuple(int(v) for v in slide.level_dimensions[self.level])
        self.downsample = float(slide.level_downsamples[self.level])

    def tile(self, row: int, col: int) -> np.ndarray:
        tw, th = self.tile_size
        h, w = self.shape_of(row, col)
        location = (int(round(col * tw * self.downsample)), int(round(row * th * self.downsample)))
        return _over_white(np.asarray(self.slide.read_region(location, self.level, (w, h))))


class _TifffileTiles(TileSource):
    def __init__(self, path: str | Path, level: int, dimensions: tuple[int, int]) -> None:
        import tifffile

        self.file = tifffile.TiffFile(str(path))
        levels = self.file.series[0].levels
        if level >= len(levels):
            raise ValueError(f"{path}: tifffile finds {len(levels)} pyramid levels, "
                             f"TIAToolbox reads level {level}")
        page = levels[level].keyframe
        if not page.is_tiled or page.shape[:2] != (dimensions[1], dimensions[0]):
            raise ValueError(f"{path}: level {level} is not a tiled TIFF page of "
                             f"{dimensions[0]}x{dimensions[1]} px (decoder='tifffile' needs "
                             f"one; use decoder='auto')")
        self.page = page
        self.tile_size = (int(page.tilewidth), int(page.tilelength))
        self.dimensions = (int(dimensions[0]), int(dimensions[1]))
        self.columns = math.ceil(self.dimensions[0] / self.tile_size[0])
        self._decode = page.decode

    def raw(self, row: int, col: int) -> bytes:
        """The stored bytes of tile ``(row, col)`` (compressed)."""
        index = row * self.columns + col
        handle = self.file.filehandle
        handle.seek(self.page.dataoffsets[index])
        return handle.read(self.page.databytecounts[index])

    def decode(self, data: bytes, row: int, col: int) -> np.ndarray:
        """Tile ``(row, col)`` decoded from its stored bytes (:meth:`raw`), cropped at the
        level's border."""
        index = row * self.columns + col
        decoded = self._decode(data, index, jpegtables=self.page.jpegtables)[0]
        tile = np.asarray(decoded).reshape(decoded.shape[-3:])  # (1, h, w, s) -> (h, w, s)
        h, w = self.shape_of(row, col)
        return tile[:h, :w]

    def tile(self, row: int, col: int) -> np.ndarray:
        return self.decode(self.raw(row, col), row, col)

    def close(self) -> None:
        self.file.close()


def open_tiles(reader: Any, path: str | Path, plan: LevelPlan, decoder: str) -> TileSource | None:
    """The :class:`TileSource` of ``plan.level`` for ``decoder`` (:func:`decoder_for`), or
    ``None`` for ``"rect"``."""
    if decoder == "openslide":
        return _OpenSlideTiles(reader.openslide_wsi, plan.level)
    if decoder == "tifffile":
        return _TifffileTiles(path, plan.level, plan.level_dimensions)
    return None


class RegionReader:
    """Square regions of one level of one slide, cut from decoded stored tiles.

    Regions are asked for in grid order (rows of increasing ``y``); :meth:`forget_above`
    drops the stored-tile rows that no later region needs, so the cache holds a few rows of
    the tiles that regions touch, and each stored tile is decoded once per slide.

    Args:
        reader: the slide's TIAToolbox ``WSIReader`` (regions past the level's border, and
            every region for ``source=None``, are read with its ``read_rect``).
        plan: :func:`plan_read`.
        source: the level's :class:`TileSource` (:func:`open_tiles`).
    """

    def __init__(self, reader: Any, plan: LevelPlan, source: TileSource | None) -> None:
        self.reader, self.plan, self.source = reader, plan, source
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._first_row = 0  # no cached row lies above it
        self.decoded = 0  # stored tiles decoded so far (each once, when read in grid order)

    def forget_above(self, y: int) -> None:
        """Drop cached stored-tile rows that lie wholly above level row ``y``."""
        if self.source is None:
            return
        first = y // self.source.tile_size[1]
        if first <= self._first_row:  # a region of the same grid row: nothing to drop
            return
        for key in [key for key in self._cache if key[0] < first]:
            del self._cache[key]
        self._first_row = first

    def _tile(self, row: int, col: int) -> np.ndarray:
        tile = self._cache.get((row, col))
        if tile is None:
            tile = self._cache[(row, col)] = self.source.tile(row, col)
            self.decoded += 1
        return tile

    def region(self, x: int, y: int, out: np.ndarray | None = None) -> np.ndarray:
        """The ``read_size`` square whose level-pixel top-left corner is ``(x, y)``: uint8
        ``(S, S, 3)``, written into ``out`` when given."""
        size = self.plan.read_size
        width, height = self.plan.level_dimensions
        if out is None:
            out = np.empty((size, size, 3), dtype=np.uint8)
        if self.source is None or x < 0 or y < 0 or x + size > width or y + size > height:
            out[...] = self._read_rect(x, y)
            return out
        tw, th = self.source.tile_size
        for row in range(y // th, (y + size - 1) // th + 1):
            y0, y1 = max(y, row * th), min(y + size, (row + 1) * th)
            for col in range(x // tw, (x + size - 1) // tw + 1):
                x0, x1 = max(x, col * tw), min(x + size, (col + 1) * tw)
                tile = self._tile(row, col)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - row * th:y1 - row * th,
                                                         x0 - col * tw:x1 - col * tw, :3]
        return out

    def _read_rect(self, x: int, y: int) -> np.ndarray:
        size, ds = self.plan.read_size, self.plan.downsample
        location = (int(round(x * ds)), int(round(y * ds)))
        region = self.reader.read_rect(location=location, size=(size, size),
                                       resolution=self.plan.level, units="level")
        return np.ascontiguousarray(np.asarray(region)[..., :3], dtype=np.uint8)

    def regions(self, corners: np.ndarray | Sequence[Sequence[int]],
                out: np.ndarray | None = None) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 regions at ``corners`` (level pixels, grid order), written
        into ``out`` when given (e.g. a shared-memory tensor's array, so that a
        ``DataLoader`` worker hands it over without a copy)."""
        corners = np.asarray(corners, dtype=np.int64).reshape(-1, 2)
        size = self.plan.read_size
        if out is None:
            out = np.empty((len(corners), size, size, 3), np.uint8)
        for i, (x, y) in enumerate(corners):
            self.forget_above(int(y))
            self.region(int(x), int(y), out[i])
        return out


@functools.lru_cache(maxsize=32)
def _area_taps(size_in: int, size_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, k)`` source indices and weights of area averaging ``size_in -> size_out``
    pixels: output pixel ``i`` covers ``[i s, (i + 1) s)`` of the input (``s = in / out``), each
    input pixel weighted by the length it shares with that span, over ``s``."""
    scale = size_in / size_out
    taps = math.ceil(scale) + 1
    index = torch.zeros(size_out, taps, dtype=torch.long)
    weight = torch.zeros(size_out, taps, dtype=torch.float64)
    for i in range(size_out):
        lo, hi = i * scale, (i + 1) * scale
        first = math.floor(lo + 1e-9)
        for t in range(taps):
            j = first + t
            share = min(hi, j + 1) - max(lo, j)
            if j < size_in and share > 1e-9:
                index[i, t], weight[i, t] = j, share / scale
    return index, weight.float()


def _area_axis(x: torch.Tensor, size: int) -> torch.Tensor:
    """Area-average the last axis of ``x`` to ``size``."""
    index, weight = _area_taps(x.shape[-1], size)
    index, weight = index.to(x.device), weight.to(device=x.device, dtype=x.dtype)
    return (x[..., index] * weight).sum(-1)


def resize_regions(batch: torch.Tensor, size: int) -> torch.Tensor:
    """float ``(B, 3, S, S)`` -> ``(B, 3, size, size)`` on ``batch``'s device, as TIAToolbox's
    ``read_rect`` resizes (OpenCV ``INTER_AREA`` to shrink, ``INTER_CUBIC`` to enlarge) but in
    floating point: area averaging with exact fractional overlaps (``avg_pool2d`` for a whole
    factor such as 448 -> 224), bicubic to enlarge; ``batch`` itself when ``S == size``.
    Against ``read_rect``'s uint8 output it differs by OpenCV's rounding (under one grey
    level)."""
    side = batch.shape[-1]
    if side == size:
        return batch
    if side < size:
        return F.interpolate(batch, size=(size, size), mode="bicubic", align_corners=False)
    if side % size == 0:
        return F.avg_pool2d(batch, side // size)
    return _area_axis(_area_axis(batch, size).transpose(-1, -2), size).transpose(-1, -2)


def read_as_embedded(reader: Any, level0_xy: Sequence[int], size: int,
                     target_mpp: float) -> np.ndarray:
    """The ``size`` px region at level-0 top-left ``level0_xy`` exactly as the feature pipeline
    embeds it (read at :func:`plan_read`'s level with TIAToolbox's ``read_rect``, resized with
    :func:`resize_regions`): float32 ``(size, size, 3)`` in ``[0, 255]``. It equals
    ``read_rect(level0_xy, (size, size), resolution=target_mpp, units="mpp")`` where no resize
    is needed, and is within OpenCV's rounding of it otherwise."""
    plan = plan_read(reader, size, target_mpp)
    location = tuple(int(v) for v in level0_xy)
    region = np.asarray(reader.read_rect(location=location, size=(plan.read_size,) * 2,
                                         resolution=plan.level, units="level"))[..., :3]
    x = torch.from_numpy(np.ascontiguousarray(region)).permute(2, 0, 1)[None].float()
    return resize_regions(x, int(size))[0].permute(1, 2, 0).numpy()
