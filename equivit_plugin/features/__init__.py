"""MIL feature extraction: whole-slide images in, CLAM/TRIDENT-compatible HDF5 features out.

::

    from equivit_plugin.features import extract_features, read_features
    summary = extract_features(["slides/"], "features", model="model.pt", mpp=0.5)
    features, coords, attrs = read_features("features/h5_files/slide_1.h5")

The same from the shell: ``equivit extract-features slides/ --out features --model model.pt``;
``equivit extract-features --demo --out demo`` runs it on a packaged H&E slide. See
``docs/features.md`` for the file layout, resuming and ``torchrun``.

Modules (the names below load on first use: importing :mod:`.config` costs no torch):

- :mod:`.config`: constants and :class:`ExtractionConfig`, the checked settings of a run;
- :mod:`.slides`: which slides (files, folders, globs, lists); opening one;
- :mod:`.tiles`: tissue tiles (TIAToolbox mask + grid) and the tile ``Dataset``;
- :mod:`.reader`: regions cut from each stored tile decoded once; the device resize;
- :mod:`.loader`: the run's one ``DataLoader`` over every slide's regions;
- :mod:`.encoder`: the encoder (``load_model`` + ``PooledEncoder``);
- :mod:`.slide_job`: the slides to their files (skip, plan ahead, embed, stream, commit);
- :mod:`.distributed`: ``torchrun`` ranks, device, process group;
- :mod:`.summary`: per-slide records and the run summary;
- :mod:`.h5`: atomic streaming writer, :func:`read_features`;
- :mod:`.extract`: :func:`extract_features`, tying them together;
- :mod:`.demo`, :mod:`.overlay`: the demo slide and run, features drawn on a thumbnail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_attributes

_LAZY_NAMES = {
    "DEFAULT_MODEL": "config", "H5_DIR": "config", "OUT_DTYPES": "config", "PT_DIR": "config",
    "TISSUE_MASKS": "config", "ExtractionConfig": "config",
    "ExtractionConfigError": "config",
    "RandomWeightsWarning": "encoder", "build_encoder": "encoder",
    "NoTissueWarning": "slide_job",
    "ExtractionSummary": "summary", "SlideRecord": "summary",
    "extract_features": "extract",
    "FeatureWriter": "h5", "read_attrs": "h5", "read_features": "h5",
    "OpenedSlide": "slides", "SlideError": "slides", "open_slide": "slides",
    "resolve_slides": "slides",
    "TileDataset": "tiles", "TileGrid": "tiles", "read_tile": "tiles", "tile_grid": "tiles",
    "DemoResult": "demo", "demo_slide": "demo", "run_demo": "demo",
    "save_feature_overlay": "overlay",
}

__all__ = [
    "DEFAULT_MODEL",
    "DemoResult",
    "ExtractionConfig",
    "ExtractionConfigError",
    "ExtractionSummary",
    "FeatureWriter",
    "H5_DIR",
    "NoTissueWarning",
    "OUT_DTYPES",
    "OpenedSlide",
    "PT_DIR",
    "RandomWeightsWarning",
    "SlideError",
    "SlideRecord",
    "TISSUE_MASKS",
    "TileDataset",
    "TileGrid",
    "build_encoder",
    "demo_slide",
    "extract_features",
    "open_slide",
    "read_attrs",
    "read_features",
    "read_tile",
    "resolve_slides",
    "run_demo",
    "save_feature_overlay",
    "tile_grid",
]

if TYPE_CHECKING:
    from .config import (
        DEFAULT_MODEL,
        H5_DIR,
        OUT_DTYPES,
        PT_DIR,
        TISSUE_MASKS,
        ExtractionConfig,
        ExtractionConfigError,
    )
    from .demo import DemoResult, demo_slide, run_demo
    from .encoder import RandomWeightsWarning, build_encoder
    from .extract import extract_features
    from .h5 import FeatureWriter, read_attrs, read_features
    from .overlay import save_feature_overlay
    from .slide_job import NoTissueWarning
    from .slides import OpenedSlide, SlideError, open_slide, resolve_slides
    from .summary import ExtractionSummary, SlideRecord
    from .tiles import TileDataset, TileGrid, read_tile, tile_grid


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_NAMES, globals())
