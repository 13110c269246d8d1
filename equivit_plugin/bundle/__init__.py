"""MONAI bundle support: what ``monai_bundle/configs/*.json`` call via ``_target_``.

- :mod:`~equivit_plugin.bundle.data`: tile discovery, group-aware splits, MONAI transforms;
- :mod:`~equivit_plugin.bundle.training`: atomic best/last checkpoints, resume, metrics JSON,
  warm-up cosine schedule, distributed helpers;
- :mod:`~equivit_plugin.bundle.evaluation`: accuracy under rotation (JSON, polar plot);
- :mod:`~equivit_plugin.bundle.inference`: prediction CSV, demo tiles from TIAToolbox's image.
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
