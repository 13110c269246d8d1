"""A cache for tensors derived from parameters (dense kernels), safe against stale values."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class DerivedTensorCache:
    """Holds one tensor computed from parameters; rebuilt whenever any of them changed.

    The key is every parameter's version counter (bumped by every in-place update: optimizer
    steps, ``load_state_dict``), storage, dtype and device, so a cached value is never stale.
    Caching applies only in eval mode with no gradient wanted: in training (or when gradients
    flow into the parameters) the tensor is rebuilt every call so autograd sees it. Tracing,
    scripting and ``torch.compile`` always rebuild, so compiled graphs hold no Python state.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: torch.Tensor | None = None

    def clear(self) -> None:
        self._key, self._value = None, None

    @staticmethod
    def _cacheable(module: nn.Module, params: Sequence[torch.Tensor]) -> bool:
        if module.training or torch.jit.is_tracing() or torch.jit.is_scripting():
            return False
        if torch.compiler.is_compiling():
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in params))

    def get(self, module: nn.Module, params: Sequence[torch.Tensor],
            build: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not self._cacheable(module, params):
            return build()
        key = (torch.is_inference_mode_enabled(),) + tuple(
            (p._version, p.data_ptr(), p.dtype, p.device) for p in params
        )
        if key != self._key or self._value is None:
            self._value = build()
            self._key = key
        return self._value

    def __deepcopy__(self, memo: dict) -> DerivedTensorCache:
        return DerivedTensorCache()

    def __getstate__(self) -> dict:
        return {"_key": None, "_value": None}
