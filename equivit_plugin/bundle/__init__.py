"""MONAI bundle support: what ``monai_bundle/configs/*.json`` call via ``_target_``.

- :mod:`~equivit_plugin.bundle.data`: tile discovery, group-aware splits, MONAI transforms;
- :mod:`~equivit_plugin.bundle.batches`: what evaluation and inference share: loaders that skip
  unreadable tiles (and say which), batch file names, progress, the batch -> logits function;
- :mod:`~equivit_plugin.bundle.training`: atomic best/last checkpoints, resume, metrics JSON,
  warm-up cosine schedule, distributed helpers;
- :mod:`~equivit_plugin.bundle.evaluation`: accuracy under rotation (JSON, polar plot);
- :mod:`~equivit_plugin.bundle.inference`: resumable prediction CSV, demo tiles from
  TIAToolbox's image.
"""

from .data import (
    FITS,
    IMAGE_SUFFIXES,
    CenterSquareCropd,
    EnsureRGBd,
    LoadTiled,
    TileReadError,
    check_readable,
    class_folders,
    class_names,
    datalist,
    discover_tiles,
    is_image_file,
    split_tiles,
    tile_transforms,
)

__all__ = [
    "FITS",
    "IMAGE_SUFFIXES",
    "CenterSquareCropd",
    "EnsureRGBd",
    "LoadTiled",
    "TileReadError",
    "check_readable",
    "class_folders",
    "class_names",
    "datalist",
    "discover_tiles",
    "is_image_file",
    "split_tiles",
    "tile_transforms",
]
