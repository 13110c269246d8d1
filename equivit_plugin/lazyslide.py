"""LazySlide door: an Equi-ViT, a distilled student or any other
:func:`~equivit_plugin.models.load_encoder` source as the ``model=`` and ``transform=`` of
LazySlide's feature extraction (lazyslide 0.12, wsidata 0.11)::

    import lazyslide as zs
    from equivit_plugin.lazyslide import lazyslide_model

    encoder = lazyslide_model("student.pt")
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, 224, mpp=0.5)
    zs.tl.feature_extraction(wsi, **encoder.arguments)
    wsi.tables[encoder.feature_key()].X            # (n_tiles, D) float32

LazySlide does the rest (device, ``amp``, batches, workers, storage). What its
``feature_extraction`` does with a plain callable model (lazyslide 0.12.0,
``lazyslide/tools/_features.py``), and so what this door provides:

* each tile is read as an ``(h, w, 3)`` uint8 RGB array at the tile spec's size and then
  passed to ``transform`` (``wsidata/dataset/image.py`` ``TileImagesDataset.__getitem__``);
  LazySlide takes a default transform only from its own model classes (``_features.py``
  238-240), so a plain module without ``transform=`` would get raw uint8 ``(B, h, w, 3)``:
  the door's transform is :class:`~equivit_plugin.models.TileTransform` (resize to the
  model's side, the model's mean/std);
* the batch (``(B, 3, S, S)`` float32) is moved to ``device``, the model moved once with
  ``model.to(device)`` (errors swallowed), and called as ``model(image)`` under
  ``torch.inference_mode()`` and, with ``amp=True``, ``torch.autocast(device,
  autocast_dtype)`` (``_features.py`` 233-236, 276-297). LazySlide never calls ``.eval()``:
  the door's model is in eval mode;
* the output is stored as ``output.cpu().numpy()`` (``_features.py`` 41-42, 302-310): numpy
  has no bfloat16 (``amp`` with ``autocast_dtype=torch.bfloat16`` raised ``TypeError``) and
  float16 would be stored as float16, so the door's model returns float32
  (:func:`~equivit_plugin.models.load_encoder`'s encoder does);
* the features table is ``wsi.tables[f"{model_name}_{tile_key}"]`` (``_features.py``
  221-232); without ``model_name=`` a plain module's key is its class name, so the door gives
  one. Table names must be valid SpatialData names, which SpatialData checks only when the
  features are stored, after the whole extraction: the door checks the name at once.

``dense=True`` (ViT patch tokens) needs LazySlide's own ViT model protocol and is not
offered.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

from .models import (
    ModelInfo,
    ModelLoadError,
    PooledEncoder,
    TileTransform,
    is_checkpoint_path,
    load_encoder,
    tile_transform,
    unknown_source_reason,
)

__all__ = ["LazySlideEncoder", "lazyslide_model"]

DEFAULT_TILE_KEY = "tiles"
"""LazySlide's default ``tile_key`` (``lazyslide._const.Key.tiles``)."""


@dataclass(frozen=True, eq=False)
class LazySlideEncoder:
    """What ``lazyslide.tl.feature_extraction`` needs to run a model of this package.

    Attributes:
        model: ``(B, 3, S, S)`` normalised float32 tiles -> ``(B, D)`` float32 features, in eval
            mode (``D = info.embed_dim``, ``S = info.img_size``).
        transform: a tile as LazySlide reads it, ``(h, w, 3)`` uint8 RGB -> ``(3, S, S)``
            float32, resized to ``S`` and normalised with the model's mean/std. Picklable,
            so ``num_workers > 0`` works.
        model_name: the ``model_name=`` LazySlide names the features table after.
        info: what :func:`~equivit_plugin.models.load_model` said about the model.
    """

    model: PooledEncoder
    transform: TileTransform
    model_name: str
    info: ModelInfo

    @property
    def arguments(self) -> dict[str, Any]:
        """``model=``, ``transform=`` and ``model_name=`` of ``feature_extraction``:
        ``zs.tl.feature_extraction(wsi, **encoder.arguments, batch_size=64)``."""
        return {"model": self.model, "transform": self.transform,
                "model_name": self.model_name}

    def feature_key(self, tile_key: str = DEFAULT_TILE_KEY) -> str:
        """The key of ``wsi.tables`` LazySlide stores the features under, for tiles
        ``tile_key`` (when ``feature_extraction`` is given no ``key_added=``)."""
        return f"{self.model_name}_{tile_key}"


def _is_valid_name(name: str) -> bool:
    # SpatialData's rule for element names (spatialdata._core.validation.check_valid_name).
    return bool(name) and name not in (".", "..") and not name.startswith("__") \
        and all(c.isalnum() or c in "_-." for c in name)


def _default_name(source: str | os.PathLike, info: ModelInfo, d4_average: bool) -> str:
    # A checkpoint is named after its file (a distilled student and its architecture differ),
    # a registered or foundation model after itself; D4 averaging changes the features.
    base = Path(source).stem if is_checkpoint_path(source) else info.name
    base = re.sub(r"[^0-9A-Za-z_.-]+", "_", base).lstrip("_.") or "equivit"
    return f"{base}_d4" if d4_average else base


def lazyslide_model(source: str | os.PathLike, *, weights: str | os.PathLike | None = None,
                    d4_average: bool = False, seed: int | None = None,
                    model_name: str | None = None) -> LazySlideEncoder:
    """Load any model source as LazySlide's ``model=`` and ``transform=``.

    Args:
        source: a registered name (``equivit_disc_tiny_patch16_224``: random weights), a
            checkpoint written by :func:`~equivit_plugin.models.save_checkpoint` (a distilled
            student...) or a foundation model's name (``uni_v1``... with ``weights``).
        weights: a foundation model's released weights (only with a foundation model's name).
        d4_average: average each tile's features over its 8 rotations/flips (exactly
            invariant to them with any model, at 8x the cost).
        seed: for a registered name, the seed of its random weights.
        model_name: the name of the features table (``f"{model_name}_{tile_key}"``); default:
            the checkpoint's file stem, else the model's name, with ``_d4`` when averaged.

    Returns:
        :class:`LazySlideEncoder`: ``.model`` maps ``(B, 3, S, S)`` normalised float32 tiles to
        ``(B, D)`` float32 features, ``.transform`` maps an ``(h, w, 3)`` uint8 tile to
        ``(3, S, S)``, ``.arguments`` is both (and ``model_name``) for ``feature_extraction``.

    Raises:
        TypeError: ``source``, ``d4_average`` or ``seed`` of the wrong type.
        ValueError: ``model_name`` is not a valid table name.
        ModelLoadError: the source cannot be loaded (the message names the argument).
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source= must be a model name or a checkpoint path (str or "
                        f"os.PathLike), got {type(source).__name__}")
    if not isinstance(d4_average, bool):
        raise TypeError(f"d4_average= must be True or False, got {d4_average!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, Integral)):
        raise TypeError(f"seed= must be an integer or None, got {seed!r}")
    if model_name is not None and not (isinstance(model_name, str)
                                       and _is_valid_name(model_name)):
        raise ValueError(f"model_name= must be letters, digits, '_', '-' or '.' (a SpatialData "
                         f"table name, not starting with '__'), got {model_name!r}")
    # Before anything is built, so that a typo reads as a bad argument.
    reason = unknown_source_reason(source)
    if reason is not None:
        raise ModelLoadError(f"source= {reason}")
    if is_checkpoint_path(source) and not Path(source).is_file():
        raise ModelLoadError(f"source= checkpoint not found: {os.fspath(source)}")
    encoder, info = load_encoder(source, weights=weights, d4_average=d4_average,
                                 seed=None if seed is None else int(seed))
    name = model_name if model_name is not None else _default_name(source, info, d4_average)
    return LazySlideEncoder(model=encoder, transform=tile_transform(info),
                            model_name=name, info=info)
