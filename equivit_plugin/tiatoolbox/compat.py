"""Work-arounds for TIAToolbox 2.1.x on the interpreters our users have.

Kept in one place so each can be dropped when TIAToolbox fixes it upstream.
"""

from __future__ import annotations

import sqlite3

__all__ = ["sqlite_compile_options", "patch_sqlite_store"]


def sqlite_compile_options() -> list[str]:
    """SQLite's ``pragma compile_options``; the same list ``SQLiteStore.compile_options``
    returns, without the ``enable_load_extension`` call that the pragma does not need."""
    with sqlite3.connect(":memory:") as conn:
        return [option for (option,) in conn.execute("pragma compile_options").fetchall()]


def patch_sqlite_store() -> bool:
    """Let ``SQLiteStore`` open on Pythons built without loadable SQLite extensions.

    ``SQLiteStore.__init__`` calls ``compile_options()``, which calls
    ``Connection.enable_load_extension``; CPython built without
    ``--enable-loadable-sqlite-extensions`` (pyenv's default, for one) has no such method, so
    every ``output_type="annotationstore"`` run fails with ``AttributeError``. Only then is
    ``compile_options`` replaced. Returns whether the patch was applied (idempotent).
    """
    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return False
    from tiatoolbox.annotation.storage import SQLiteStore

    SQLiteStore.compile_options = staticmethod(sqlite_compile_options)
    return True
