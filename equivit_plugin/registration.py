"""Registering the Equi-ViT family in timm when timm is imported, not before.

``import equivit_plugin`` must be instant (the ``equivit`` command's ``--help``, a CLI that only
parses arguments) yet ``timm.create_model("equivit_ri_small_patch16_224")`` must work right
after it. Registering (:mod:`equivit_plugin.models.registry`) needs timm, which costs seconds.
So the package defers it: if timm is already imported the models are registered at once;
otherwise an import hook registers them the moment timm's own import finishes, whoever
imported it (the user, or the package's own layers). Either order of ``import timm`` and
``import equivit_plugin`` gives the same registry.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Any

__all__ = ["register_models_with_timm"]

_MODELS = "equivit_plugin.models.registry"
_lock = threading.Lock()


class _RegisterAfterExec(importlib.abc.Loader):
    """Wraps timm's loader: runs it, then imports (so registers) the Equi-ViT models."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Restore timm's own loader first: resource readers and reloads see the real one.
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _remove_hook()
        importlib.import_module(_MODELS)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _TimmImportHook(importlib.abc.MetaPathFinder):
    """Finds timm with the other finders and wraps its loader. Stays on ``sys.meta_path`` until
    timm is actually executed: ``importlib.util.find_spec("timm")`` (an availability check
    that many libraries make) imports nothing and must not use the hook up."""

    def find_spec(self, fullname: str, path: Any = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "timm":
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def _remove_hook() -> None:
    with _lock:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TimmImportHook)]


def register_models_with_timm() -> None:
    """Register the models now if timm is imported, else as soon as it is (idempotent)."""
    if "timm" in sys.modules:
        importlib.import_module(_MODELS)
        return
    with _lock:
        if not any(isinstance(finder, _TimmImportHook) for finder in sys.meta_path):
            sys.meta_path.insert(0, _TimmImportHook())
