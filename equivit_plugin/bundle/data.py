"""Data layer of the MONAI bundle: tile discovery, train/validation splits and MONAI transforms.

Everything here is meant to be called from bundle JSON configs through ``_target_`` with plain
arguments (``str`` paths, numbers, booleans) and returns plain lists of dicts or MONAI objects::

    "class_names": {"_target_": "equivit_plugin.bundle.data.class_names",
                    "dataset_dir": "@dataset_dir"},
    "train_items": {"_target_": "equivit_plugin.bundle.data.datalist",
                    "dataset_dir": "@dataset_dir", "val_dir": "@val_dir", "part": "train"},
    "train_transforms": {"_target_": "equivit_plugin.bundle.data.tile_transforms",
                         "img_size": 224, "augment": "@augment"},
    "train_dataset": {"_target_": "CacheDataset", "data": "@train_items",
                      "transform": "@train_transforms", "cache_rate": 1.0}

Dataset layout (NCT-CRC-HE-100K): ``dataset_dir/<CLASS>/<tile>.{tif,tiff,png,jpg,jpeg}``. Class
names are the sub-folder names sorted with Python's ``str`` ordering; a tile's label is the index
of its class in that list. A datalist item is ``{"image": str, "label": int, "class_name": str}``.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import PILReader, partition_dataset_classes
from monai.transforms import (
    CenterSpatialCrop,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    RandAffined,
    RandFlipd,
    RandRotate90d,
    Resized,
    ScaleIntensityRanged,
)
from PIL import Image

from ..models import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "AUGMENTATIONS",
    "FITS",
    "IMAGE_SUFFIXES",
    "CenterSquareCropd",
    "EnsureRGBd",
    "LoadTiled",
    "TileContextReader",
    "TileReadError",
    "check_readable",
    "class_folders",
    "class_names",
    "datalist",
    "discover_tiles",
    "image_files_below",
    "is_image_file",
    "split_tiles",
    "tile_pixels",
    "tile_transforms",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
"""Tile file suffixes, compared case-insensitively."""

AUGMENTATIONS: tuple[str, ...] = ("none", "d4", "any_angle")
"""Random geometric augmentations of :func:`tile_transforms` (see there)."""

FITS: tuple[str, ...] = ("crop", "resize")
"""How :func:`tile_transforms` brings a tile to ``img_size x img_size`` (see there)."""

MANIFEST_NAME = "MANIFEST.csv"
_MANIFEST_PATH_COLUMNS = ("file", "path", "image", "filename")
_EXPECTED_IMAGE = (
    f"expected an 8-bit grayscale, RGB or RGBA image readable by PIL "
    f"({'/'.join(IMAGE_SUFFIXES)})"
)


class TileReadError(ValueError):
    """An image file could not be read as a tile; the message names the file."""


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a visible file with a tile suffix (:data:`IMAGE_SUFFIXES`, any case).

    Hidden files are not tiles: they include macOS ``._tile.png`` resource forks.
    """
    path = Path(path)
    visible = not path.name.startswith(".")
    return visible and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def image_files_below(folder: str | os.PathLike) -> list[Path]:
    """Every image file (:func:`is_image_file`) in ``folder`` or below it, resolved, sorted.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: it holds no image file (the message names it).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    # Resolved, so a tile's name does not depend on the working directory or on links to it.
    found = [p.resolve() for p in sorted(root.rglob("*")) if is_image_file(p)]
    if not found:
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it or "
                         f"below it")
    return found


def class_folders(dataset_dir: str | os.PathLike) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``dataset_dir`` (no count check).

    Raises:
        FileNotFoundError, NotADirectoryError: ``dataset_dir`` is missing or a file.
        ValueError: no sub-folder at all (the message counts loose images).
    """
    root = Path(dataset_dir)
    if not root.exists():
        raise FileNotFoundError(f"dataset directory not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"dataset path is not a directory: {root}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        loose = sum(1 for p in root.iterdir() if is_image_file(p))
        hint = f"; found {loose} image file(s) directly in it" if loose else ""
        raise ValueError(
            f"dataset directory {root} has no class sub-folders{hint}: expected one sub-folder "
            f"per class holding {'/'.join(IMAGE_SUFFIXES)} tiles (NCT-CRC-HE-100K layout)"
        )
    return folders


def _check_class_list(names: Sequence[str], source: str) -> list[str]:
    names = [str(n) for n in names]
    if len(names) < 2:
        raise ValueError(f"{source}: a classifier needs at least 2 classes, found {names}")
    duplicates = sorted(n for n, c in Counter(names).items() if c > 1)
    if duplicates:
        raise ValueError(f"{source}: duplicate class names {duplicates}")
    return names


def class_names(dataset_dir: str) -> list[str]:
    """Class names of a dataset folder: its sub-folder names, sorted.

    Args:
        dataset_dir: folder with one sub-folder per class.

    Returns:
        ``list[str]`` of at least 2 names; ``label`` indices refer to this order.

    Raises:
        FileNotFoundError: ``dataset_dir`` does not exist.
        ValueError: fewer than 2 class folders (the message names the folder and what it found).
    """
    return _check_class_list(class_folders(dataset_dir), f"dataset directory {dataset_dir}")


def discover_tiles(dataset_dir: str, class_names: Sequence[str] | None = None) -> list[dict]:
    """List every tile of a class-per-folder dataset.

    Args:
        dataset_dir: folder with one sub-folder per class (``<CLASS>/<tile>.png`` etc.).
        class_names: the classes labels refer to, e.g. the training classes when listing a
            validation folder that lacks some of them. ``None``: the folder's own sorted classes.

    Returns:
        ``[{"image": str, "label": int, "class_name": str}, ...]`` sorted by label, then path.

    Raises:
        FileNotFoundError: ``dataset_dir`` does not exist.
        ValueError: fewer than 2 classes; a class folder without images; a folder class that is
            not in ``class_names``.
    """
    folders = class_folders(dataset_dir)
    if class_names is None:
        names = _check_class_list(folders, f"dataset directory {dataset_dir}")
    else:
        names = _check_class_list(class_names, "class_names")
        unknown = [f for f in folders if f not in names]
        if unknown:
            raise ValueError(
                f"dataset directory {dataset_dir} has class folder(s) {unknown} that are not among "
                f"the expected classes {names}"
            )
    items = []
    for folder in folders:
        folder_path = Path(dataset_dir) / folder
        files = sorted(p for p in folder_path.iterdir() if is_image_file(p))
        if not files:
            raise ValueError(
                f"class folder {folder_path} contains no images ({'/'.join(IMAGE_SUFFIXES)})"
            )
        label = names.index(folder)
        items += [{"image": str(f), "label": label, "class_name": folder} for f in files]
    return items


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def _dataset_root(items: Sequence[Mapping[str, Any]], key: str) -> Path:
    """The folder holding the class folders of ``items`` (must be the same for all)."""
    roots = sorted({str(Path(item[key]).parent.parent) for item in items})
    if len(roots) != 1:
        raise ValueError(
            f"items come from several dataset roots {roots[:3]}: pass `manifest` explicitly "
            f"(a {MANIFEST_NAME} path, or None for no groups)"
        )
    return Path(roots[0])


def _read_groups(manifest: Path) -> dict[str, str]:
    """``{relative posix path: group_id}`` from a manifest with a ``group_id`` column."""
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        path_column = next((c for c in _MANIFEST_PATH_COLUMNS if c in columns), None)
        if "group_id" not in columns or path_column is None:
            raise ValueError(
                f"manifest {manifest} needs a 'group_id' column and a file-path column (one of "
                f"{list(_MANIFEST_PATH_COLUMNS)}); found columns {columns}"
            )
        groups = {}
        for row_number, row in enumerate(reader, start=2):
            group = (row["group_id"] or "").strip()
            if not group:
                raise ValueError(f"manifest {manifest} line {row_number}: empty group_id")
            groups[Path(os.path.normpath(row[path_column])).as_posix()] = group
    return groups


def _has_group_column(manifest: Path) -> bool:
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        return "group_id" in (csv.DictReader(handle).fieldnames or [])


def _resolve_manifest(
    items: Sequence[Mapping[str, Any]], manifest: str | None, key: str
) -> Path | None:
    """The manifest to split by group with, or ``None`` for a split by tile."""
    if manifest is None or manifest == "":
        return None
    if manifest != "auto":
        path = Path(manifest)
        if not path.is_file():
            raise FileNotFoundError(f"manifest not found: {path}")
        return path
    candidate = _dataset_root(items, key) / MANIFEST_NAME
    # A manifest without group_id (e.g. checksums only) says nothing about leakage: split by tile.
    if candidate.is_file() and _has_group_column(candidate):
        return candidate
    return None


def _group_keys(items: Sequence[Mapping[str, Any]], manifest: Path | None, key: str) -> list[str]:
    """One group key per item: its manifest ``group_id``, or its own path without a manifest."""
    if manifest is None:
        return [str(item[key]) for item in items]
    groups = _read_groups(manifest)
    root = os.path.abspath(manifest.parent)
    keys, missing = [], []
    for item in items:
        relative = Path(os.path.relpath(os.path.abspath(item[key]), root)).as_posix()
        if relative not in groups:
            missing.append(str(item[key]))
        # Prefix so that a group id can never collide with a tile path used as a group key.
        keys.append(f"group:{groups.get(relative, '')}")
    if missing:
        raise ValueError(
            f"{len(missing)} tile(s) are not listed in manifest {manifest}, so their group is "
            f"unknown (first: {missing[0]}); add them or pass manifest=None to split by tile"
        )
    return keys


def split_tiles(
    items: Sequence[Mapping[str, Any]],
    part: str = "train",
    val_fraction: float = 0.2,
    seed: int = 0,
    manifest: str | None = "auto",
    key: str = "image",
) -> list[dict]:
    """One part of a deterministic, class-stratified train/validation split.

    Without groups every tile is split on its own. With groups (a ``MANIFEST.csv`` with a
    ``group_id`` column and a file-path column relative to the dataset root, e.g. ``file``) whole
    groups are split, so no group is in both parts. Stratification uses MONAI's
    :func:`~monai.data.partition_dataset_classes` over the groups, each group labelled with its
    most frequent class; ``val_fraction`` is therefore a fraction of groups per class.

    Args:
        items: datalist from :func:`discover_tiles` (dicts with ``key`` and ``"label"``).
        part: ``"train"`` or ``"val"``.
        val_fraction: share of each class's tiles/groups held out, in ``(0, 1)``.
        seed: shuffling seed; the same inputs and seed always give the same split.
        manifest: ``"auto"`` uses ``<dataset root>/MANIFEST.csv`` when it has a ``group_id``
            column (the dataset root is the parent of the class folders); a path forces that
            manifest; ``None`` or ``""`` splits by tile.
        key: item key holding the image path.

    Returns:
        Copies of the items of ``part``, in input order.

    Raises:
        ValueError: bad ``part``/``val_fraction``, empty ``items``, a tile missing from the
            manifest, or a class that would have no training tile.
    """
    if part not in ("train", "val"):
        raise ValueError(f"part must be 'train' or 'val', got {part!r}")
    val_fraction, seed = float(val_fraction), int(seed)  # CLI overrides may arrive as strings
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not items:
        raise ValueError("split_tiles got no items")
    manifest_path = _resolve_manifest(items, manifest, key)
    keys = _group_keys(items, manifest_path, key)

    labels_by_group: dict[str, list[int]] = defaultdict(list)
    for group, item in zip(keys, items):
        labels_by_group[group].append(int(item["label"]))
    groups = sorted(labels_by_group)  # sorted: the split must not depend on the input order
    # Majority class per group; Counter.most_common keeps first-seen order on ties, so sort first.
    group_labels = [Counter(sorted(labels_by_group[g])).most_common(1)[0][0] for g in groups]
    _, val_groups = partition_dataset_classes(
        groups, group_labels, ratios=[1.0 - val_fraction, val_fraction], shuffle=True, seed=seed
    )
    # Everything not held out is training data, so MONAI's per-class rounding never drops a tile.
    held_out = set(val_groups)
    train_labels = {int(item["label"]) for g, item in zip(keys, items) if g not in held_out}
    starved = sorted({int(item["label"]) for item in items} - train_labels)
    if starved:
        raise ValueError(
            f"val_fraction={val_fraction} leaves class label(s) {starved} without training data"
        )
    logger.info(
        "split %d tiles into %d groups (%s): %d held out for validation",
        len(items), len(groups), f"manifest {manifest_path}" if manifest_path else "by tile",
        len(held_out),
    )
    wanted = part == "val"
    return [dict(item) for group, item in zip(keys, items) if (group in held_out) == wanted]


def datalist(
    dataset_dir: str,
    part: str = "train",
    val_dir: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    manifest: str | None = "auto",
    class_names: Sequence[str] | None = None,
) -> list[dict]:
    """Training or validation datalist in one call, for configs.

    With ``val_dir`` (e.g. CRC-VAL-HE-7K) ``dataset_dir`` is all training data and ``val_dir`` is
    labelled with the training classes; otherwise ``dataset_dir`` is split by
    :func:`split_tiles`.

    Args:
        dataset_dir: training folder, one sub-folder per class.
        part: ``"train"`` or ``"val"``.
        val_dir: separate validation folder; ``None`` or ``""`` to split ``dataset_dir``.
        val_fraction, seed, manifest: see :func:`split_tiles` (unused with ``val_dir``).
        class_names: classes to label with; ``None``: the sorted folders of ``dataset_dir``.

    Returns:
        ``[{"image": str, "label": int, "class_name": str}, ...]``.
    """
    if part not in ("train", "val"):
        raise ValueError(f"part must be 'train' or 'val', got {part!r}")
    if not val_dir:
        return split_tiles(
            discover_tiles(dataset_dir, class_names), part, val_fraction, seed, manifest
        )
    names = list(class_names) if class_names is not None else class_folders(dataset_dir)
    return discover_tiles(dataset_dir if part == "train" else val_dir, names)


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


# Modes PIL can convert losslessly (or as PIL's own convert("RGB") would) to L/LA/RGB/RGBA.
_MODE_CONVERSIONS = {"1": "L", "P": "RGBA", "PA": "RGBA", "La": "LA", "RGBa": "RGBA",
                     "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}


def _decode(image: Image.Image) -> Image.Image:
    """PILReader converter: decode now and bring the image to an 8-bit L/LA/RGB/RGBA mode.

    Decoding here (not lazily in ``np.asarray``) makes truncated files fail inside the reader,
    where :class:`LoadTiled` names the file.
    """
    name = getattr(image, "filename", "") or "<in-memory image>"
    try:
        image.load()
    except Exception as err:
        raise TileReadError(f"cannot decode image file {name}: {_EXPECTED_IMAGE}; "
                            f"{type(err).__name__}: {err}") from err
    if image.mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if image.mode not in _MODE_CONVERSIONS:
        # 16-bit or float images (I;16, I, F) have no unambiguous 8-bit RGB rendering.
        raise TileReadError(f"image file {name} has unsupported PIL mode {image.mode!r}: "
                            f"{_EXPECTED_IMAGE}")
    target = _MODE_CONVERSIONS[image.mode]
    if image.mode == "P" and "transparency" not in image.info:
        target = "RGB"  # an opaque palette image is plain RGB: no alpha warning later
    return image.convert(target)


def _source_name(image: Any) -> str:
    meta = getattr(image, "meta", None) or {}
    return str(meta.get("filename_or_obj", "<unknown file>"))


class LoadTiled(LoadImaged):
    """:class:`~monai.transforms.LoadImaged` with a PIL reader that keeps PIL's orientation.

    Output per key: ``(H, W)`` or ``(H, W, C)`` float32 ``MetaTensor``, rows and columns exactly as
    ``np.asarray(PIL.Image.open(path))`` (MONAI's ``PILReader`` swaps them by default, see
    ``reverse_indexing``). Palette/CMYK/1-bit images become L/LA/RGB/RGBA. Any failure raises
    :class:`TileReadError` naming the file (MONAI's own error for a truncated file does not name
    it); note that a :class:`~monai.transforms.Compose` re-raises it as the ``__cause__`` of a
    ``RuntimeError("applying transform ...")``, so it appears in the chained traceback.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        self.pil_reader = PILReader(converter=_decode, reverse_indexing=False)
        super().__init__(keys, reader=self.pil_reader, image_only=True, dtype=np.float32,
                         allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        try:
            # Passing the reader per call makes LoadImage use it alone: no silent fallback to
            # other readers (pydicom, ...) that would bury PIL's error.
            return super().__call__(data, reader or self.pil_reader)
        except TileReadError:
            raise
        except Exception as err:
            paths = [str(data[k]) for k in self.key_iterator(dict(data))]
            raise TileReadError(f"cannot read image file {' or '.join(paths)}: {_EXPECTED_IMAGE}; "
                                f"{type(err).__name__}: {err}") from err


class EnsureRGBd(MapTransform):
    """Turn a channel-first grayscale, grayscale+alpha or RGBA tile into RGB, warning once per file.

    Input ``(1|2|3|4, H, W)``, output ``(3, H, W)``. Grayscale is replicated to 3 channels and the
    alpha channel is dropped, exactly as PIL's ``convert("RGB")`` does.
    """

    _KINDS = {1: "grayscale", 2: "grayscale+alpha", 4: "RGBA"}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            channels = image.shape[0]
            if channels == 3:
                continue
            if channels not in self._KINDS:
                raise TileReadError(f"image file {_source_name(image)} has {channels} channels: "
                                    f"{_EXPECTED_IMAGE}")
            warnings.warn(f"{_source_name(image)}: {self._KINDS[channels]} image converted to RGB",
                          stacklevel=2)
            d[key] = image[:3] if channels == 4 else image[:1].repeat(3, 1, 1)
        return d


class CenterSquareCropd(MapTransform):
    """Centre-crop a channel-first tile to a square whose side is its short side.

    Input ``(C, H, W)``, output ``(C, s, s)`` with ``s = min(H, W)``, cut by MONAI's
    :class:`~monai.transforms.CenterSpatialCrop` (its centre convention: the crop starts at
    ``size // 2 - s // 2`` along each axis); square tiles pass through unchanged.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            height, width = d[key].shape[-2:]
            if height != width:
                side = min(height, width)
                d[key] = CenterSpatialCrop(roi_size=(side, side))(d[key])
        return d


class _WarnIfResized(MapTransform):
    """Warn, once per instance (i.e. once per run), when a tile is not ``size x size``."""

    def __init__(self, keys: KeysCollection, size: int, fit: str = "crop",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.size = size
        self.fit = fit
        self.warned = False

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            height, width = d[key].shape[-2:]
            if not self.warned and (height, width) != (self.size, self.size):
                self.warned = True
                side = min(height, width)
                how = (f"centre-cropping it to {side}x{side}, then resizing it"
                       if self.fit == "crop" and height != width else "resizing it")
                warnings.warn(
                    f"{_source_name(d[key])}: tile is {width}x{height} (width x height), not "
                    f"{self.size}x{self.size}; {how} and, silently, every other such tile",
                    stacklevel=2,
                )
        return d


def tile_pixels(img_size: int = 224, keys: Sequence[str] = ("image",),
                fit: str = "crop") -> Compose:
    """MONAI pipeline from a datalist item to the tile's pixels at ``img_size``, not normalised.

    The deterministic first half of :func:`tile_transforms` (load, channel first, RGB, fit,
    resize), for pipelines that normalise for another model (distillation's teacher).

    Returns:
        ``Compose`` mapping ``{"image": path}`` to ``{"image": (3, img_size, img_size)}``
        float values in ``0..255``.

    Raises:
        ValueError: ``fit`` is not one of :data:`FITS`.
    """
    if fit not in FITS:
        raise ValueError(f"tile_pixels: fit must be one of {list(FITS)}, got {fit!r}")
    keys = list(keys)
    size = int(img_size)
    return Compose([
        LoadTiled(keys),
        EnsureChannelFirstd(keys),
        EnsureRGBd(keys),
        _WarnIfResized(keys, size, fit),
        *([CenterSquareCropd(keys)] if fit == "crop" else []),
        Resized(keys, spatial_size=(size, size), mode="bilinear", anti_aliasing=True),
    ])


class TileContextReader:
    """A tile image file as the centre of a ``2T x 2T`` context, the rest its mirror image.

    The tile is read as the bundle reads tiles (:func:`tile_pixels`: centre square, resized to
    ``T``) and padded by ``T / 2`` on every side with ``numpy.pad(mode="reflect")``, the border
    MONAI's ``RandAffined`` augmentation uses, so that a view turned by any angle about the
    centre, or shifted by a few pixels, reads no padding of zeros. Distillation's tile folders
    and the rotation report's tile sources are read through here.

    Args:
        tile_size: ``T``.

    Shapes:
        ``reader(path) -> (2T, 2T, 3)`` uint8, the tile at ``[T/2 : T/2 + T]`` on both axes.
    """

    def __init__(self, tile_size: int) -> None:
        self.tile_size = int(tile_size)
        self._pixels: Compose | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tile_size": self.tile_size, "_pixels": None}  # rebuilt in each process

    def __call__(self, path: str | os.PathLike) -> np.ndarray:
        """Raises :class:`TileReadError` (naming the file) when it cannot be read."""
        size = self.tile_size
        if self._pixels is None:
            self._pixels = tile_pixels(size)
        pixels = self._pixels({"image": str(path)})["image"]
        tile = np.clip(np.rint(np.asarray(pixels)), 0, 255).astype(np.uint8)
        half = size // 2
        return np.pad(tile.transpose(1, 2, 0), ((half, size - half), (half, size - half),
                                                (0, 0)), mode="reflect")


def tile_transforms(
    img_size: int = 224, augment: bool | str = False, keys: Sequence[str] = ("image",),
    fit: str = "crop", max_shift: float = 8.0,
) -> Compose:
    """MONAI pipeline from a datalist item to a normalised tile tensor.

    Steps: :class:`LoadTiled` (``LoadImaged`` + ``PILReader``, PIL orientation), channel first,
    :class:`EnsureRGBd`, with ``fit="crop"`` :class:`CenterSquareCropd` (a non-square tile, e.g.
    500 x 300, is centre-cropped to 300 x 300 so nothing is squashed), resize to ``img_size``
    (bilinear, anti-aliased; tiles already that size are untouched), scale 0..255 to 0..1,
    ImageNet mean/std (:data:`equivit_plugin.models.IMAGENET_MEAN`/``IMAGENET_STD``), float32.
    Then the random geometric augmentation (:data:`AUGMENTATIONS`):

    * ``"none"`` (or ``False``): none (the paper trains without geometric augmentation);
    * ``"d4"`` (or ``True``): ``RandRotate90d(prob=0.75)`` and ``RandFlipd(prob=0.5)``, the 8
      exact rotations/flips of the square, each with probability 1/8;
    * ``"any_angle"``: ``RandAffined`` with a uniform angle in [-180, 180) degrees and a
      translation of up to ``max_shift`` pixels along each axis (bilinear, reflected border),
      then a flip with probability 1/2: tissue at every angle and the patch grid at every
      offset, which is what rotation robustness off the 90-degree grid needs.

    Args:
        img_size: output height and width in pixels.
        augment: one of :data:`AUGMENTATIONS` (booleans: ``"none"`` / ``"d4"``).
        keys: item keys holding image paths.
        fit: ``"crop"`` (centre square crop, then resize) or ``"resize"`` (resize the whole
            tile, squashing a non-square one: the behaviour before the crop existed).
        max_shift: largest translation of ``"any_angle"``, pixels.

    Returns:
        ``Compose`` mapping ``{"image": path, ...}`` to ``{"image": (3, img_size, img_size)
        float32 MetaTensor, ...}``; other keys (``label``, ``class_name``) pass through.

    Raises:
        ValueError: ``fit`` is not one of :data:`FITS` or ``augment`` not one of
            :data:`AUGMENTATIONS`.
    """
    if fit not in FITS:
        raise ValueError(f"tile_transforms: fit must be one of {list(FITS)}, got {fit!r}")
    if isinstance(augment, bool):
        augment = "d4" if augment else "none"
    if augment not in AUGMENTATIONS:
        raise ValueError(f"tile_transforms: augment must be one of {list(AUGMENTATIONS)} (or a "
                         f"boolean), got {augment!r}")
    keys = list(keys)
    transforms = [
        *tile_pixels(img_size, keys, fit).transforms,
        ScaleIntensityRanged(keys, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0),
        NormalizeIntensityd(keys, subtrahend=IMAGENET_MEAN, divisor=IMAGENET_STD,
                            channel_wise=True),
        EnsureTyped(keys, dtype=torch.float32),
    ]
    # The random part comes last, after every deterministic step, so CacheDataset caches the
    # loaded tiles.
    if augment == "d4":
        # An exact pixel permutation; prob 0.75 with max_k=3 makes k=0..3 equally likely.
        transforms += [
            RandRotate90d(keys, prob=0.75, max_k=3, spatial_axes=(0, 1)),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
        ]
    elif augment == "any_angle":
        transforms += [
            RandAffined(keys, prob=1.0, rotate_range=(np.pi,),
                        translate_range=(float(max_shift), float(max_shift)),
                        mode="bilinear", padding_mode="reflection"),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
        ]
    return Compose(transforms)


def check_readable(items: Sequence[Mapping[str, Any]], key: str = "image") -> list[dict]:
    """Decode every image once and fail early, naming the first unreadable file.

    Unlike an error inside a ``Compose``/``DataLoader``, the :class:`TileReadError` raised here is
    not wrapped. Costs one full decode per tile.

    Args:
        items: datalist items with an image path under ``key``.
        key: item key holding the image path.

    Returns:
        ``items`` as a list (so configs can chain it).

    Raises:
        TileReadError: a file cannot be opened or decoded, or has an unsupported mode.
    """
    loader = LoadTiled([key])
    for item in items:
        loader({key: item[key]})
    return [dict(item) for item in items]
