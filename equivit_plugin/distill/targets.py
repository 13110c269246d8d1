"""The teacher's targets: each tile's pooled embedding averaged over the 8 rotations/flips,
computed once and cached on disk.

On a foundation-model teacher this is the costly part (8 forward passes of a large ViT per
tile), so it is resumable and shared: the cache is named by a fingerprint of the teacher and
the tiles, and students of the same teacher read the same file.

File (HDF5, written whole under a temporary name, then renamed)::

    targets   (N, D) float32   the D4-mean pooled embedding of tile i (zeros if unreadable)
    status    (N,)   int8      1 done, 2 unreadable
    keys      (N,)   str       DistillTiles.key(i)
    errors    (N,)   str       why tile i could not be read ("" otherwise)
    attrs: fingerprint, teacher (JSON), tile_size, embed_dim, format_version

Tiles from slides are read as the feature pipeline reads them
(:mod:`equivit_plugin.features.loader`: each stored tile decoded once, the ``2T`` contexts in
grid order, resized on the device), and the teacher sees each context's central ``T x T``;
tiles from folders are read file by file.

While it is being computed each ``torchrun`` rank fills its rows (``rank::world_size``) of
its own ``<name>.part<rank>of<world>`` file, flushed after every batch, which a rerun
continues; rank 0 then merges the parts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..features.distributed import Ranks
from ..features.loader import RegionChunk, make_loader, received, slide_chunks
from ..features.reader import decoder_for, plan_read, resize_regions
from ..features.slides import open_slide
from ..models import ModelInfo, PooledEncoder
from ..utils.atomic import atomic_path
from .config import DistillError
from .tiles import DistillTiles

__all__ = ["TARGETS_FORMAT_VERSION", "Targets", "default_targets_path", "teacher_identity",
           "teacher_targets", "targets_fingerprint"]

logger = logging.getLogger(__name__)

TARGETS_FORMAT_VERSION = 1
PENDING, DONE, UNREADABLE = 0, 1, 2


@dataclass(frozen=True)
class Targets:
    """The cached targets.

    Attributes:
        values: ``(N, D)`` float32 targets, in tile order.
        readable: ``(N,)`` bool, ``False`` for tiles that could not be read (no target).
        errors: ``{tile key: reason}`` of the unreadable tiles.
        path: the cache file.
        fingerprint: the teacher/tiles fingerprint it was made for.
    """

    values: np.ndarray
    readable: np.ndarray
    errors: Mapping[str, str]
    path: Path
    fingerprint: str


def teacher_identity(info: ModelInfo) -> dict[str, Any]:
    """What identifies a teacher's outputs: architecture (a foundation model's registry name),
    weights, input size, embedding rule and input normalisation."""
    return {"name": info.name, "source": info.source, "img_size": int(info.img_size),
            "embed_dim": int(info.embed_dim), "checkpoint_sha256": info.checkpoint_sha256,
            "random_weights": bool(info.random_weights), "embedding": info.embedding,
            "mean": [float(v) for v in info.mean], "std": [float(v) for v in info.std]}


def targets_fingerprint(info: ModelInfo, tiles: DistillTiles, seed: int = 0) -> str:
    """SHA-256 of the teacher's identity, the tiles and the target definition (``seed``
    matters only for a randomly initialised teacher)."""
    identity = teacher_identity(info)
    if not info.random_weights:
        identity.pop("source")  # the same weights read from another path are the same teacher
    else:
        identity["seed"] = int(seed)
    text = json.dumps({"teacher": identity, "tiles": tiles.fingerprint(),
                       "target": "mean over D4 of the pooled embedding",
                       "format": TARGETS_FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def default_targets_path(work_dir: Path, fingerprint: str) -> Path:
    return Path(work_dir) / f"targets_{fingerprint[:12]}.h5"


class _TileReads(Dataset):
    """``index -> (index, (T, T, 3) uint8 tile, error text)``; an unreadable tile gives zeros
    and its error, so one bad file does not stop the run."""

    def __init__(self, tiles: DistillTiles, rows: np.ndarray) -> None:
        self.tiles, self.rows = tiles, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> tuple[int, torch.Tensor, str]:
        index = int(self.rows[item])
        size = self.tiles.tile_size
        try:
            tile = torch.from_numpy(np.ascontiguousarray(self.tiles.tile(index)))
            return index, tile, ""
        except Exception as error:  # PIL, OpenSlide, tifffile... each has its own
            while error.__cause__ is not None:  # MONAI wraps the reader's error: name the cause
                error = error.__cause__
            return index, torch.zeros(size, size, 3, dtype=torch.uint8), \
                f"{type(error).__name__}: {error}"


def _check_existing(path: Path, fingerprint: str) -> None:
    with h5py.File(path, "r") as handle:
        found = handle.attrs.get("fingerprint", "")
    if found != fingerprint:
        raise DistillError(
            f"targets_cache= {path} holds targets of another teacher or tile set (fingerprint "
            f"{str(found)[:12]}, this run {fingerprint[:12]}); delete it or give another "
            f"targets_cache=", "targets_cache")


def _open_part(path: Path, fingerprint: str, n_tiles: int, embed_dim: int) -> h5py.File:
    if path.exists():
        handle = h5py.File(path, "a")
        if handle.attrs.get("fingerprint", "") == fingerprint \
                and handle["targets"].shape == (n_tiles, embed_dim):
            return handle
        handle.close()
        path.unlink()  # a part of another run: start it again
    handle = h5py.File(path, "w")
    handle.attrs["fingerprint"] = fingerprint
    handle.create_dataset("targets", (n_tiles, embed_dim), dtype="float32")
    handle.create_dataset("status", (n_tiles,), dtype="int8")
    handle.create_dataset("errors", (n_tiles,), dtype=h5py.string_dtype())
    return handle


def _store(part: h5py.File, index: np.ndarray, values: np.ndarray | None,
           errors: list[str]) -> None:
    """Write a batch's status and, for its readable rows (``errors[i] == ""``), its targets
    (``values``: one row per readable row, in ``index`` order); flushed."""
    index = np.asarray(index, dtype=np.int64)
    ok = np.asarray([not e for e in errors], dtype=bool)
    order = np.argsort(index)  # h5py writes at increasing indices only
    if values is not None and ok.any():
        readable = index[ok]
        part["targets"][np.sort(readable)] = np.asarray(values)[np.argsort(readable)]
    part["errors"][index[order]] = [errors[i] for i in order]
    part["status"][index[order]] = np.where(ok[order], DONE, UNREADABLE).astype(np.int8)
    part.flush()


def _slide_work(tiles: DistillTiles, rows: np.ndarray, workers: int
                ) -> tuple[list[RegionChunk], dict[int, np.ndarray], dict[int, str]]:
    """The work items reading the ``2T`` contexts of the slide tiles among ``rows`` (each
    slide's in grid order), each slide's tile indices in that order (an item's ``start``
    indexes them), and the slides that cannot be opened, with why."""
    items: list[RegionChunk] = []
    order: dict[int, np.ndarray] = {}
    failed: dict[int, str] = {}
    offset = len(tiles.files)
    slide_of = tiles.slide_index[rows - offset]
    for slide in (int(s) for s in np.unique(slide_of)):
        mine = rows[slide_of == slide]
        xy = tiles.context_xy[mine - offset]
        order[slide] = mine = mine[np.lexsort((xy[:, 0], xy[:, 1]))]  # rows of y, then x
        path = tiles.slides[slide]
        try:
            opened = open_slide(path, tiles.slide_mpp)
            plan = plan_read(opened.reader, 2 * tiles.tile_size, tiles.target_mpp)
            decoder = decoder_for(opened.reader)
        except Exception as error:  # one bad slide: its tiles are unreadable, not the run
            failed[slide] = f"{type(error).__name__}: {error}"
            continue
        items += slide_chunks(slide, path, opened.mpp_override, decoder, plan,
                              tiles.context_xy[mine - offset], workers)
    return items, order, failed


def _fill_part(encoder: nn.Module, tiles: DistillTiles, part: h5py.File, rows: np.ndarray, *,
               mean: torch.Tensor, std: torch.Tensor, batch_size: int, device: torch.device,
               num_workers: int, amp: bool, progress: bool) -> None:
    status = part["status"][:]
    todo = rows[status[rows] == PENDING]
    if not len(todo):
        return
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), unit="tile",
               desc="teacher targets (8 views each)", disable=not progress)
    size = tiles.tile_size
    files, slide_rows = todo[todo < len(tiles.files)], todo[todo >= len(tiles.files)]
    with torch.inference_mode(), torch.autocast(device.type, enabled=amp):
        if len(files):
            loader = DataLoader(_TileReads(tiles, files), batch_size=batch_size,
                                num_workers=num_workers, shuffle=False)
            for index, batch, errors in loader:
                ok = torch.from_numpy(np.asarray([not e for e in errors], dtype=bool))
                values = None
                if ok.any():
                    x = batch[ok].to(device).permute(0, 3, 1, 2).float()
                    values = encoder((x / 255.0 - mean) / std).float().cpu().numpy()
                _store(part, index.numpy(), values, list(errors))
                bar.update(len(index))
        if len(slide_rows):
            items, order, failed = _slide_work(tiles, slide_rows, num_workers)
            for slide, reason in failed.items():
                _store(part, order[slide], None, [reason] * len(order[slide]))
                bar.update(len(order[slide]))
            sizes = {(c.slide, c.start): len(c.corners) for c in items}
            loader = make_loader(lambda: items, workers=num_workers,
                                 pin_memory=device.type == "cuda")
            for item in loader:
                regions = received(loader, item)
                start = item["start"]
                index = order[item["slide"]][start:start + sizes[(item["slide"], start)]]
                if item["error"]:
                    _store(part, index, None, [item["error"]] * len(index))
                elif len(index):
                    # the 2T contexts resized on the device as the feature pipeline does;
                    # the teacher sees their centres (DistillTiles.tile)
                    x = regions.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
                    x = resize_regions(x, 2 * size)[..., size // 2:size // 2 + size,
                                                    size // 2:size // 2 + size]
                    values = encoder((x.contiguous() / 255.0 - mean) / std).float().cpu()
                    _store(part, index, values.numpy(), [""] * len(index))
                bar.update(len(index))
    bar.close()


def _merge(parts: list[Path], path: Path, fingerprint: str, tiles: DistillTiles,
           info: ModelInfo) -> None:
    n_tiles = len(tiles)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as out:
        targets = out.create_dataset("targets", (n_tiles, int(info.embed_dim)), dtype="float32")
        status = np.zeros(n_tiles, dtype=np.int8)
        errors = np.full(n_tiles, "", dtype=object)
        for rank, part_path in enumerate(parts):
            with h5py.File(part_path, "r") as part:
                rows = slice(rank, None, len(parts))  # this rank's rows: one strided hyperslab
                targets[rows] = part["targets"][rows]
                status[rows] = part["status"][rows]
                errors[rows] = part["errors"].asstr()[rows]
        if (status == PENDING).any():
            raise RuntimeError(f"{(status == PENDING).sum()} targets missing from {parts}")
        out.create_dataset("status", data=status)
        out.create_dataset("errors", data=errors, dtype=h5py.string_dtype())
        out.create_dataset("keys", data=tiles.keys(), dtype=h5py.string_dtype())
        out.attrs.update({"fingerprint": fingerprint, "tile_size": tiles.tile_size,
                          "embed_dim": int(info.embed_dim),
                          "teacher": json.dumps(teacher_identity(info)),
                          "format_version": TARGETS_FORMAT_VERSION})


def _read(path: Path, fingerprint: str) -> Targets:
    with h5py.File(path, "r") as handle:
        values = handle["targets"][:]
        status = handle["status"][:]
        keys = handle["keys"].asstr()[:]
        errors = handle["errors"].asstr()[:]
    readable = status == DONE
    return Targets(values=values, readable=readable,
                   errors={keys[i]: errors[i] for i in np.flatnonzero(~readable)},
                   path=path, fingerprint=fingerprint)


def teacher_targets(teacher: nn.Module, info: ModelInfo, tiles: DistillTiles, path: Path, *,
                    fingerprint: str, mean: tuple[float, ...], std: tuple[float, ...],
                    batch_size: int = 64, device: torch.device | str = "cpu",
                    num_workers: int = 0, amp: bool = False, ranks: Ranks | None = None,
                    progress: bool = False) -> Targets:
    """The D4-mean pooled embedding of every tile, from the cache or computed into it.

    Args:
        teacher: the frozen teacher (``(B, 3, T, T)`` normalised -> pooled ``(B, D)`` through
            :class:`~equivit_plugin.models.PooledEncoder` with ``d4_average=True``).
        info: the teacher's :class:`~equivit_plugin.models.ModelInfo`.
        tiles: the tiles (their centres are what the teacher sees).
        path: the cache file.
        fingerprint: :func:`targets_fingerprint` of teacher and tiles.
        mean, std: the teacher's input normalisation.
        batch_size, device, num_workers, amp: how the teacher runs (8 views per tile).
        ranks: the ``torchrun`` layout (rows are shared out; rank 0 merges).
        progress: a bar over the tiles.

    Raises:
        DistillError: ``path`` holds targets of another teacher or tile set.
    """
    path = Path(path)
    ranks = ranks or Ranks()
    device = torch.device(device)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        parts = [path.with_name(f"{path.name}.part{r}of{ranks.world_size}")
                 for r in range(ranks.world_size)]
        encoder = PooledEncoder(teacher, d4_average=True).to(device).eval()
        shape = (1, 3, 1, 1)
        mean_t = torch.tensor(mean, device=device).view(shape)
        std_t = torch.tensor(std, device=device).view(shape)
        rows = np.arange(ranks.rank, len(tiles), ranks.world_size)
        with _open_part(parts[ranks.rank], fingerprint, len(tiles), int(info.embed_dim)) as part:
            _fill_part(encoder, tiles, part, rows, mean=mean_t, std=std_t,
                       batch_size=batch_size, device=device, num_workers=num_workers,
                       amp=amp, progress=progress and ranks.rank == 0)
        _barrier(ranks)
        if ranks.rank == 0:
            _merge(parts, path, fingerprint, tiles, info)
            for part_path in parts:
                part_path.unlink(missing_ok=True)
        _barrier(ranks)
    _check_existing(path, fingerprint)
    targets = _read(path, fingerprint)
    if targets.errors:
        logger.warning("%d tile(s) could not be read and are left out, e.g. %s",
                       len(targets.errors), next(iter(targets.errors.items())))
    return targets


def _barrier(ranks: Ranks) -> None:
    if ranks.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
