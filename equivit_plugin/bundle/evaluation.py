"""Rotation evaluation of the MONAI bundle (``monai_bundle/configs/evaluate.json``).

A checkpoint's accuracy on a labelled folder at every angle of the published protocol
(reflect-pad, rotate, centre-crop; :func:`~equivit_plugin.equivariance.rotation_sweep`) and under
the 8 exact rotations/flips of the square (:func:`~equivit_plugin.equivariance.d4_sweep`)::

    "datalist": "$equivit_plugin.bundle.evaluation.labelled_datalist(@dataset_dir,
                  @class_names, @ckpt_path)",
    "evaluator": {"_target_": "equivit_plugin.bundle.evaluation.evaluate_rotations",
                  "_mode_": "callable", "network": "@network", "data": "@dataloader",
                  "exit_on_error": true, ...},
    "run": ["$@evaluator()"]

The pieces: :func:`stop_on_unreadable` (a labelled test set must not shrink silently: an
unreadable tile stops the run with one line naming it), :class:`SweepAccumulator` (per-batch
sweeps over a MONAI ``DataLoader``, so the dataset never has to fit in memory),
:func:`build_result` (the JSON fields) and :func:`write_results` (plot and JSON, atomically).
The loader pieces shared with inference live in :mod:`~equivit_plugin.bundle.batches`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..equivariance import (
    RotationSweep,
    d4_sweep,
    plot_accuracy_polar,
    prediction_agreement,
    rotation_sweep,
)
from ..utils.atomic import atomic_write_json
from .batches import (
    PredictFn,
    as_loader,
    as_tensor,
    batch_failures,
    batch_files,
    find_unreadable,
    iterate_batches,
    loader_items,
    make_predict_fn,
    stop_run,
)
from .data import TileReadError, class_folders, discover_tiles

__all__ = ["SweepAccumulator", "build_result", "confusion_matrix", "evaluate_rotations",
           "labelled_datalist", "stop_on_unreadable", "summarise_sweep", "write_results"]

logger = logging.getLogger(__name__)


def labelled_datalist(dataset_dir: str, class_names: Sequence[str],
                      ckpt_path: str | None = None) -> list[dict]:
    """Datalist of a class-per-folder dataset labelled with a checkpoint's classes.

    Every class folder must be one of ``class_names`` (a folder may be missing: a test set
    without some class is fine); labels are indices into ``class_names``.

    Args:
        dataset_dir: folder with one sub-folder per class.
        class_names: the checkpoint's class names, in logit order.
        ckpt_path: the checkpoint, named in errors.

    Returns:
        ``[{"image": str, "label": int, "class_name": str}, ...]`` (see
        :func:`~equivit_plugin.bundle.data.discover_tiles`).

    Raises:
        ValueError: a class folder the checkpoint does not know (named, with the checkpoint's
            classes and class count), or the data layer's errors (empty folder...).
    """
    names = [str(n) for n in class_names]
    folders = class_folders(dataset_dir)
    unknown = [f for f in folders if f not in names]
    if unknown:
        source = f"checkpoint {ckpt_path}" if ckpt_path else "the checkpoint"
        raise ValueError(
            f"dataset directory {dataset_dir} has {len(folders)} class folder(s) {folders}, of "
            f"which {unknown} are unknown to {source}; it predicts {len(names)} classes {names}. "
            f"Evaluate on folders named after the checkpoint's classes."
        )
    return discover_tiles(dataset_dir, names)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` int counts: row = true class, column = predicted class.

    Args:
        labels: ``(N,)`` true class indices.
        predictions: ``(N,)`` predicted class indices.
        num_classes: ``K``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    flat = labels * num_classes + predictions
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def summarise_sweep(predictions: np.ndarray, labels: np.ndarray, angles: Sequence[float],
                    names: Sequence[str] | None = None) -> RotationSweep:
    """A :class:`~equivit_plugin.equivariance.RotationSweep` from concatenated predictions.

    Args:
        predictions: ``(A, N)`` class indices, row 0 the reference (0 degrees / identity).
        labels: ``(N,)`` true class indices.
        angles: ``A`` angles (degrees).
        names: ``A`` transform names (D4 sweeps) or ``None``.
    """
    accuracy = (predictions == np.asarray(labels)[None, :]).mean(axis=1)
    return RotationSweep(
        angles=[float(a) for a in angles], accuracy=accuracy, mean=float(accuracy.mean()),
        std=float(accuracy.std()), predictions=predictions,
        agreement=prediction_agreement(predictions),
        names=list(names) if names is not None else None,
    )


class SweepAccumulator:
    """Per-batch predictions of the rotation and D4 sweeps, summarised once at the end.

    Args:
        predict_fn: ``(B, 3, H, W) -> (B, K)`` logits (:func:`~.batches.make_predict_fn`).
        angles: ``A`` angles in degrees, the first 0.
        class_names: ``K`` names in logit order (labels index them).
        padding_mode: border handling of the non-90-degree rotations.
        d4: also run the 8 exact rotations/flips.
    """

    def __init__(self, predict_fn: PredictFn, angles: Sequence[float],
                 class_names: Sequence[str], padding_mode: str = "reflect",
                 d4: bool = True) -> None:
        self.predict_fn, self.padding_mode, self.d4 = predict_fn, padding_mode, bool(d4)
        self.angles = [float(a) for a in angles]
        self.names = [str(n) for n in class_names]
        self.rot_rows: list[np.ndarray] = []   # each (A, B)
        self.d4_rows: list[np.ndarray] = []    # each (8, B)
        self.d4_angles: list[float] = []
        self.d4_names: list[str] = []
        self.labels: list[np.ndarray] = []     # each (B,)
        self.files: list[str] = []

    def add(self, images: torch.Tensor, labels: np.ndarray, files: Sequence[str]) -> None:
        """Sweep one batch: ``images`` ``(B, 3, H, W)`` on the device, ``labels`` ``(B,)``."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.names)):
            raise ValueError(f"labels {sorted(set(labels.tolist()))} are outside the "
                             f"checkpoint's {len(self.names)} classes {self.names}")
        size = images.shape[0]
        self.rot_rows.append(rotation_sweep(self.predict_fn, images, labels, self.angles,
                                            batch_size=size,
                                            padding_mode=self.padding_mode).predictions)
        if self.d4:
            exact = d4_sweep(self.predict_fn, images, labels, batch_size=size)
            self.d4_rows.append(exact.predictions)
            self.d4_angles, self.d4_names = exact.angles, list(exact.names or [])
        self.labels.append(labels)
        self.files += [str(f) for f in files]

    @property
    def num_images(self) -> int:
        return int(sum(len(b) for b in self.labels))

    def all_labels(self) -> np.ndarray:
        """``(N,)`` true class indices of every image so far."""
        return np.concatenate(self.labels) if self.labels else np.zeros(0, dtype=np.int64)

    def rotation(self) -> RotationSweep:
        """The ``(A, N)`` rotation sweep over every image so far."""
        return summarise_sweep(np.concatenate(self.rot_rows, axis=1), self.all_labels(),
                               self.angles)

    def d4_result(self) -> RotationSweep | None:
        """The ``(8, N)`` D4 sweep, or ``None`` without ``d4``."""
        if not self.d4:
            return None
        return summarise_sweep(np.concatenate(self.d4_rows, axis=1), self.all_labels(),
                               self.d4_angles, self.d4_names)


def build_result(sweeps: SweepAccumulator, model_name: str | None,
                 extra: Mapping[str, Any] | None, padding_mode: str, plot_name: str,
                 with_predictions: bool) -> dict[str, Any]:
    """The ``rotation_eval.json`` dict (fields in ``monai_bundle/docs/evaluate_infer.md``),
    without ``elapsed_s``."""
    names, labels = sweeps.names, sweeps.all_labels()
    rotation, d4 = sweeps.rotation(), sweeps.d4_result()
    matrix = confusion_matrix(labels, rotation.predictions[0], len(names))
    counts = np.bincount(labels, minlength=len(names))
    result: dict[str, Any] = {
        "model_name": model_name,
        **dict(extra or {}),
        "class_names": names,
        "num_images": int(labels.size),
        "num_images_per_class": {n: int(c) for n, c in zip(names, counts)},
        "protocol": {"padding_mode": padding_mode, "direction": "counter-clockwise",
                     "multiples_of_90": "exact rot90",
                     "other_angles": "pad, bilinear rotation about the centre, centre-crop"},
        "rotation": rotation.to_dict(),
        "accuracy_at_0": float(rotation.accuracy[0]),
        "confusion_matrix": {"angle": 0.0, "rows": "true class", "columns": "predicted class",
                             "class_names": names, "matrix": matrix.tolist()},
        "d4": d4.to_dict() if d4 is not None else None,
        "plot": plot_name,
    }
    if with_predictions:
        result["predictions"] = {
            "files": list(sweeps.files), "labels": labels.tolist(),
            "rotation": rotation.predictions.tolist(),
            "d4": d4.predictions.tolist() if d4 is not None else None,
        }
    return result


def write_results(result: Mapping[str, Any], rotation: RotationSweep,
                  output_dir: str | os.PathLike, json_name: str, plot_name: str,
                  label: str) -> Path:
    """Write the polar plot and the JSON atomically (normal file permissions); the JSON path."""
    out_dir = Path(output_dir)
    plot_accuracy_polar({label: rotation}, out_dir / plot_name,  # itself written atomically
                        title=f"{label}: accuracy vs rotation ({result['num_images']} images)")
    return atomic_write_json(dict(result), out_dir / json_name)


def stop_on_unreadable(failures: Sequence[tuple[str, str]], total: int,
                       exit_on_error: bool) -> None:
    """Stop the evaluation, naming the unreadable tiles (nothing when there are none).

    The one-line message names up to 3 files with their reasons; see
    :func:`~.batches.stop_run` for ``exit_on_error``.

    Raises:
        TileReadError: some tile cannot be read (``SystemExit`` with ``exit_on_error``).
    """
    if not failures:
        return
    shown = "; ".join(f"{file} ({reason})" for file, reason in failures[:3])
    more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
    stop_run(f"evaluation stopped: cannot read {len(failures)} of {total} labelled tile(s), "
             f"and a test set must not shrink silently (fix or remove them): {shown}{more}",
             exit_on_error, TileReadError)


def evaluate_rotations(
    network: nn.Module, data: Iterable[Any], class_names: Sequence[str],
    output_dir: str | os.PathLike, angles: Iterable[float] = range(0, 360, 30),
    device: str | torch.device = "cpu", amp: bool = False,
    inferer: Callable[..., torch.Tensor] | None = None, padding_mode: str = "reflect",
    d4: bool = True, model_name: str | None = None, extra: Mapping[str, Any] | None = None,
    json_name: str = "rotation_eval.json", plot_name: str = "rotation_eval_polar.png",
    with_predictions: bool = False, img_size: int = 224, batch_size: int = 32,
    num_workers: int = 0, progress: bool = True, fit: str = "crop", check_files: bool = True,
    exit_on_error: bool = False,
) -> dict[str, Any]:
    """Accuracy of ``network`` on a labelled dataset under rotations; writes a JSON and a PNG.

    Each batch is rotated by every angle with the published protocol
    (:func:`~equivit_plugin.equivariance.rotation_sweep`: reflect-pad, bilinear rotation about
    the centre, centre-crop; multiples of 90 degrees are exact ``rot90``) and, with ``d4``,
    transformed by the 8 exact rotations/flips (:func:`~equivit_plugin.equivariance.d4_sweep`).

    Args:
        network: classifier ``(B, 3, H, W) -> (B, K)`` logits.
        data: a loader yielding ``{"image": (B, 3, H, W) float, "label": (B,) int, "failed":
            [(file, reason)]}`` batches (a MONAI ``DataLoader`` over a
            :class:`~.batches.TileDataset` of :func:`labelled_datalist` with
            :func:`~.batches.collate_tiles`), or a datalist (``[{"image": path, "label": int}]``),
            loaded with ``img_size``/``batch_size``/``num_workers``/``fit``.
        class_names: ``K`` class names in logit order (from the checkpoint).
        output_dir: folder for ``json_name`` and ``plot_name`` (created).
        angles: degrees, counter-clockwise; the first must be 0 (the reference of agreement and
            of the confusion matrix).
        device, amp, inferer: where and how to run the network (float16 autocast on CUDA;
            ``inferer(images, network)``, ``None``: ``network``).
        padding_mode: border handling of the non-90-degree rotations.
        d4: also run the 8 exact D4 transforms.
        model_name, extra: recorded in the JSON (the name is also the plot legend).
        json_name, plot_name: output file names.
        with_predictions: also record every image's file, label and predicted class per angle.
        progress: tqdm progress bars.
        check_files: decode every tile once before the sweeps (when the datalist is known) so
            that an unreadable tile stops the run before any forward pass.
        exit_on_error: an unreadable tile ends the process with one line (``SystemExit``, see
            :func:`~.batches.stop_run`) instead of raising :class:`~.data.TileReadError`.

    Returns:
        The dict written to ``output_dir/json_name`` (its fields:
        ``monai_bundle/docs/evaluate_infer.md``).
    """
    started = time.perf_counter()
    names = [str(n) for n in class_names]
    angles = [float(a) for a in angles]
    if not angles or angles[0] != 0.0:
        raise ValueError(f"angles must start with 0 (the reference of agreement and of the "
                         f"confusion matrix), got {angles}")
    loader = as_loader(data, img_size, batch_size, num_workers, fit)
    items = loader_items(loader)
    if check_files and items is not None:
        workers = int(getattr(loader, "num_workers", num_workers))
        stop_on_unreadable(find_unreadable(items, num_workers=workers, progress=progress),
                           len(items), exit_on_error)
    sweeps = SweepAccumulator(make_predict_fn(network, len(names), device, amp, inferer),
                              angles, names, padding_mode, d4)
    for batch in iterate_batches(loader, "rotation evaluation", progress):
        total = len(items) if items is not None else sweeps.num_images
        stop_on_unreadable(batch_failures(batch), total, exit_on_error)
        sweeps.add(as_tensor(batch["image"]).to(device),
                   as_tensor(batch["label"]).cpu().numpy(),
                   batch_files(batch) if with_predictions else [])
    if not sweeps.num_images:
        raise ValueError("no images to evaluate")
    result = build_result(sweeps, model_name, extra, padding_mode, plot_name, with_predictions)
    result["elapsed_s"] = round(time.perf_counter() - started, 3)
    label = model_name or "model"
    rotation = sweeps.rotation()
    json_path = write_results(result, rotation, output_dir, json_name, plot_name, label)
    logger.info("%s: accuracy at 0 degrees %.4f, over %d angles %.4f +- %.4f; wrote %s",
                label, result["accuracy_at_0"], len(angles), rotation.mean, rotation.std,
                json_path)
    return result
