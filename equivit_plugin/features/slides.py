"""Which slides to process, and opening one slide with a known resolution.

``SLIDES`` arguments (CLI) or the ``slides`` argument of
:func:`~equivit_plugin.features.extract_features` may mix:

* slide files (any format TIAToolbox's ``WSIReader.open`` reads: OpenSlide formats, TIFF,
  plain PNG/JPEG images);
* directories (their slide files, not recursive);
* glob patterns (``"data/**/*.svs"``, recursive ``**`` allowed);
* ``.txt`` lists (one path a line, ``#`` comments) and ``.csv`` lists (the column ``path`` or
  ``slide``, else the first column). Relative paths in a list are taken relative to the list
  file's folder.

Paths that do not exist are *kept*: the run reports them as failed slides instead of silently
dropping them.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import glob
import importlib.util
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SLIDE_SUFFIXES", "OpenedSlide", "SlideError", "open_slide",
           "quiet_tiatoolbox", "reopen", "resolve_slides"]

SLIDE_SUFFIXES: frozenset[str] = frozenset({
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif",
    ".qptiff", ".dcm", ".png", ".jpg", ".jpeg",
})
"""File suffixes taken as slides when a directory is listed (lower case)."""

_LIST_SUFFIXES = {".txt", ".csv"}
_CSV_COLUMNS = ("path", "slide")


class SlideError(RuntimeError):
    """A slide cannot be used (unreadable, no resolution...); the message names the slide."""


def _is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def _from_list(path: Path) -> list[Path]:
    """Paths listed in a ``.txt`` (one a line) or ``.csv`` file, relative to its folder."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".txt":
        entries = [line.strip() for line in text.splitlines()]
        entries = [e for e in entries if e and not e.startswith("#")]
    else:
        rows = [row for row in csv.reader(text.splitlines()) if row and any(c.strip() for c in row)]
        if not rows:
            return []
        header = [cell.strip().lower() for cell in rows[0]]
        column = next((header.index(name) for name in _CSV_COLUMNS if name in header), None)
        if column is not None:
            rows = rows[1:]
        else:
            column = 0
            first = rows[0][0].strip()
            # A header naming other columns is dropped; a first row that is already a slide
            # path (no header) is kept.
            looks_like_path = (Path(first).suffix.lower() in SLIDE_SUFFIXES
                               or (path.parent / first).exists() or Path(first).exists())
            if not looks_like_path:
                rows = rows[1:]
        entries = [row[column].strip() for row in rows if len(row) > column and row[column].strip()]
    base = path.parent
    return [Path(e) if Path(e).is_absolute() else base / e for e in entries]


def _expand(item: str | Path) -> list[Path]:
    path = Path(item)
    if path.is_dir():
        return sorted(p for p in path.iterdir()
                      if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
    if path.suffix.lower() in _LIST_SUFFIXES and path.is_file():
        return _from_list(path)
    if not path.exists() and _is_glob(str(item)):
        return sorted(Path(p) for p in glob.glob(str(item), recursive=True)
                      if Path(p).is_file())
    return [path]


def resolve_slides(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand files, directories, globs and ``.txt``/``.csv`` lists into a sorted slide list.

    The order is sorted by absolute path (every ``torchrun`` rank computes the same list and
    takes ``slides[rank::world_size]``); duplicates are dropped.

    Raises:
        ValueError: nothing to process, or two slides share a file stem (their outputs,
            ``<stem>.h5``, would collide); the message names the inputs or both files.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    found: set[Path] = set()
    for item in inputs:
        # Absolute and normalised: the same list on every rank, duplicates recognised.
        found.update(Path(os.path.abspath(path)) for path in _expand(item))
    if not found:
        raise ValueError(f"no slides found in {[str(i) for i in inputs]} (give slide files, a "
                         f"directory, a glob or a .txt/.csv list)")
    slides = sorted(found)
    stems: dict[str, Path] = {}
    for slide in slides:
        other = stems.setdefault(slide.stem, slide)
        if other != slide:
            raise ValueError(f"two slides share the name {slide.stem!r}: {other} and {slide}; "
                             f"their outputs would collide (rename one or run them separately)")
    return slides


class _DropTiatoolboxWarnings(logging.Filter):
    """Drops records below ``ERROR`` logged from inside the TIAToolbox package."""

    def __init__(self, package_dir: str) -> None:
        super().__init__()
        self.package_dir = package_dir

    def filter(self, record: logging.LogRecord) -> bool:
        inside = os.path.normcase(os.path.abspath(record.pathname)).startswith(self.package_dir)
        return not (inside and record.levelno < logging.ERROR)


@functools.lru_cache(maxsize=1)
def _tiatoolbox_dir() -> str | None:
    spec = importlib.util.find_spec("tiatoolbox")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.abspath(next(iter(spec.submodule_search_locations)))
    return os.path.normcase(folder) + os.sep


@contextlib.contextmanager
def quiet_tiatoolbox() -> Iterator[None]:
    """Drop TIAToolbox's own log records below ``ERROR`` for the duration of the block.

    TIAToolbox logs through the *root* logger; every ``VirtualWSIReader`` it builds (opening a
    plain image, and each tissue mask) logs "Raw data is None" and "Unknown scale (no
    objective_power or mpp)" even when the resolution is given; our own :class:`SlideError`
    says what matters. Only records whose source file is inside the ``tiatoolbox`` package are
    dropped (a filter on the root logger, removed afterwards): everything else, the caller's
    own warnings included, still gets through, during the block and after it.
    """
    package_dir = _tiatoolbox_dir()
    if package_dir is None:
        yield
        return
    drop = _DropTiatoolboxWarnings(package_dir)
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


@dataclass
class OpenedSlide:
    """An open slide and the resolution it is read at.

    Attributes:
        path: the slide file.
        reader: TIAToolbox ``WSIReader`` (not picklable: never hand it to a worker).
        level0_mpp: ``(x, y)`` micrometres per pixel of level 0.
        mpp_override: the ``mpp`` to pass to ``WSIReader.open`` to read this slide again the
            same way (``None``: the file's metadata is used).
        dimensions: level-0 ``(width, height)``.
    """

    path: Path
    reader: Any
    level0_mpp: tuple[float, float]
    mpp_override: tuple[float, float] | None
    dimensions: tuple[int, int]


def reopen(path: str | Path, mpp_override: tuple[float, float] | None) -> Any:
    """``WSIReader.open`` as :func:`open_slide` did (used in each DataLoader worker)."""
    from tiatoolbox.wsicore.wsireader import WSIReader

    with quiet_tiatoolbox():
        reader = WSIReader.open(str(path), mpp=mpp_override) if mpp_override \
            else WSIReader.open(str(path))
        _ = reader.info  # built (and logged about) on first access, then cached: do it here
    return reader


def open_slide(path: str | Path, slide_mpp: float | None = None) -> OpenedSlide:
    """Open a slide with TIAToolbox and establish its level-0 resolution.

    Args:
        path: slide file.
        slide_mpp: micrometres per pixel to assume when the file has no resolution metadata
            (plain PNG/JPEG, some TIFFs). Metadata, when present, wins.

    Raises:
        SlideError: missing, unreadable or unsupported file, or no resolution and no
            ``slide_mpp``; the message names the slide.
    """
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: no such file")
    try:
        reader = reopen(path, None)
        mpp = reader.info.mpp
        override = None
        if mpp is None or any(v is None or not float(v) > 0 for v in mpp):
            if slide_mpp is None:
                raise SlideError(f"{path}: the slide has no resolution metadata (microns per "
                                 f"pixel); pass --slide-mpp (slide_mpp=) to give it")
            override = (float(slide_mpp), float(slide_mpp))
            reader = reopen(path, override)
            mpp = reader.info.mpp
        width, height = (int(v) for v in reader.info.slide_dimensions)
    except SlideError:
        raise
    except Exception as error:  # OpenSlide, tifffile, PIL... each has its own exceptions
        raise SlideError(f"{path}: cannot open slide ({type(error).__name__}: {error})") \
            from error
    if width <= 0 or height <= 0:
        raise SlideError(f"{path}: the slide is empty ({width}x{height} pixels)")
    return OpenedSlide(path=path, reader=reader, level0_mpp=(float(mpp[0]), float(mpp[1])),
                       mpp_override=override, dimensions=(width, height))
