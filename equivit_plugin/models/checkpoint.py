"""Self-describing checkpoints: weights plus what is needed to rebuild and label the model.

A checkpoint is a ``torch.save`` dict::

    {"model": state_dict, "model_name": "equivit_ri_tiny_patch16_224",
     "model_kwargs": {"num_classes": 3, "img_size": 224, ...}, "class_names": [...],
     "format_version": 1, ...extra entries (epoch, metrics)...}

The MONAI bundle writes ``models/model.pt`` in this format;
:func:`~equivit_plugin.models.load_model` reads it for every door (MONAI, TIAToolbox, the
feature pipeline), so class names and architecture are never guessed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.atomic import atomic_save

__all__ = ["CHECKPOINT_FORMAT_VERSION", "check_class_names", "checkpoint_weights", "file_sha256",
           "is_checkpoint_path", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT_VERSION = 1


def is_checkpoint_path(source: str | os.PathLike) -> bool:
    """Whether a ``--model``-style argument names a checkpoint file rather than a registered
    model: a ``Path``, a ``.pt``/``.pth`` name (existing or not, so a typo gives "file not
    found" rather than "unknown model"), or any existing file."""
    return isinstance(source, os.PathLike) or Path(str(source)).suffix in {".pt", ".pth"} \
        or Path(str(source)).is_file()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_class_names(class_names: Sequence[str] | None, num_classes: int | None,
                      source: str) -> list[str] | None:
    """The class names as a list of ``str``, checked against the head size.

    Args:
        class_names: label names in logit order, or ``None``.
        num_classes: the head's size ``K`` (``None``: unknown, not checked).
        source: what the names belong to, for the message (a checkpoint path, a model name).

    Raises:
        ValueError: ``len(class_names) != num_classes`` (both named).
    """
    if class_names is None:
        return None
    names = [str(name) for name in class_names]
    if num_classes is not None and len(names) != int(num_classes):
        raise ValueError(f"{source}: {len(names)} class names {names} for a "
                         f"{int(num_classes)}-class head")
    return names


def save_checkpoint(path: str | os.PathLike, model: nn.Module, model_name: str,
                    class_names: Sequence[str] | None = None,
                    model_kwargs: Mapping[str, Any] | None = None,
                    half: bool = False, **extra: Any) -> Path:
    """Write a self-describing checkpoint atomically.

    Args:
        path: output file.
        model: the network (a ``DistributedDataParallel`` wrapper is unwrapped).
        model_name: timm registry name the model was built from.
        class_names: label names in logit order.
        model_kwargs: the ``timm.create_model`` arguments (``num_classes``, ``img_size``...).
        half: store floating-point weights as float16 (a smaller file; loading casts back).
        **extra: anything else to keep (epoch, metrics).
    """
    model = getattr(model, "module", model)
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu()
             for k, v in model.state_dict().items()}
    kwargs = dict(model_kwargs or {})
    if class_names is not None:
        kwargs.setdefault("num_classes", len(class_names))
        check_class_names(class_names, kwargs["num_classes"], str(path))
    payload = {"format_version": CHECKPOINT_FORMAT_VERSION, "model": state,
               "model_name": model_name, "model_kwargs": kwargs,
               "class_names": list(class_names) if class_names is not None else None, **extra}
    return atomic_save(payload, path)


def load_checkpoint(path: str | os.PathLike,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a checkpoint of this format (message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable torch checkpoint: {error}") from error
    if not isinstance(payload, dict) or "model" not in payload or "model_name" not in payload:
        raise ValueError(
            f"{path} is not an equivit checkpoint: expected a dict with 'model' and "
            f"'model_name' (written by equivit_plugin.models.save_checkpoint)"
        )
    return payload


def checkpoint_weights(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of a :func:`load_checkpoint` payload, float16 weights (``half=True``)
    cast back to float32."""
    return {k: v.float() if v.dtype == torch.float16 else v for k, v in payload["model"].items()}
