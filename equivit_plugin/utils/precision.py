"""Compute precision: one table of names for every door (CLI, TIAToolbox adapter, pipelines).

``fp32`` runs in float32; ``bf16`` and ``fp16`` run the forward pass under
``torch.autocast`` with that dtype. Importing this module does not import torch, so the
command line can offer the choices without paying for it.
"""

from __future__ import annotations

import contextlib
from typing import Any

__all__ = ["PRECISIONS", "autocast", "autocast_dtype", "canonical_precision"]

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
"""Accepted precision names (also accepted: ``float32``, ``bfloat16``, ``float16``, a
``torch.dtype`` and ``None`` for fp32)."""

_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "none": "fp32"}
_DTYPE_NAMES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def canonical_precision(value: Any, argument: str = "precision") -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` for any accepted spelling of a precision.

    Args:
        value: a name (any case), an alias, a ``torch.dtype`` or ``None`` (fp32).
        argument: the caller's argument name, for the error message.

    Raises:
        ValueError: an unknown precision (the message names ``argument`` and the choices).
    """
    if value is None:
        return "fp32"
    text = str(value).lower().removeprefix("torch.")
    text = _ALIASES.get(text, text)
    if text not in PRECISIONS:
        raise ValueError(f"{argument}= must be one of {list(PRECISIONS)}, got {value!r}")
    return text


def autocast_dtype(precision: Any) -> Any:
    """The ``torch.autocast`` dtype of ``precision`` (``None`` for fp32)."""
    name = _DTYPE_NAMES[canonical_precision(precision)]
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def autocast(device_type: str, precision: Any) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, dtype)`` for ``bf16``/``fp16``; a no-op for fp32."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type, dtype=dtype)
