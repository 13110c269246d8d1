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

Each worker fills a small pool of shared-memory buffers that it reuses: the main process takes
its own copy of an item's regions (on CUDA the ``DataLoader``'s pinning thread does) and hands
the buffer back at once (:meth:`SlideRegions.release`). Fresh shared memory for every item
would cost the kernel's zeroing of each page, which measured as much as decoding the tiles.

A chunk that cannot be read comes back with its ``error`` (one line) instead of raising: a
bad slide fails alone and the run goes on.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from .reader import LevelPlan, RegionReader, open_tiles
from .slides import reopen

__all__ = ["ChunkSampler", "RegionChunk", "SlideRegions", "make_loader", "received",
           "slide_chunks"]

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
    """``dataset[chunk]`` -> ``{"slide", "start", "regions", "error", "buffer"}``: the chunk's
    regions as uint8 ``(n, S, S, 3)``, or an empty tensor and ``error``, one line, when they
    cannot be read.

    One :class:`~.reader.RegionReader` is kept per process, for the slide it read last
    (slides are opened in the process that reads them: readers are not picklable).

    Args:
        workers: the ``DataLoader``'s worker count (``0``: read in the main process).
        pool_size: shared-memory buffers per worker (the items a worker may have in flight,
            plus one). In a worker, regions are written into one of them and ``buffer``
            names it; the receiver must copy the regions, then :meth:`release` the item.
            Where no buffer comes back in time a fresh one is used (never a wait forever).
    """

    def __init__(self, workers: int = 0, pool_size: int = 0) -> None:
        self._key: tuple[Any, ...] | None = None
        self._reader: RegionReader | None = None
        self._pid = os.getpid()
        context = multiprocessing.get_context()
        # one return queue per worker, inherited by the workers at their start
        self._returns = [context.Queue() for _ in range(workers)] if pool_size else []
        self._pool_size = int(pool_size)
        self._pool: list[torch.Tensor] = []
        self._free: list[int] = []

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_key": None, "_reader": None, "_pid": None, "_pool": [],
                "_free": []}

    def release(self, item: dict[str, Any]) -> None:
        """Hand an item's buffer back to its worker (after copying its regions)."""
        worker, buffer = item.get("worker", -1), item.get("buffer", -1)
        if buffer >= 0 and 0 <= worker < len(self._returns):
            self._returns[worker].put(buffer)

    def _buffer(self, worker: int, n: int, side: int) -> tuple[torch.Tensor, int]:
        """A pooled shared ``(n, side, side, 3)`` uint8 view and its index (``-1``: not
        pooled)."""
        returns = self._returns[worker]
        while True:  # what the main process handed back
            try:
                self._free.append(returns.get_nowait())
            except queue.Empty:
                break
        fits = [i for i in self._free if self._pool[i].shape[0] >= n
                and self._pool[i].shape[1] == side]
        if not fits and len(self._pool) < self._pool_size:
            self._pool.append(torch.empty((max(n, DEFAULT_CHUNK_TILES), side, side, 3),
                                          dtype=torch.uint8).share_memory_())
            self._free.append(len(self._pool) - 1)
            return self._buffer(worker, n, side)
        if not fits:
            try:
                self._free.append(returns.get(timeout=10.0))
                return self._buffer(worker, n, side)
            except queue.Empty:
                fresh = torch.empty((n, side, side, 3), dtype=torch.uint8).share_memory_()
                return fresh, -1
        index = fits[0]
        self._free.remove(index)
        return self._pool[index][:n], index

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
        side, n = chunk.plan.read_size, len(chunk.corners)
        info = get_worker_info()
        worker, buffer = (-1 if info is None else info.id), -1
        try:
            if n and worker >= 0 and self._returns:
                regions, buffer = self._buffer(worker, n, side)
            else:
                regions = torch.empty((n, side, side, 3), dtype=torch.uint8)
            if n:
                self._region_reader(chunk).regions(chunk.corners, regions.numpy())
            error = ""
        except Exception as exc:  # a bad slide must not stop the run's other slides
            if buffer >= 0:
                self._free.append(buffer)
            first = (str(exc).strip().splitlines() or [""])[0]
            regions, error, buffer = torch.empty((0, side, side, 3), dtype=torch.uint8), \
                f"{type(exc).__name__}: {first}", -1
        return {"slide": chunk.slide, "start": chunk.start, "regions": regions, "error": error,
                "worker": worker, "buffer": buffer}


def make_loader(chunks: Callable[[], Iterable[RegionChunk]], *, workers: int,
                pin_memory: bool, prefetch_chunks: int = 4) -> DataLoader:
    """The run's ``DataLoader``: ``workers`` processes (``0``: the main process) reading the
    items of ``chunks()`` in order, ``prefetch_chunks`` items ahead per worker.

    Each item it yields must be handed to :func:`received` (which copies its regions out of
    the worker's buffer unless pinning already did, and gives the buffer back)."""
    options: dict[str, Any] = {}
    if workers > 0:
        options = {"prefetch_factor": prefetch_chunks, "persistent_workers": False}
    # a worker has at most prefetch_chunks items in flight: one more buffer never waits
    dataset = SlideRegions(int(workers), prefetch_chunks + 2 if workers > 0 else 0)
    return DataLoader(dataset, batch_size=None, sampler=ChunkSampler(chunks),
                      num_workers=int(workers), pin_memory=pin_memory, **options)


def received(loader: DataLoader, item: dict[str, Any]) -> torch.Tensor:
    """The regions of an item ``loader`` (:func:`make_loader`) yielded, in memory of this
    process (pinned on CUDA, where the ``DataLoader``'s pinning thread copied them), with the
    worker's buffer handed back."""
    regions = item["regions"]
    if item.get("buffer", -1) >= 0:
        if not loader.pin_memory:  # pinning already copied them out of the shared buffer
            regions = regions.clone()
        loader.dataset.release(item)
    return regions
