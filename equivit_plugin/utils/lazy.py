"""Lazy attributes for a package's ``__init__`` (PEP 562): the public names are listed once,
with the submodule each lives in, and a submodule is imported the first time one of its names
is used. Keeps ``import equivit_plugin`` (and the CLI's imports) free of torch and friends."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, names: Mapping[str, str], namespace: dict[str, Any],
                    submodules: Iterable[str] = ()) -> tuple[Callable[[str], Any],
                                                             Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``'s ``__init__``.

    Args:
        package: the package's ``__name__``.
        names: ``{public name: submodule (relative to package)}``.
        namespace: the package's ``globals()``; a resolved name is cached there, so the lookup
            happens once.
        submodules: submodules reachable as attributes (``package.models``) without an import.
    """
    modules = tuple(submodules)

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(f".{names[name]}", package), name)
        elif name in modules:
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *names, *modules})

    return __getattr__, __dir__
