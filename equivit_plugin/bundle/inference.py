"""Inference of the MONAI bundle (``monai_bundle/configs/inference.json``): a prediction CSV
that loses nothing.

The config stays declarative: it loads the checkpoint with
:func:`equivit_plugin.models.load_model`, lists the input images (:func:`collect_inputs`),
builds a :class:`~equivit_plugin.bundle.batches.TileDataset`/``DataLoader`` and hands the
loader to :func:`predict`::

    "inputs": "$equivit_plugin.bundle.inference.collect_inputs(@input_dir, @input_files)",
    "evaluator": {"_target_": "equivit_plugin.bundle.inference.predict", "_mode_": "callable",
                  "network": "@network", "data": "@dataloader", "class_names": "@class_names",
                  "output_dir": "@output_dir", "checkpoint_sha256": "...",
                  "exit_on_error": true},
    "run": ["$@evaluator()"]

What :func:`predict` writes to ``output_dir`` (``predictions`` = the CSV's stem):

- ``predictions.csv.partial`` while it runs: the header, then the rows of each batch appended,
  flushed and fsynced as soon as the batch is predicted;
- ``predictions.meta.json`` before the first row: the checkpoint (path, SHA-256, model name)
  and the CSV's columns, so a rerun can tell whether rows it finds were made by the same model;
- at the end, atomically: ``predictions.csv`` (one row per readable input tile, in input order),
  ``failed_tiles.csv`` (``file,reason`` of every unreadable tile, in input order; only the
  header when there is none), ``predictions.meta.json`` again (``complete: true``, counts);
  then the ``.partial`` file is removed.

A rerun (``resume=True``, the default) reads the rows already in ``predictions.csv`` and
``predictions.csv.partial`` (a torn last line of an interrupted run is cut off first), skips
those tiles, predicts the rest and writes the same ``predictions.csv`` an uninterrupted run
would have. Rows made by another checkpoint or class list are never mixed in: the run refuses
with one line. Unreadable tiles are skipped, listed and retried on every rerun; with
``exit_on_error`` (the config) the run then ends with exit status 1.

The default input of the config, :func:`demo_tiles`, cuts tiles from the H&E image that
TIAToolbox ships in its package data, so inference runs on a fresh install without any dataset.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

from ..export import is_exported_path, load_exported
from ..models import ModelInfo, load_model
from ..utils.atomic import atomic_path, atomic_write_json, atomic_write_text
from ..utils.demo_data import DEMO_IMAGE_SIZE, demo_he_image
from .batches import (
    PredictFn,
    as_flag,
    as_loader,
    as_tensor,
    batch_failures,
    batch_files,
    item_file,
    iterate_batches,
    loader_items,
    make_predict_fn,
    stop_run,
    with_items,
)
from .data import IMAGE_SUFFIXES, is_image_file

__all__ = [
    "DEMO_TILE_PREFIX",
    "FAILED_COLUMNS",
    "PredictionFiles",
    "PredictionResumeError",
    "PredictionSummary",
    "collect_inputs",
    "demo_tiles",
    "load_network",
    "predict",
]

logger = logging.getLogger(__name__)

DEMO_TILE_PREFIX = "tiatoolbox_he"
"""File-name prefix of the tiles written by :func:`demo_tiles`."""

FAILED_COLUMNS = ("file", "reason")
"""Columns of ``failed_tiles.csv``."""


class PredictionResumeError(ValueError):
    """Rows already in the output folder cannot be resumed (another checkpoint, corrupt file)."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def load_network(path: str | os.PathLike) -> tuple[nn.Module, ModelInfo]:
    """The classifier ``inference.json`` runs (its ``ckpt_path``), with its class names: a
    checkpoint (``models/model.pt``) through :func:`~equivit_plugin.models.load_model`, or a
    file exported from one (``.ts``/``.onnx``, written by ``equivit export`` or
    ``configs/export.json``) through :func:`~equivit_plugin.export.load_exported`.

    Raises:
        ValueError: no class names, not a checkpoint, or an exported file without its
            metadata (the message names the file).
    """
    if is_exported_path(path):
        return load_exported(path, require_class_names=True)
    return load_model(path, require_class_names=True)


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
                       if is_image_file(p) and not any(part.startswith(".")
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
    height = width = DEMO_IMAGE_SIZE
    if not 1 <= tile <= min(height, width):
        raise ValueError(f"tile_size must be in [1, {min(height, width)}], got {tile_size}")
    rows, cols = height // tile, width // tile
    top0, left0 = (height - rows * tile) // 2, (width - cols * tile) // 2
    corners = [(top0 + r * tile, left0 + c * tile) for r in range(rows) for c in range(cols)]
    paths = [out / f"{DEMO_TILE_PREFIX}_{tile}px_y{y:04d}_x{x:04d}.png" for y, x in corners]
    if all(p.is_file() for p in paths):
        return [str(p) for p in paths]

    from PIL import Image

    image = demo_he_image()
    out.mkdir(parents=True, exist_ok=True)
    for path, (y, x) in zip(paths, corners):
        if not path.is_file():
            with atomic_path(path) as tmp:
                Image.fromarray(image[y:y + tile, x:x + tile]).save(tmp, format="PNG")
    logger.info("wrote %d demo tiles of %dx%d px from TIAToolbox's H&E sample to %s",
                len(paths), tile, tile, out)
    return [str(p) for p in paths]


# --------------------------------------------------------------------------------------------
# Prediction files: resumable CSV
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictionFiles:
    """Where :func:`predict` writes, for ``csv_name="predictions.csv"``: ``csv``
    (``predictions.csv``), ``partial`` (``predictions.csv.partial``), ``meta``
    (``predictions.meta.json``) and ``failed`` (``failed_tiles.csv``)."""

    csv: Path
    partial: Path
    meta: Path
    failed: Path

    @classmethod
    def in_folder(cls, output_dir: str | os.PathLike, csv_name: str = "predictions.csv",
                  failed_name: str = "failed_tiles.csv") -> PredictionFiles:
        out = Path(output_dir)
        return cls(csv=out / csv_name, partial=out / f"{csv_name}.partial",
                   meta=out / f"{Path(csv_name).stem}.meta.json", failed=out / failed_name)


@dataclass
class PredictionSummary:
    """What :func:`predict` did.

    Attributes:
        files: the output files.
        num_inputs: tiles asked for.
        num_rows: rows in the final CSV (= readable tiles).
        predicted: rows predicted by this run.
        reused: rows taken from an earlier run (tiles skipped by this one).
        failed: ``(file, reason)`` of every unreadable tile, in input order.
    """

    files: PredictionFiles
    num_inputs: int
    num_rows: int
    predicted: int
    reused: int
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every tile was read and predicted."""
        return not self.failed

    def format(self) -> str:
        """The one-line summary printed at the end of a run."""
        line = (f"inference: {self.num_rows} of {self.num_inputs} tile(s) predicted "
                f"({self.predicted} now, {self.reused} reused from an earlier run) -> "
                f"{self.files.csv}")
        if self.failed:
            line += (f"; {len(self.failed)} unreadable tile(s) skipped, listed with reasons in "
                     f"{self.files.failed}")
        return line


def _say(message: str) -> None:
    """A line for the person running the bundle (stderr, beside the progress bar)."""
    logger.info(message)
    print(message, file=sys.stderr, flush=True)


def _csv_text(rows: Iterable[Sequence[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _append_rows(handle: TextIO, rows: Iterable[Sequence[str]]) -> None:
    """Append CSV rows and make them durable now (flush + fsync)."""
    handle.write(_csv_text(rows))
    handle.flush()
    os.fsync(handle.fileno())


def _cut_torn_line(path: Path) -> None:
    """Cut off a last line without its newline: what a run killed mid-write leaves."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())
        logger.warning("%s: cut off a torn last line left by an interrupted run", path)


def _read_rows(path: Path, header: list[str], exit_on_error: bool) -> dict[str, list[str]]:
    """``{file: row}`` of a prediction CSV (or ``.partial``) with exactly ``header``."""
    _cut_torn_line(path)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return {}
    if rows[0] != header:
        stop_run(f"{path} has columns {rows[0]}, expected {header}: refusing to resume it; "
                 f"use another output_dir or --resume false to overwrite it", exit_on_error,
                 PredictionResumeError)
    bad = next((n for n, row in enumerate(rows[1:], start=2) if len(row) != len(header)), None)
    if bad is not None:
        stop_run(f"{path} line {bad} does not have the {len(header)} columns {header}: "
                 f"refusing to resume it; use --resume false to start over", exit_on_error,
                 PredictionResumeError)
    return {row[0]: row for row in rows[1:]}


def _describe(meta: Mapping[str, Any]) -> str:
    sha = str(meta.get("checkpoint_sha256") or "unknown")
    return (f"checkpoint {meta.get('checkpoint') or '?'} (sha256 {sha[:12]}, classes "
            f"{list(meta.get('columns', []))[2:]})")


def _previous_rows(files: PredictionFiles, identity: Mapping[str, Any], resume: bool,
                   exit_on_error: bool) -> dict[str, list[str]]:
    """Rows an earlier run made with the same checkpoint and classes (``{}`` when none).

    ``resume=False`` deletes the earlier outputs instead.
    """
    if not resume:
        for path in (files.csv, files.partial, files.meta, files.failed):
            path.unlink(missing_ok=True)
        return {}
    existing = [p for p in (files.csv, files.partial) if p.is_file()]
    if not existing:
        return {}
    if not files.meta.is_file():
        stop_run(f"{existing[0]} exists but {files.meta.name} (which checkpoint made it) does "
                 f"not: refusing to resume it; use another output_dir or --resume false to "
                 f"overwrite it", exit_on_error, PredictionResumeError)
    saved = json.loads(files.meta.read_text(encoding="utf-8"))
    if any(saved.get(k) != identity[k] for k in ("checkpoint_sha256", "columns")):
        stop_run(f"{existing[0]} was made by {_describe(saved)}, not by {_describe(identity)}: "
                 f"refusing to mix their predictions; use another output_dir or --resume false "
                 f"to overwrite it", exit_on_error, PredictionResumeError)
    rows: dict[str, list[str]] = {}
    for path in existing:
        rows.update(_read_rows(path, list(identity["columns"]), exit_on_error))
    return rows


def _predict_into(loader: Iterable[Any], partial: Path, header: list[str],
                  predict_fn: PredictFn, rows: dict[str, list[str]],
                  progress: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """Predict every batch, appending its rows to ``partial`` (and ``rows``) as it goes.

    Returns:
        The files predicted, in order, and ``(file, reason)`` of the unreadable tiles met.
    """
    names = header[2:]
    predicted: list[str] = []
    failed: list[tuple[str, str]] = []
    partial.parent.mkdir(parents=True, exist_ok=True)
    fresh = not partial.is_file() or partial.stat().st_size == 0
    with open(partial, "a", encoding="utf-8", newline="") as handle:
        if fresh:
            _append_rows(handle, [header])
        for batch in iterate_batches(loader, "inference", progress):
            for file, reason in batch_failures(batch):
                logger.warning("skipped unreadable tile %s: %s", file, reason)
                failed.append((file, reason))
            files = batch_files(batch)
            if not files:
                continue
            probs = torch.softmax(predict_fn(as_tensor(batch["image"])), dim=1).cpu().numpy()
            new = [[file, names[int(p.argmax())], *(f"{x:.8g}" for x in p)]
                   for file, p in zip(files, probs.astype(np.float64))]
            _append_rows(handle, new)
            rows.update((row[0], row) for row in new)
            predicted += files
    return predicted, failed


def _commit(files: PredictionFiles, identity: Mapping[str, Any], order: Sequence[str],
            rows: Mapping[str, list[str]], failed: list[tuple[str, str]]) -> int:
    """Write the final CSV (rows of ``order``), the failure list and the sidecar atomically,
    then drop the ``.partial`` file; the number of rows written."""
    final = [rows[file] for file in dict.fromkeys(order) if file in rows]
    atomic_write_text(files.csv, _csv_text([list(identity["columns"]), *final]))
    atomic_write_text(files.failed, _csv_text([list(FAILED_COLUMNS), *failed]))
    atomic_write_json({**identity, "complete": True, "num_rows": len(final),
                       "num_failed": len(failed)}, files.meta)
    files.partial.unlink(missing_ok=True)
    return len(final)


def predict(network: nn.Module, data: Iterable[Any], class_names: Sequence[str],
            output_dir: str | os.PathLike, device: str | torch.device = "cpu",
            amp: bool = False, inferer: Callable[..., torch.Tensor] | None = None,
            csv_name: str = "predictions.csv", img_size: int = 224, batch_size: int = 32,
            num_workers: int = 0, progress: bool = True, fit: str = "crop",
            checkpoint: str = "", checkpoint_sha256: str = "", model_name: str = "",
            resume: bool = True, failed_name: str = "failed_tiles.csv",
            exit_on_error: bool = False) -> PredictionSummary:
    """Predict every readable tile into ``output_dir/csv_name``; skip and list unreadable ones.

    CSV columns: ``file``, ``predicted_class`` (the arg-max class), then one softmax probability
    (``%.8g``) per class, headed by its name; rows in input order. Files, resume and refusal:
    see the module docstring and ``monai_bundle/docs/evaluate_infer.md``.

    Args:
        network: classifier mapping ``(B, 3, H, W)`` to ``(B, K)`` logits.
        data: a loader yielding ``{"image": (B, 3, H, W), "file": [str], "failed": [...]}``
            batches (:func:`~.batches.tile_loader`), or a list of paths / datalist dicts
            (loaded with ``img_size``/``batch_size``/``num_workers``/``fit``). Skipping tiles
            predicted earlier needs the datalist, i.e. a list or a loader over a MONAI
            ``Dataset``; any other iterable is predicted whole.
        class_names: ``K`` names in logit order (from the checkpoint).
        output_dir: folder of the outputs (created).
        device, amp, inferer: where and how to run (float16 autocast on CUDA only;
            ``inferer(images, network)``, ``None``: ``network``).
        csv_name, failed_name: output file names.
        progress: show a tqdm progress bar.
        checkpoint, checkpoint_sha256, model_name: what made the rows (``ModelInfo``), stored
            in the sidecar; a rerun resumes only rows of the same SHA-256 and classes (when
            no checkpoint is given, as from Python with a bare network, only the classes).
        resume: reuse rows of an earlier run; ``False``: delete its outputs and start over.
        exit_on_error: end with ``SystemExit`` (exit status 1, the summary line on stderr)
            after writing everything when a tile was unreadable, and stop with one line when
            the earlier rows cannot be resumed (see :func:`~.batches.stop_run`).

    Returns:
        A :class:`PredictionSummary` (its ``format()`` line is printed to stderr).

    Raises:
        PredictionResumeError: earlier rows of another checkpoint/class list, or corrupt.
        ValueError: no input at all.
    """
    names = [str(n) for n in class_names]
    files = PredictionFiles.in_folder(output_dir, csv_name, failed_name)
    identity = {"checkpoint": str(checkpoint), "checkpoint_sha256": str(checkpoint_sha256),
                "model_name": str(model_name), "columns": ["file", "predicted_class", *names]}
    done = _previous_rows(files, identity, as_flag(resume), exit_on_error)
    loader = as_loader(data, img_size, batch_size, num_workers, fit)
    items = loader_items(loader)
    if items is None:
        done = {}  # the inputs are unknown until iterated: nothing can be skipped
    elif done:
        todo = [item for item in items if item_file(item) not in done]
        _say(f"inference: resuming {files.csv}: {len(items) - len(todo)} of {len(items)} "
             f"tile(s) already predicted, skipped; {len(todo)} to predict")
        loader = with_items(loader, todo) if todo else []
    atomic_write_json({**identity, "complete": False}, files.meta)
    rows = dict(done)
    predict_fn = make_predict_fn(network, len(names), device, amp, inferer)
    predicted, failed = _predict_into(loader, files.partial, identity["columns"], predict_fn,
                                      rows, progress)
    order = [item_file(item) for item in items] if items is not None else predicted
    if not order and not failed:
        raise ValueError("no images to predict")
    num_rows = _commit(files, identity, order, rows, failed)
    num_inputs = len(dict.fromkeys(order)) + (len(failed) if items is None else 0)
    summary = PredictionSummary(files, num_inputs, num_rows, len(predicted),
                                num_rows - len(predicted), failed)
    if failed and as_flag(exit_on_error):
        raise SystemExit(summary.format())
    _say(summary.format())
    return summary
