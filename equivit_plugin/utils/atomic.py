"""Files that appear whole or not at all.

Every file the package writes (checkpoints, training state, metrics JSON, prediction CSV,
plots, demo tiles, feature files) goes through here: it is written under a hidden temporary
name in the destination folder, flushed to disk, given the permissions a plain ``open()`` would
give it, and renamed over the destination. A crash or an exception leaves the previous file (or
nothing), never a truncated one.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_save", "atomic_write_json", "atomic_write_text",
           "commit_file", "default_file_mode", "stale_temporaries"]


def default_file_mode() -> int:
    """The permissions ``open(path, "w")`` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform or filesystem allows it.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit_file(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make the complete file ``tmp`` visible as ``path``: fsync, normal permissions, rename.

    ``tmp`` must be in ``path``'s folder (a rename across filesystems is not atomic).
    """
    tmp, path = Path(tmp), Path(path)
    _fsync_file(tmp)
    # mkstemp creates files owner-only (0600); give it what a plain open() would.
    os.chmod(tmp, default_file_mode())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def _temporary_affixes(path: Path) -> tuple[str, str]:
    """Prefix and suffix of :func:`atomic_path`'s temporary names for ``path``."""
    return f".{path.name}.", f".tmp{path.suffix}"


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files that :func:`atomic_path` writes of ``path``: those a killed process
    left behind (never another destination's: ``mkstemp``'s random infix has no dots)."""
    path = Path(path)
    prefix, suffix = _temporary_affixes(path)
    if not path.parent.is_dir():
        return []
    return [tmp for tmp in path.parent.glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}")
            if "." not in tmp.name[len(prefix):len(tmp.name) - len(suffix)]]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds, commit it as ``path``.

    The temporary name keeps ``path``'s suffix (matplotlib and PIL pick the format from it).
    An exception inside the block deletes it and leaves any previous ``path`` untouched.

    Example:
        >>> with atomic_path("plot.png") as tmp:  # doctest: +SKIP
        ...     figure.savefig(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temporary_affixes(path)
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        commit_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
    return Path(path)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON (with a final newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)
