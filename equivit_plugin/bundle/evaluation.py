"""Rotation evaluation of the MONAI bundle (``monai_bundle/configs/evaluate.json``).

A checkpoint's accuracy on a labelled folder at every angle of the published protocol
(reflect-pad, rotate, centre-crop; :func:`~equivit_plugin.equivariance.rotation_sweep`) and under
the 8 exact rotations/flips of the square (:func:`~equivit_plugin.equivariance.d4_sweep`). The
sweeps run batch by batch over a MONAI ``DataLoader``, so the dataset never has to fit in
memory; their per-batch predictions are concatenated and summarised once::

    "datalist": "$equivit_plugin.bundle.evaluation.labelled_datalist(@dataset_dir,
                  @class_names, @ckpt_path)",
    "evaluator": {"_target_": "equivit_plugin.bundle.evaluation.evaluate_rotations",
                  "_mode_": "callable", "network": "@network", "data": "@dataloader", ...},
    "run": ["$@evaluator()"]
"""

from __future__ import annotations

import json
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
from .data import _class_folders, discover_tiles
from .inference import (
    _as_loader,
    _as_tensor,
    _progress,
    atomic_write,
    atomic_write_text,
    batch_files,
    make_predict_fn,
)

__all__ = ["confusion_matrix", "evaluate_rotations", "labelled_datalist", "summarise_sweep"]

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
    folders = _class_folders(dataset_dir)
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


def evaluate_rotations(
    network: nn.Module,
    data: Iterable[Any],
    class_names: Sequence[str],
    output_dir: str | os.PathLike,
    angles: Iterable[float] = range(0, 360, 30),
    device: str | torch.device = "cpu",
    amp: bool = False,
    inferer: Callable[..., torch.Tensor] | None = None,
    padding_mode: str = "reflect",
    d4: bool = True,
    model_name: str | None = None,
    extra: Mapping[str, Any] | None = None,
    json_name: str = "rotation_eval.json",
    plot_name: str = "rotation_eval_polar.png",
    with_predictions: bool = False,
    img_size: int = 224,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy of ``network`` on a labelled dataset under rotations; writes a JSON and a PNG.

    For each batch the images are rotated by every angle with the published protocol
    (:func:`~equivit_plugin.equivariance.rotation_sweep`: reflect-pad, bilinear rotation about
    the centre, centre-crop; multiples of 90 degrees are exact ``rot90``) and, with ``d4``,
    transformed by the 8 exact rotations/flips
    (:func:`~equivit_plugin.equivariance.d4_sweep`).

    Args:
        network: classifier ``(B, 3, H, W) -> (B, K)`` logits.
        data: a loader yielding ``{"image": (B, 3, H, W) float, "label": (B,) int}`` batches
            (e.g. a MONAI ``DataLoader`` over :func:`labelled_datalist` with the data layer's
            ``tile_transforms``), or a datalist (list of ``{"image": path, "label": int}``),
            loaded with ``img_size``/``batch_size``/``num_workers``.
        class_names: ``K`` class names in logit order (from the checkpoint).
        output_dir: folder for ``json_name`` and ``plot_name`` (created).
        angles: rotation angles in degrees, counter-clockwise; the first must be 0 (the
            reference of agreement and of the confusion matrix).
        device: where to run the network (and the rotations).
        amp: float16 autocast on CUDA.
        inferer: MONAI inferer called as ``inferer(images, network)``; ``None``: ``network``.
        padding_mode: border handling of the non-90-degree rotations.
        d4: also run the 8 exact D4 transforms.
        model_name: recorded in the JSON and used as the plot legend.
        extra: more JSON-serialisable fields to record (checkpoint path, dataset folder...).
        json_name, plot_name: output file names.
        with_predictions: also record every image's file, label and predicted class per angle.
        img_size, batch_size, num_workers: used only when ``data`` is a datalist.
        progress: show a tqdm progress bar.

    Returns:
        The dict written to ``output_dir/json_name`` (see ``monai_bundle/docs/evaluate_infer.md``
        for its fields).
    """
    started = time.perf_counter()
    names = [str(n) for n in class_names]
    angles = [float(a) for a in angles]
    if not angles or angles[0] != 0.0:
        raise ValueError(f"angles must start with 0 (the reference of agreement and of the "
                         f"confusion matrix), got {angles}")
    predict_fn = make_predict_fn(network, len(names), device, amp, inferer)
    loader = _as_loader(data, img_size, batch_size, num_workers)

    rot_rows: list[np.ndarray] = []
    d4_rows: list[np.ndarray] = []
    d4_angles: list[float] = []
    d4_names: list[str] = []
    labels: list[np.ndarray] = []
    files: list[str] = []
    for batch in _progress(loader, "rotation evaluation", progress):
        images = _as_tensor(batch["image"]).to(device)
        batch_labels = _as_tensor(batch["label"]).cpu().numpy().astype(np.int64).reshape(-1)
        if batch_labels.size and (batch_labels.min() < 0 or batch_labels.max() >= len(names)):
            raise ValueError(f"labels {sorted(set(batch_labels.tolist()))} are outside the "
                             f"checkpoint's {len(names)} classes {names}")
        sweep = rotation_sweep(predict_fn, images, batch_labels, angles,
                               batch_size=images.shape[0], padding_mode=padding_mode)
        rot_rows.append(sweep.predictions)
        if d4:
            exact = d4_sweep(predict_fn, images, batch_labels, batch_size=images.shape[0])
            d4_rows.append(exact.predictions)
            d4_angles, d4_names = exact.angles, list(exact.names or [])
        labels.append(batch_labels)
        if with_predictions:
            files += batch_files(batch)
    if not labels:
        raise ValueError("no images to evaluate")

    all_labels = np.concatenate(labels)
    rotation = summarise_sweep(np.concatenate(rot_rows, axis=1), all_labels, angles)
    matrix = confusion_matrix(all_labels, rotation.predictions[0], len(names))
    counts = np.bincount(all_labels, minlength=len(names))
    out_dir = Path(output_dir)
    label = model_name or "model"

    result: dict[str, Any] = {
        "model_name": model_name,
        **dict(extra or {}),
        "class_names": names,
        "num_images": int(all_labels.size),
        "num_images_per_class": {n: int(c) for n, c in zip(names, counts)},
        "protocol": {"padding_mode": padding_mode, "direction": "counter-clockwise",
                     "multiples_of_90": "exact rot90",
                     "other_angles": "pad, bilinear rotation about the centre, centre-crop"},
        "rotation": rotation.to_dict(),
        "accuracy_at_0": float(rotation.accuracy[0]),
        "confusion_matrix": {"angle": 0.0, "rows": "true class", "columns": "predicted class",
                             "class_names": names, "matrix": matrix.tolist()},
        "d4": None,
        "plot": plot_name,
    }
    if d4:
        result["d4"] = summarise_sweep(np.concatenate(d4_rows, axis=1), all_labels, d4_angles,
                                       d4_names).to_dict()
    if with_predictions:
        result["predictions"] = {
            "files": files, "labels": all_labels.tolist(),
            "rotation": rotation.predictions.tolist(),
            "d4": np.concatenate(d4_rows, axis=1).tolist() if d4 else None,
        }
    result["elapsed_s"] = round(time.perf_counter() - started, 3)

    with atomic_write(out_dir / plot_name) as tmp:
        plot_accuracy_polar({label: rotation}, tmp,
                            title=f"{label}: accuracy vs rotation ({all_labels.size} images)")
    json_path = atomic_write_text(out_dir / json_name, json.dumps(result, indent=2) + "\n")
    logger.info("%s: accuracy at 0 degrees %.4f, over %d angles %.4f +- %.4f; wrote %s",
                label, result["accuracy_at_0"], len(angles), rotation.mean, rotation.std,
                json_path)
    return result
