"""Batches of tiles for evaluation and inference: what both pipelines share.

A bundle config builds its loader from these pieces::

    "dataset": {"_target_": "equivit_plugin.bundle.batches.TileDataset",
                "data": "@datalist", "transform": "@preprocessing"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 64,
                   "shuffle": false, "num_workers": 2,
                   "collate_fn": "$equivit_plugin.bundle.batches.collate_tiles"}

:class:`TileDataset` turns a tile that cannot be read (truncated file, a text file named
``.png``...) into a marker instead of an exception, and :func:`collate_tiles` drops the markers
from the batch and lists them under ``batch["failed"]``, so one bad file never kills a loader
worker, and the remaining images stay aligned with their file names (``num_workers > 0``
works: both are picklable module-level names). Inference skips and lists such tiles;
evaluation stops on them (a labelled test set must not shrink silently).

Also here: :func:`make_predict_fn` (batch -> logits), :func:`batch_files`,
:func:`iterate_batches` (tqdm bar counting images), :func:`find_unreadable` (a parallel
up-front decode check) and :func:`stop_run` (end a bundle step with one clear line).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NoReturn

import torch
from monai.data import DataLoader, Dataset, list_data_collate
from torch import nn
from tqdm import tqdm

from .data import LoadTiled, TileReadError, tile_transforms

__all__ = [
    "FAILED_KEY",
    "PredictFn",
    "TileDataset",
    "as_flag",
    "as_loader",
    "as_tensor",
    "batch_failures",
    "batch_files",
    "collate_tiles",
    "find_unreadable",
    "item_file",
    "iterate_batches",
    "loader_items",
    "make_predict_fn",
    "stop_run",
    "tile_items",
    "tile_loader",
    "unreadable_reason",
    "with_items",
]

FAILED_KEY = "failed"
"""Batch key of ``[(file, reason), ...]``: the tiles of the batch that could not be read."""

_UNREADABLE = "_unreadable_reason"  # marker key of a dataset item that could not be read

PredictFn = Callable[[torch.Tensor], torch.Tensor]
"""``fn((B, 3, H, W) float) -> (B, K) float32 logits``."""


# --------------------------------------------------------------------------------------------
# Items and unreadable tiles
# --------------------------------------------------------------------------------------------


def item_file(item: Mapping[str, Any] | str | os.PathLike) -> str:
    """The file a datalist item stands for: its ``"file"`` key, else its ``"image"`` path."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    return str(item["file"] if "file" in item else item["image"])


def tile_items(items: Iterable[Mapping[str, Any] | str | os.PathLike]) -> list[dict]:
    """Datalist dicts with a ``"file"`` key: paths become ``{"image": p, "file": p}``."""
    out = [{"image": str(i)} if isinstance(i, (str, os.PathLike)) else dict(i) for i in items]
    for item in out:
        item.setdefault("file", str(item["image"]))
    return out


def unreadable_reason(error: BaseException) -> str | None:
    """Why a tile could not be read, or ``None`` when ``error`` is not about reading it.

    Follows ``__cause__`` (MONAI's ``Compose`` re-raises transform errors as a
    ``RuntimeError`` caused by them); a chain holding a :class:`~.data.TileReadError` is about
    reading, and the reason is its deepest cause as ``"Type: message"`` (e.g.
    ``"OSError: image file is truncated (36 bytes not processed)"``). Anything else (a bug)
    returns ``None`` so that it is raised, not hidden.
    """
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and len(chain) < 32:
        chain.append(seen)
        seen = seen.__cause__
    if not any(isinstance(e, TileReadError) for e in chain):
        return None
    root = chain[-1]
    return f"{type(root).__name__}: {root}".replace("\n", " ")


class TileDataset(Dataset):
    """MONAI ``Dataset`` whose unreadable tiles become markers, not exceptions.

    ``dataset[i]`` is ``transform(data[i])`` (e.g. ``{"image": (3, H, W) float32, "file": str,
    ...}``), or, when reading the tile fails (:func:`unreadable_reason` is not ``None``), the
    marker ``{"file": item_file(data[i]), "_unreadable_reason": reason}``, which
    :func:`collate_tiles` removes from the batch. Other errors are raised.

    Args:
        data: datalist items (``{"image": path, ...}``) or paths.
        transform: e.g. :func:`~equivit_plugin.bundle.data.tile_transforms`.
    """

    def __init__(self, data: Sequence[Mapping[str, Any] | str],
                 transform: Callable[..., Any] | None = None) -> None:
        super().__init__(tile_items(data), transform)

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as error:
            reason = unreadable_reason(error)
            if reason is None:
                raise
            return {"file": item_file(self.data[index]), _UNREADABLE: reason}


def collate_tiles(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """MONAI's ``list_data_collate`` over the readable items; the others under ``"failed"``.

    Returns:
        ``{"image": (B', 3, H, W), "file": [B' str], ..., "failed": [(file, reason), ...]}``
        with ``B'`` the readable items, in order; only ``{"failed": [...]}`` when none is.
    """
    good = [item for item in items if _UNREADABLE not in item]
    failed = [(str(item["file"]), str(item[_UNREADABLE])) for item in items
              if _UNREADABLE in item]
    batch = dict(list_data_collate(good)) if good else {}
    batch[FAILED_KEY] = failed
    return batch


class _ReadCheck(torch.utils.data.Dataset):
    """``dataset[i]``: ``None`` when tile ``i`` decodes, else ``(file, reason)``."""

    def __init__(self, items: Sequence[Mapping[str, Any]], key: str) -> None:
        self.items, self.key = list(items), key
        self.reader: LoadTiled | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[str, str] | None:
        self.reader = self.reader or LoadTiled([self.key])
        item = self.items[index]
        try:
            self.reader({self.key: item[self.key]})
        except Exception as error:
            reason = unreadable_reason(error)
            if reason is None:
                raise
            return item_file(item), reason
        return None


def _as_list(items: list[Any]) -> list[Any]:
    return items


def find_unreadable(items: Sequence[Mapping[str, Any] | str], key: str = "image",
                    num_workers: int = 0,
                    progress: bool | str = False) -> list[tuple[str, str]]:
    """Decode every tile once (in ``num_workers`` loader workers) and list those that fail.

    Costs one decode per tile, no transform and no forward pass.

    Returns:
        ``[(file, reason), ...]`` in input order (empty when every tile decodes).
    """
    dataset = _ReadCheck(tile_items(items), key)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=False,
                                         num_workers=int(num_workers), collate_fn=_as_list)
    failed: list[tuple[str, str]] = []
    with tqdm(total=len(dataset), desc="checking tiles", unit="img",
              disable=not as_flag(progress)) as bar:
        for results in loader:
            failed += [r for r in results if r is not None]
            bar.update(len(results))
    return failed


# --------------------------------------------------------------------------------------------
# Loaders and batches
# --------------------------------------------------------------------------------------------


def tile_loader(items: Sequence[Mapping[str, Any] | str], img_size: int = 224,
                batch_size: int = 32, num_workers: int = 0, fit: str = "crop") -> DataLoader:
    """MONAI ``DataLoader`` over tiles, in input order, through the data layer's transforms.

    Args:
        items: image paths, or datalist dicts with an ``"image"`` path (``label`` etc. pass
            through); a ``"file"`` key holding the path is added.
        img_size, fit: see :func:`~equivit_plugin.bundle.data.tile_transforms`.
        batch_size, num_workers: ``DataLoader`` arguments.

    Returns:
        A loader over a :class:`TileDataset` with :func:`collate_tiles`, yielding
        ``{"image": (B, 3, img_size, img_size) float32, "file": [str], ..., "failed": [...]}``.
    """
    dataset = TileDataset(items, transform=tile_transforms(int(img_size), fit=fit))
    return DataLoader(dataset, batch_size=int(batch_size), shuffle=False,
                      num_workers=int(num_workers), collate_fn=collate_tiles)


def _is_datalist(data: Any) -> bool:
    return isinstance(data, (list, tuple)) and (
        not data or isinstance(data[0], (str, os.PathLike))
        or isinstance(data[0].get("image"), (str, os.PathLike)))


def as_loader(data: Iterable[Any], img_size: int = 224, batch_size: int = 32,
              num_workers: int = 0, fit: str = "crop") -> Iterable[Any]:
    """``data`` itself when it yields batches; a :func:`tile_loader` when it is a datalist."""
    if _is_datalist(data):
        return tile_loader(data, img_size, batch_size, num_workers, fit)
    return data


def loader_items(data: Iterable[Any]) -> list[dict] | None:
    """The datalist behind ``data`` (a datalist, or a loader over a MONAI ``Dataset``), with a
    ``"file"`` key; ``None`` when it cannot be known (any other iterable of batches)."""
    if _is_datalist(data):
        return tile_items(data)
    items = getattr(getattr(data, "dataset", None), "data", None)
    return tile_items(items) if isinstance(items, (list, tuple)) else None


def with_items(loader: Any, items: Sequence[Mapping[str, Any]]) -> DataLoader:
    """The same loader (transform, batch size, workers, collate) over other ``items``."""
    dataset = TileDataset(items, transform=getattr(loader.dataset, "transform", None))
    return DataLoader(dataset, batch_size=loader.batch_size, shuffle=False,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory)


def as_tensor(images: Any) -> torch.Tensor:
    """A plain tensor (a MONAI ``MetaTensor`` tracks metadata through every op: slow, unneeded)."""
    return images.as_tensor() if hasattr(images, "as_tensor") else torch.as_tensor(images)


def batch_files(batch: Mapping[str, Any]) -> list[str]:
    """The source file of each image of a collated batch (``"file"`` key, else image metadata);
    ``[]`` for a batch whose every tile was unreadable."""
    if "file" in batch:
        return [str(f) for f in batch["file"]]
    if "image" not in batch:
        return []
    meta = getattr(batch["image"], "meta", None) or {}
    if "filename_or_obj" not in meta:
        raise ValueError("batch has neither a 'file' key nor image metadata with the file names")
    files = meta["filename_or_obj"]
    return [str(f) for f in (files if isinstance(files, (list, tuple)) else [files])]


def batch_failures(batch: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``[(file, reason), ...]`` of the batch's unreadable tiles (see :func:`collate_tiles`)."""
    return [(str(f), str(r)) for f, r in batch.get(FAILED_KEY, [])]


def iterate_batches(loader: Iterable[Any], desc: str, progress: bool | str) -> Iterator[Any]:
    """Iterate ``loader``, counting tiles (readable or not) on a tqdm bar when ``progress``
    (a boolean, or its command-line spelling: ``--progress false``)."""
    dataset = getattr(loader, "dataset", None)
    total = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    with tqdm(total=total, desc=desc, unit="img", disable=not as_flag(progress)) as bar:
        for batch in loader:
            yield batch
            images = len(batch["image"]) if "image" in batch else 0
            bar.update(images + len(batch.get(FAILED_KEY, [])))


def make_predict_fn(network: nn.Module, num_classes: int,
                    device: str | torch.device = "cpu", amp: bool = False,
                    inferer: Callable[..., torch.Tensor] | None = None) -> PredictFn:
    """A batch -> logits function: moves the batch to ``device``, optional AMP, shape check.

    Args:
        network: the classifier (put in eval mode and moved to ``device`` here).
        num_classes: ``K`` expected logits per image (the checkpoint's class names).
        device: where to run.
        amp: autocast to float16 on CUDA (ignored on other devices).
        inferer: a MONAI inferer called as ``inferer(images, network)``; ``None``: ``network``.

    Returns:
        ``fn((B, 3, H, W) float) -> (B, K) float32 logits`` on ``device``; raises ``ValueError``
        when the network does not return ``(B, K)``.
    """
    device = torch.device(device)
    network.to(device).eval()
    use_amp = bool(amp) and device.type == "cuda"

    def predict_fn(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device, non_blocking=True)
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=use_amp):
            logits = inferer(images, network) if inferer is not None else network(images)
        if logits.dim() != 2 or logits.shape[1] != num_classes:
            raise ValueError(f"network returned logits of shape {tuple(logits.shape)} for "
                             f"{images.shape[0]} images; the checkpoint names {num_classes} "
                             f"classes, so (B, {num_classes}) was expected")
        return logits.float()

    return predict_fn


_FALSE_STRINGS = frozenset({"", "0", "false", "no", "none", "null", "off"})


def as_flag(value: Any) -> bool:
    """A config/command-line boolean: ``"false"``, ``"no"``, ``"0"``... (any case) are false."""
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE_STRINGS
    return bool(value)


def stop_run(message: str, exit_on_error: bool,
             error: Callable[[str], Exception] = ValueError) -> NoReturn:
    """End a bundle step with one clear line.

    With ``exit_on_error`` (what the configs set) it raises ``SystemExit(message)``: MONAI's
    config machinery wraps every ``Exception`` in ``Failed to evaluate ConfigExpression``
    tracebacks but lets ``SystemExit`` through, so ``python -m monai.bundle run`` ends with exit
    status 1 and only ``message`` on stderr. Otherwise (Python callers) it raises
    ``error(message)``.
    """
    if as_flag(exit_on_error):
        raise SystemExit(message)
    raise error(message)
