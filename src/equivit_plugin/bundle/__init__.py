"""MONAI bundle support: the data layer that ``monai_bundle/configs/*.json`` call via ``_target_``.

See :mod:`equivit_plugin.bundle.data` for tile discovery, splits and transforms.
"""

from .data import (
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EnsureRGBd,
    LoadTiled,
    TileReadError,
    check_readable,
    class_names,
    datalist,
    discover_tiles,
    split_tiles,
    tile_transforms,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "EnsureRGBd",
    "LoadTiled",
    "TileReadError",
    "check_readable",
    "class_names",
    "datalist",
    "discover_tiles",
    "split_tiles",
    "tile_transforms",
]
