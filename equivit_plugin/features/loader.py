"""The regions of a run's slides, read in ``DataLoader`` workers that live for the whole run.

One ``DataLoader`` serves every slide of the run (of this rank): its sampler
(:class:`ChunkSampler`) yields work items (:class:`RegionChunk`: a run of one grid row's
regions), which its workers read with :class:`~.reader.RegionReader` and return as uint8
tensors in shared memory (no copy on the way to the main process; pinned there on CUDA). The
workers therefore start once, not once per slide.

Each stored tile is decoded once: a slide's chunks are cut into ``W`` bands of consecutive
grid rows (``W`` the number of workers), and band ``w``'s chunks are placed at the positions
``w, w + W, w + 2W...`` of the sampler's sequence (each slide padded to a multiple of ``W``
with empty chunks), which is where ``DataLoader`` sends work to worker ``w`` (it deals the
sampler's items out to its workers in turn). So every worker reads one band in grid order and
its :class:`~.reader.RegionReader` cache serves the stored-tile rows that consecutive grid
rows share. Were items dealt out otherwise, the regions would still be right; only some
stored tiles would be decoded twice.

A chunk that cannot be read comes back with its ``error`` (one line) instead of raising: a
bad slide fails alone and the run goes on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from .reader import LevelPlan, RegionReader, open_tiles
from .slides import reopen

__all__ = ["ChunkSampler", "RegionChunk", "SlideRegions", "make_loader", "slide_chunks"]

DEFAULT_CHUNK_TILES = 32
"""Most regions in one work item (a grid row is cut into pieces of at most this many)."""


@dataclass(frozen=True)
class RegionChunk:
    """One work item: consecutive regions of one grid row of one slide.

    Attributes:
        slide: the slide's position in the run (returned with the regions).
        path: the slide file.
        mpp_override: ``mpp`` to reopen it with (``OpenedSlide.mpp_override``).
        decoder: ``"openslide"``, ``"tifffile"`` or ``"rect"`` (:func:`~.reader.decoder_for`).
        plan: the level and region side (:func:`~.reader.plan_read`).
        start: index of the first region in the slide's ``coords``.
        corners: ``(n, 2)`` int64 level-pixel top-left corners (``n`` may be 0: padding).
    """

    slide: int
    path: str
    mpp_override: tuple[float, float] | None
    decoder: str
    plan: LevelPlan
    start: int
    corners: np.ndarray


def slide_chunks(slide: int, path: str | Path, mpp_override: tuple[float, float] | None,
                 decoder: str, plan: LevelPlan, level0_corners: np.ndarray, workers: int, *,
                 chunk_tiles: int = DEFAULT_CHUNK_TILES) -> list[RegionChunk]:
    """The work items of one slide, in the order the sampler yields them.

    Args:
        slide: the slide's position in the run.
        path, mpp_override, decoder, plan: as :class:`RegionChunk`.
        level0_corners: ``(N, 2)`` level-0 top-left corners of the regions, grid order
            (rows of equal ``y``).
        workers: ``DataLoader`` workers (``0``: the main process reads, one band).
        chunk_tiles: most regions in one item.

    Returns:
        ``ceil(pieces / W) * W`` items (``W = max(1, workers)``); band ``w`` (the ``w``-th of
        ``W`` runs of consecutive pieces) at positions ``w, w + W...``, empty items where a
        band has fewer pieces than the longest.
    """
    corners = plan.corners(level0_corners)
    pieces: list[tuple[int, int]] = []
    if len(corners):
        # a new grid row wherever y changes; rows longer than chunk_tiles are cut
        breaks = np.flatnonzero(np.diff(corners[:, 1]) != 0) + 1
        bounds = [0, *breaks.tolist(), len(corners)]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            pieces += [(s, min(s + chunk_tiles, b)) for s in range(a, b, chunk_tiles)]
    bands = max(1, int(workers))
    per_band = -(-len(pieces) // bands) if pieces else 0
    items = []
    for j in range(per_band):
        for w in range(bands):
            k = w * per_band + j
            start, stop = pieces[k] if k < len(pieces) else (len(corners), len(corners))
            items.append(RegionChunk(slide=slide, path=str(path), mpp_override=mpp_override,
                                     decoder=decoder, plan=plan, start=start,
                                     corners=corners[start:stop]))
    return items


class ChunkSampler(Sampler):
    """Yields the :class:`RegionChunk` items of ``chunks()`` (a fresh iterator per epoch; the
    run has one): the ``DataLoader``'s indices are the work items themselves."""

    def __init__(self, chunks: Callable[[], Iterable[RegionChunk]]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[RegionChunk]:
        return iter(self.chunks())


class SlideRegions(Dataset):
    """``dataset[chunk]`` -> ``{"slide", "start", "regions", "error"}``: the chunk's regions as
    uint8 ``(n, S, S, 3)`` (in shared memory when read in a worker), or an empty tensor and
    ``error``, one line, when they cannot be read.

    One :class:`~.reader.RegionReader` is kept per process, for the slide it read last
    (slides are opened in the process that reads them: readers are not picklable).
    """

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._reader: RegionReader | None = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"_key": None, "_reader": None, "_pid": None}

    def _region_reader(self, chunk: RegionChunk) -> RegionReader:
        key = (chunk.path, chunk.mpp_override, chunk.decoder, chunk.plan)
        if self._reader is None or self._key != key or self._pid != os.getpid():
            reader = reopen(chunk.path, chunk.mpp_override)
            self._reader = RegionReader(reader, chunk.plan,
                                        open_tiles(reader, chunk.path, chunk.plan,
                                                   chunk.decoder))
            self._key, self._pid = key, os.getpid()
        return self._reader

    def __getitem__(self, chunk: RegionChunk) -> dict[str, Any]:
        side = chunk.plan.read_size
        try:
            regions = torch.empty((len(chunk.corners), side, side, 3), dtype=torch.uint8)
            if len(chunk.corners):
                if get_worker_info() is not None:
                    regions.share_memory_()  # filled in place: handed over without a copy
                self._region_reader(chunk).regions(chunk.corners, regions.numpy())
            error = ""
        except Exception as exc:  # a bad slide must not stop the run's other slides
            first = (str(exc).strip().splitlines() or [""])[0]
            regions, error = torch.empty((0, side, side, 3), dtype=torch.uint8), \
                f"{type(exc).__name__}: {first}"
        return {"slide": chunk.slide, "start": chunk.start, "regions": regions, "error": error}


def make_loader(chunks: Callable[[], Iterable[RegionChunk]], *, workers: int,
                pin_memory: bool, prefetch_chunks: int = 4) -> DataLoader:
    """The run's ``DataLoader``: ``workers`` processes (``0``: the main process) reading the
    items of ``chunks()`` in order, ``prefetch_chunks`` items ahead per worker."""
    options: dict[str, Any] = {}
    if workers > 0:
        options = {"prefetch_factor": prefetch_chunks, "persistent_workers": False}
    return DataLoader(SlideRegions(), batch_size=None, sampler=ChunkSampler(chunks),
                      num_workers=int(workers), pin_memory=pin_memory, **options)
