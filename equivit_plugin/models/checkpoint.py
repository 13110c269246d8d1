"""Self-describing checkpoints: weights plus what is needed to rebuild and label the model.

A checkpoint is a ``torch.save`` dict::

    {"model": state_dict, "model_name": "equivit_ri_tiny_patch16_224",
     "model_kwargs": {"num_classes": 3, "img_size": 224, ...}, "class_names": [...],
     "format_version": 1, ...extra entries (epoch, metrics)...}

The MONAI bundle writes ``models/model.pt`` in this format; the TIAToolbox adapter and the
feature pipeline read it, so class names and architecture are never guessed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

__all__ = ["CHECKPOINT_FORMAT_VERSION", "atomic_save", "is_checkpoint_path", "load_checkpoint",
           "model_from_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT_VERSION = 1


def is_checkpoint_path(source: str | Path) -> bool:
    """Whether a ``--model``-style argument names a checkpoint file rather than a registered
    model: a ``Path``, a ``.pt``/``.pth`` name (existing or not, so a typo gives "file not
    found" rather than "unknown model"), or any existing file."""
    return isinstance(source, Path) or Path(str(source)).suffix in {".pt", ".pth"} \
        or Path(str(source)).is_file()


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A crash mid-write leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file owner-only; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: str | Path, model: nn.Module, model_name: str,
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
    payload = {"format_version": CHECKPOINT_FORMAT_VERSION, "model": state,
               "model_name": model_name, "model_kwargs": kwargs,
               "class_names": list(class_names) if class_names is not None else None, **extra}
    return atomic_save(payload, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
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


def model_from_checkpoint(path: str | Path, num_classes: int | None = None,
                          map_location: str | torch.device = "cpu",
                          **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights.

    Args:
        path: checkpoint file.
        num_classes: if given, must match the checkpoint's head (clear error otherwise).
        map_location: where to load tensors.
        **overrides: extra ``timm.create_model`` arguments (not architecture-changing).

    Returns:
        ``(model in eval mode, checkpoint dict without the state dict)``.
    """
    import equivit_plugin  # noqa: F401  (registers the models in timm)

    payload = load_checkpoint(path, map_location)
    kwargs = {**payload.get("model_kwargs", {}), **overrides}
    saved_classes = kwargs.get("num_classes")
    if num_classes is not None and saved_classes is not None and num_classes != saved_classes:
        names = payload.get("class_names")
        raise ValueError(
            f"{path} has a {saved_classes}-class head ({names}), but {num_classes} classes "
            f"were asked for"
        )
    model = timm.create_model(payload["model_name"], **kwargs)
    state = {k: v.float() if v.dtype == torch.float16 else v for k, v in payload["model"].items()}
    model.load_state_dict(state)
    info = {k: v for k, v in payload.items() if k != "model"}
    return model.eval(), info
