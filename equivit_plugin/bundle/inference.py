"""Inference of the MONAI bundle (``monai_bundle/configs/inference.json``) and its shared helpers.

The config stays declarative: it loads the self-describing checkpoint, lists the input images
(:func:`collect_inputs`), builds a MONAI ``Dataset``/``DataLoader`` with
:func:`equivit_plugin.bundle.data.tile_transforms` and hands the loader to :func:`predict`,
which writes ``predictions.csv`` atomically::

    "inputs": "$equivit_plugin.bundle.inference.collect_inputs(@input_dir, @input_files)",
    "evaluator": {"_target_": "equivit_plugin.bundle.inference.predict", "_mode_": "callable",
                  "network": "@network", "data": "@dataloader", "class_names": "@class_names",
                  "output_dir": "@output_dir", "device": "@device"},
    "run": ["$@evaluator()"]

The default input of the config, :func:`demo_tiles`, cuts tiles from the H&E image that
TIAToolbox ships in its package data, so inference runs on a fresh install without any dataset.
:mod:`equivit_plugin.bundle.evaluation` reuses :func:`checkpoint_class_names`,
:func:`make_predict_fn`, :func:`tile_loader` and the atomic writers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .data import IMAGE_SUFFIXES, _is_image, tile_transforms

__all__ = [
    "DEMO_TILE_PREFIX",
    "atomic_write",
    "atomic_write_text",
    "batch_files",
    "checkpoint_class_names",
    "collect_inputs",
    "demo_tiles",
    "make_predict_fn",
    "predict",
    "tile_loader",
]

logger = logging.getLogger(__name__)

DEMO_TILE_PREFIX = "tiatoolbox_he"
"""File-name prefix of the tiles written by :func:`demo_tiles`."""

PredictFn = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Atomic output
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    The temporary file keeps ``path``'s suffix (matplotlib picks the format from it). A crash or
    an exception inside the block removes it and leaves any previous ``path`` untouched, never a
    truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}",
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, flushed to disk before the rename."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


# --------------------------------------------------------------------------------------------
# Checkpoint, model and data helpers
# --------------------------------------------------------------------------------------------


def checkpoint_class_names(checkpoint: Mapping[str, Any],
                           ckpt_path: str | None = None) -> list[str]:
    """The class names a checkpoint predicts, in logit order, checked against its head.

    Args:
        checkpoint: dict from :func:`equivit_plugin.models.load_checkpoint`.
        ckpt_path: the file it came from, for error messages.

    Returns:
        ``K`` class names; logit ``k`` of the model is ``names[k]``.

    Raises:
        ValueError: the checkpoint has no class names (they are never guessed), or its head has
            a different number of classes than it has names (both are named).
    """
    source = f"checkpoint {ckpt_path}" if ckpt_path else "the checkpoint"
    names = checkpoint.get("class_names")
    if not names:
        raise ValueError(
            f"{source} has no class names, so its predictions cannot be labelled; re-save it "
            f"with equivit_plugin.models.save_checkpoint(..., class_names=[...])"
        )
    names = [str(n) for n in names]
    head = (checkpoint.get("model_kwargs") or {}).get("num_classes")
    if head is not None and int(head) != len(names):
        raise ValueError(
            f"{source} has a {int(head)}-class head (model_kwargs num_classes={int(head)}) but "
            f"{len(names)} class names {names}"
        )
    return names


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


def tile_loader(items: Sequence[Mapping[str, Any] | str], img_size: int = 224,
                batch_size: int = 32, num_workers: int = 0) -> Any:
    """MONAI ``DataLoader`` over tiles, in input order, through the data layer's transforms.

    Args:
        items: image paths, or datalist dicts with an ``"image"`` path (``label`` etc. pass
            through); a ``"file"`` key holding the path is added.
        img_size: tiles are resized to ``img_size x img_size``.
        batch_size, num_workers: ``DataLoader`` arguments.

    Returns:
        ``monai.data.DataLoader`` yielding ``{"image": (B, 3, img_size, img_size) float32,
        "file": list[str], ...}``.
    """
    from monai.data import DataLoader, Dataset

    data = [{"image": str(i)} if isinstance(i, (str, os.PathLike)) else dict(i) for i in items]
    for item in data:
        item.setdefault("file", str(item["image"]))
    dataset = Dataset(data, transform=tile_transforms(int(img_size)))
    return DataLoader(dataset, batch_size=int(batch_size), shuffle=False,
                      num_workers=int(num_workers))


def batch_files(batch: Mapping[str, Any]) -> list[str]:
    """The source file of each image of a collated batch (``"file"`` key, else image metadata)."""
    if "file" in batch:
        return [str(f) for f in batch["file"]]
    meta = getattr(batch["image"], "meta", None) or {}
    if "filename_or_obj" not in meta:
        raise ValueError("batch has neither a 'file' key nor image metadata with the file names")
    files = meta["filename_or_obj"]
    return [str(f) for f in (files if isinstance(files, (list, tuple)) else [files])]


def _as_tensor(images: Any) -> torch.Tensor:
    """A plain tensor (a MONAI ``MetaTensor`` tracks metadata through every op: slow, unneeded)."""
    return images.as_tensor() if hasattr(images, "as_tensor") else torch.as_tensor(images)


def _progress(loader: Iterable[Any], desc: str, enabled: bool) -> Iterator[Any]:
    """Iterate ``loader``, counting images (not batches) on a tqdm bar when ``enabled``."""
    dataset = getattr(loader, "dataset", None)
    total = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    with tqdm(total=total, desc=desc, unit="img", disable=not enabled) as bar:
        for batch in loader:
            yield batch
            bar.update(len(batch["image"]))


def _as_loader(data: Iterable[Any], img_size: int, batch_size: int, num_workers: int) -> Any:
    """``data`` itself when it yields batches; a :func:`tile_loader` when it is a datalist."""
    if isinstance(data, (list, tuple)) and (not data or isinstance(data[0], (str, os.PathLike))
                                            or isinstance(data[0].get("image"), (str, Path))):
        return tile_loader(data, img_size, batch_size, num_workers)
    return data


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def collect_inputs(input_dir: str | None = None,
                   input_files: Sequence[str] | str | None = None) -> list[str]:
    """Images to predict: ``input_files`` first, then every image under ``input_dir``.

    Args:
        input_dir: folder searched recursively for ``.tif/.tiff/.png/.jpg/.jpeg`` files (case
            insensitive; hidden files and folders skipped), sorted by path; ``None``/``""``:
            none.
        input_files: explicit image paths (a single path is accepted); ``None``/``[]``: none.

    Returns:
        Paths as strings, duplicates removed, order kept.

    Raises:
        FileNotFoundError: ``input_dir`` or one of ``input_files`` does not exist (named).
        ValueError: no image at all.
    """
    if isinstance(input_files, (str, os.PathLike)):
        input_files = [input_files]
    files = [str(f) for f in (input_files or [])]
    for file in files:
        if not Path(file).is_file():
            raise FileNotFoundError(f"input file not found: {file}")
    if input_dir:
        root = Path(input_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"input directory not found: {root}")
        found = sorted(p for p in root.rglob("*")
                       if _is_image(p) and not any(part.startswith(".")
                                                   for part in p.relative_to(root).parts))
        if not found:
            raise ValueError(f"input directory {root} contains no images "
                             f"({'/'.join(IMAGE_SUFFIXES)}, searched recursively)")
        files += [str(p) for p in found]
    if not files:
        raise ValueError("no input images: give input_dir (a folder) or input_files (a list)")
    return list(dict.fromkeys(files))


def demo_tiles(output_dir: str | os.PathLike, tile_size: int = 224) -> list[str]:
    """Cut the H&E image shipped with TIAToolbox into non-overlapping PNG tiles (cached).

    The image is ``tiatoolbox.data.stain_norm_target()``, a ``1000 x 1000`` RGB H&E region
    installed with the ``tiatoolbox`` package (no download). The ``n x n`` grid,
    ``n = 1000 // tile_size``, is centred; tile ``(row, col)`` is saved as
    ``tiatoolbox_he_<tile_size>px_y<top>_x<left>.png``. Tiles already there are reused.

    Args:
        output_dir: folder for the tiles (created).
        tile_size: tile edge in pixels, ``1 <= tile_size <= 1000``.

    Returns:
        ``n * n`` tile paths, row-major.
    """
    tile = int(tile_size)
    out = Path(output_dir)
    height = width = 1000  # stain_norm_target's documented size; checked below when read
    if not 1 <= tile <= min(height, width):
        raise ValueError(f"tile_size must be in [1, {min(height, width)}], got {tile_size}")
    rows, cols = height // tile, width // tile
    top0, left0 = (height - rows * tile) // 2, (width - cols * tile) // 2
    corners = [(top0 + r * tile, left0 + c * tile) for r in range(rows) for c in range(cols)]
    paths = [out / f"{DEMO_TILE_PREFIX}_{tile}px_y{y:04d}_x{x:04d}.png" for y, x in corners]
    if all(p.is_file() for p in paths):
        return [str(p) for p in paths]

    from PIL import Image
    from tiatoolbox.data import stain_norm_target

    image = np.ascontiguousarray(stain_norm_target())[..., :3]
    if image.shape[:2] != (height, width):
        raise ValueError(f"tiatoolbox.data.stain_norm_target() is {image.shape[:2]}, "
                         f"expected {(height, width)}")
    out.mkdir(parents=True, exist_ok=True)
    for path, (y, x) in zip(paths, corners):
        if not path.is_file():
            with atomic_write(path) as tmp:
                Image.fromarray(image[y:y + tile, x:x + tile]).save(tmp, format="PNG")
    logger.info("wrote %d demo tiles of %dx%d px from TIAToolbox's H&E sample to %s",
                len(paths), tile, tile, out)
    return [str(p) for p in paths]


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------


def predict(network: nn.Module, data: Iterable[Any], class_names: Sequence[str],
            output_dir: str | os.PathLike, device: str | torch.device = "cpu",
            amp: bool = False, inferer: Callable[..., torch.Tensor] | None = None,
            csv_name: str = "predictions.csv", img_size: int = 224, batch_size: int = 32,
            num_workers: int = 0, progress: bool = True) -> Path:
    """Predict every image and write ``output_dir/csv_name`` atomically.

    CSV columns: ``file``, ``predicted_class`` (the name of the arg-max class), then one column
    per class, headed by its name, holding the softmax probability (``%.8g``). Rows follow the
    input order.

    Args:
        network: classifier mapping ``(B, 3, H, W)`` to ``(B, K)`` logits.
        data: a loader yielding ``{"image": (B, 3, H, W), "file": [str] ...}`` batches (see
            :func:`tile_loader`), or a list of image paths / datalist dicts.
        class_names: ``K`` names in logit order (from the checkpoint).
        output_dir: folder for the CSV (created).
        device: where to run the network.
        amp: float16 autocast on CUDA.
        inferer: MONAI inferer ``inferer(images, network)``; ``None``: call ``network``.
        csv_name: CSV file name.
        img_size, batch_size, num_workers: used only when ``data`` is a list.
        progress: show a tqdm progress bar.

    Returns:
        Path of the CSV.
    """
    names = [str(n) for n in class_names]
    predict_fn = make_predict_fn(network, len(names), device, amp, inferer)
    loader = _as_loader(data, img_size, batch_size, num_workers)
    rows: list[list[str]] = []
    for batch in _progress(loader, "inference", progress):
        probabilities = torch.softmax(predict_fn(_as_tensor(batch["image"])), dim=1).cpu()
        for file, probs in zip(batch_files(batch), probabilities.numpy()):
            rows.append([file, names[int(probs.argmax())], *(f"{p:.8g}" for p in probs)])
    if not rows:
        raise ValueError("no images to predict")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "predicted_class", *names])
    writer.writerows(rows)
    path = atomic_write_text(Path(output_dir) / csv_name, buffer.getvalue())
    logger.info("wrote predictions for %d images to %s", len(rows), path)
    return path
