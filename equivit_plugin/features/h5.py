"""The per-slide feature file: an atomic, streaming HDF5 writer and :func:`read_features`.

Layout (CLAM's ``h5_files``/``pt_files``; datasets and ``coords`` attributes as TRIDENT
writes them, so both projects' MIL trainers and TRIDENT's slide encoders read it)::

    <out>/h5_files/<slide_stem>.h5
        features   (N, D) float32|float16   attrs: encoder, checkpoint_sha256,
                                            package_version, precision, d4_average, name,
                                            embedding, normalisation_mean/_std
        coords     (N, 2) int64             attrs: patch_size, patch_size_level0,
                                            level0_width, level0_height, target_mpp,
                                            target_magnification, level0_mpp,
                                            level0_magnification, overlap, stride, name,
                                            tissue_mask, min_tissue, context_size,
                                            context_margin_level0
    <out>/pt_files/<slide_stem>.pt          (with also_pt) torch.save of the (N, D) tensor

``coords`` are level-0 pixel top-left corners ``(x, y)`` of the grid cells (``patch_size``
wide); row ``i`` of ``features`` belongs to row ``i`` of ``coords``. The region that was
embedded for a cell is the ``context_size`` square (pixels at ``target_mpp``; equal to
``patch_size`` when the cell alone was embedded) centred on it, whose level-0 top-left corner
is ``coords - context_margin_level0``: ``read_rect(coords[i] - context_margin_level0,
(context_size, context_size), resolution=target_mpp, units="mpp")``. Files written before
contexts existed lack both attributes and embedded the cell alone.

A file is written under a hidden temporary name in the same folder (``.<stem>.h5.partial``, a
fixed name so that a later run finds and removes what a killed one left), flushed, fsynced,
given normal permissions and then renamed (:func:`~equivit_plugin.utils.atomic.commit_file`):
a visible ``<stem>.h5`` is always complete, and a killed run leaves at most a temporary file,
which the next run overwrites.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..utils.atomic import commit_file

__all__ = ["FeatureWriter", "is_complete", "partial_path", "read_attrs", "read_features"]

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | Path) -> Path:
    """The temporary name ``path`` is written under before the final rename."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def _attr(value: Any) -> Any:
    """An HDF5-storable attribute value (``None`` -> ``""``, bools kept as numpy bools)."""
    if value is None:
        return ""
    if isinstance(value, Path):
        return str(value)
    return value


def _python(value: Any) -> Any:
    """numpy scalars/bytes read from HDF5 -> plain Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


class FeatureWriter:
    """Stream ``(features, coords)`` batches into ``<path>`` atomically.

    Usage::

        with FeatureWriter(path, dim=384, dtype="float32", coords_attrs={...},
                           features_attrs={...}) as writer:
            for feats, xy in batches:        # (B, D) and (B, 2)
                writer.append(feats, xy)
            writer.commit()                  # rename into place; without it nothing appears

    Leaving the ``with`` block without :meth:`commit` (an exception) deletes the temporary
    file. ``expected_rows`` (the tile count, when known) only sizes the HDF5 chunks. Memory
    use does not depend on the number of tiles: every batch goes to disk.
    """

    def __init__(self, path: str | Path, dim: int, dtype: str | np.dtype = "float32", *,
                 coords_attrs: Mapping[str, Any] | None = None,
                 features_attrs: Mapping[str, Any] | None = None,
                 expected_rows: int | None = None) -> None:
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # "w" truncates a temporary file a killed run may have left behind.
        self._file: h5py.File | None = h5py.File(self.tmp, "w")
        # Chunks of at most about 1 MiB (fast streaming, cheap partial reads), but no bigger
        # than the slide needs: HDF5 allocates whole chunks, so a 1 MiB chunk would pad
        # a small slide's file to 1 MiB.
        rows = max(1, min(4096, (1 << 20) // max(1, self.dim * self.dtype.itemsize)))
        if expected_rows is not None:
            rows = max(1, min(rows, int(expected_rows)))
        self._features = self._file.create_dataset(
            "features", shape=(0, self.dim), maxshape=(None, self.dim), dtype=self.dtype,
            chunks=(rows, self.dim))
        self._coords = self._file.create_dataset(
            "coords", shape=(0, 2), maxshape=(None, 2), dtype=np.int64, chunks=(rows, 2))
        for key, value in (coords_attrs or {}).items():
            self._coords.attrs[key] = _attr(value)
        for key, value in (features_attrs or {}).items():
            self._features.attrs[key] = _attr(value)
        self.n = 0

    def append(self, features: np.ndarray, coords: np.ndarray) -> None:
        """Append ``(B, D)`` features and their ``(B, 2)`` level-0 coordinates."""
        features = np.asarray(features)
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected ({len(coords)}, {self.dim}) features, "
                             f"got {features.shape}")
        if len(features) != len(coords):
            raise ValueError(f"{len(features)} feature rows for {len(coords)} coordinates")
        start, self.n = self.n, self.n + len(features)
        self._features.resize(self.n, axis=0)
        self._coords.resize(self.n, axis=0)
        self._features[start:self.n] = features.astype(self.dtype, copy=False)
        self._coords[start:self.n] = coords

    def write_rows(self, rows: np.ndarray, features: np.ndarray, coords: np.ndarray) -> None:
        """Write ``(B, D)`` features and their ``(B, 2)`` coordinates at row indices ``rows``
        (``(B,)``, any order, each row once): for readers that deliver a slide's tiles out of
        order. The datasets grow to the largest row; :attr:`n` counts the rows written."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        features = np.asarray(features)
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        if features.ndim != 2 or features.shape[1] != self.dim or len(features) != len(rows) \
                or len(coords) != len(rows):
            raise ValueError(f"expected ({len(rows)}, {self.dim}) features and ({len(rows)}, 2) "
                             f"coordinates, got {features.shape} and {coords.shape}")
        if not len(rows):
            return
        size = max(self._features.shape[0], int(rows.max()) + 1)
        if size > self._features.shape[0]:
            self._features.resize(size, axis=0)
            self._coords.resize(size, axis=0)
        features = features.astype(self.dtype, copy=False)
        order = np.argsort(rows, kind="stable")
        rows, features, coords = rows[order], features[order], coords[order]
        # one slice assignment per run of consecutive rows (HDF5 writes hyperslabs fast)
        cuts = [0, *(np.flatnonzero(np.diff(rows) != 1) + 1).tolist(), len(rows)]
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            start = int(rows[a])
            self._features[start:start + b - a] = features[a:b]
            self._coords[start:start + b - a] = coords[a:b]
        self.n += len(rows)

    def close_temporary(self) -> Path:
        """Flush and close the temporary file (complete, not yet visible or fsynced); returns its
        path."""
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None
        return self.tmp

    def commit(self) -> Path:
        """Close the file, fsync it and rename it to :attr:`path`
        (:func:`~equivit_plugin.utils.atomic.commit_file`); returns :attr:`path`."""
        self.close_temporary()
        return commit_file(self.tmp, self.path)

    def abort(self) -> None:
        """Close and delete the temporary file."""
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None or self.tmp.exists():
            self.abort()


def is_complete(path: str | Path) -> bool:
    """``path`` is a readable feature file (``features`` and ``coords`` of equal length).

    Files appear only complete (atomic rename); this also rejects a foreign or damaged file
    of the same name, which is then rewritten.
    """
    try:
        with h5py.File(path, "r") as handle:
            features, coords = handle["features"], handle["coords"]
            return (features.ndim == 2 and coords.shape[1:] == (2,)
                    and features.shape[0] == coords.shape[0])
    except Exception:  # missing, not HDF5, truncated, missing datasets...
        return False


def read_attrs(path: str | Path) -> dict[str, Any]:
    """Attributes of ``coords`` and ``features`` (one dict; see the module docstring)."""
    with h5py.File(path, "r") as handle:
        attrs = {k: _python(v) for k, v in handle["coords"].attrs.items()}
        attrs.update({k: _python(v) for k, v in handle["features"].attrs.items()})
    return attrs


def read_features(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a feature file written by :func:`~equivit_plugin.features.extract_features`
    (or any CLAM/TRIDENT-style file with ``features`` and ``coords``).

    Args:
        path: the ``.h5`` file (``<out>/h5_files/<slide_stem>.h5``).

    Returns:
        ``(features (N, D), coords (N, 2) int64 level-0 (x, y), attrs)``, ``attrs`` being the
        attributes of both datasets merged into one dict of plain Python values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}")
    try:
        with h5py.File(path, "r") as handle:
            features = handle["features"][()]
            coords = handle["coords"][()].astype(np.int64, copy=False)
    except KeyError as error:
        raise ValueError(f"{path}: expected datasets 'features' and 'coords' ({error})") \
            from error
    return features, coords, read_attrs(path)
