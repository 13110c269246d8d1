"""MIL feature extraction: whole-slide images in, CLAM/TRIDENT-compatible HDF5 features out.

::

    from equivit_plugin.features import extract_features, read_features
    summary = extract_features(["slides/"], "features", model="model.pt", mpp=0.5)
    features, coords, attrs = read_features("features/h5_files/slide_1.h5")

The same from the shell: ``equivit extract-features slides/ --out features --model model.pt``.
See ``docs/features.md`` for the file layout, resuming and ``torchrun``.

Modules: :mod:`.slides` (which slides; opening one), :mod:`.tiles` (tissue tiles and the tile
``Dataset``), :mod:`.h5` (atomic streaming writer, :func:`read_features`), :mod:`.extract`
(encoder, per-slide loop, ranks, summary).
"""

from .extract import (
    DEFAULT_MODEL,
    H5_DIR,
    PT_DIR,
    EncoderInfo,
    ExtractionConfigError,
    ExtractionSummary,
    FeatureEncoder,
    NoTissueWarning,
    RandomWeightsWarning,
    SlideRecord,
    build_encoder,
    extract_features,
)
from .h5 import FeatureWriter, read_attrs, read_features
from .slides import OpenedSlide, SlideError, open_slide, resolve_slides
from .tiles import TISSUE_MASKS, TileDataset, TileGrid, read_tile, tile_grid

__all__ = [
    "DEFAULT_MODEL",
    "H5_DIR",
    "PT_DIR",
    "TISSUE_MASKS",
    "EncoderInfo",
    "ExtractionConfigError",
    "ExtractionSummary",
    "FeatureEncoder",
    "FeatureWriter",
    "NoTissueWarning",
    "OpenedSlide",
    "RandomWeightsWarning",
    "SlideError",
    "SlideRecord",
    "TileDataset",
    "TileGrid",
    "build_encoder",
    "extract_features",
    "open_slide",
    "read_attrs",
    "read_features",
    "read_tile",
    "resolve_slides",
    "tile_grid",
]
