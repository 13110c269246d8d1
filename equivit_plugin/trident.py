"""TRIDENT door: any model source of this package as TRIDENT's ``CustomInferenceEncoder``.

TRIDENT (mahmoodlab/TRIDENT) takes a foreign patch encoder as
``CustomInferenceEncoder(enc_name, model, transforms, precision)``
(``trident/patch_encoder_models/load.py``). :func:`trident_encoder_parts` returns exactly those
four keyword arguments for a checkpoint (a distilled student...), a registered name or a
foundation model with its weights, so the whole recipe is::

    from trident.patch_encoder_models import CustomInferenceEncoder
    encoder = CustomInferenceEncoder(**trident_encoder_parts("student.pt"))

What TRIDENT does with them (``WSI.extract_patch_features``, ``trident/wsi_objects/WSI.py``):
``WSIPatcherDataset`` applies ``transforms`` to each PIL tile, a ``DataLoader`` (fork or spawn
workers) stacks them, and each ``(B, 3, S, S)`` batch goes through ``model`` under
``torch.autocast(device_type, dtype=precision, enabled=precision != torch.float32)``; the
output is taken with ``.cpu().numpy()`` and written to ``features_<enc_name>/<slide>.h5``.
So ``model`` returns float32 ``(B, D)`` whatever the autocast (numpy has no bfloat16),
``transforms`` is picklable, ``precision`` is a ``torch.dtype`` and ``enc_name`` is a folder
name. TRIDENT is imported only by :func:`trident_encoder`; the parts need torch alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import ModelInfo, PooledEncoder, TileTransform, load_encoder, tile_transform
from .utils.precision import PRECISIONS, autocast_dtype

__all__ = ["TRIDENT_PRECISIONS", "TridentPatchModel", "default_enc_name", "features_dir",
           "trident_encoder", "trident_encoder_parts", "trident_precision"]

TRIDENT_PRECISIONS: dict[str, torch.dtype] = {
    name: autocast_dtype(name) or torch.float32 for name in PRECISIONS}
"""This package's precision names -> the ``torch.dtype`` TRIDENT's ``precision`` is (TRIDENT
autocasts to it unless it is ``torch.float32``)."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def trident_precision(precision: Any = "fp32") -> torch.dtype:
    """The ``torch.dtype`` TRIDENT's ``precision`` argument takes.

    Args:
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"``, an alias (``"bfloat16"``...), a
            ``torch.dtype`` or ``None`` (fp32).

    Raises:
        ValueError: anything else (the message lists the choices).
    """
    # TRIDENT's "no autocast" is torch.float32 where this package's is None.
    return autocast_dtype(precision) or torch.float32


class TridentPatchModel(nn.Module):
    """The ``model`` of the TRIDENT recipe: ``(B, 3, S, S)`` normalised tiles -> float32
    ``(B, D)`` pooled features.

    :func:`~equivit_plugin.models.load_encoder`'s encoder (float32 output under any autocast:
    TRIDENT's ``.cpu().numpy()`` cannot convert bfloat16 and would store float16) with the
    width TRIDENT reads and a check of the batch's shape.

    Args:
        encoder: from :func:`~equivit_plugin.models.load_encoder`.
        info: its :class:`~equivit_plugin.models.ModelInfo` (input side ``S``, width ``D``).

    Attributes:
        embedding_dim: ``D`` (the attribute TRIDENT reads for a slide without patches).
        img_size: ``S``.
        info: the model's ``ModelInfo``.
    """

    def __init__(self, encoder: PooledEncoder, info: ModelInfo) -> None:
        super().__init__()
        self.encoder = encoder
        self.info = info
        self.embedding_dim = int(info.embed_dim)
        self.img_size = int(info.img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.img_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise ValueError(f"expected (B, 3, {size}, {size}) tiles (the transforms of "
                             f"trident_encoder_parts make them), got {tuple(x.shape)}")
        return self.encoder(x)


def default_enc_name(info: ModelInfo, *, d4_average: bool = False,
                     seed: int | None = None) -> str:
    """TRIDENT's ``enc_name`` for a model: one name per set of weights, safe as a folder name.

    TRIDENT writes to ``features_<enc_name>/`` and skips slides whose file is already there, so
    two encoders sharing a name would silently mix their features: trained weights are named
    by the first 8 hex digits of their SHA-256 (``equivit_ri_tiny_patch16_224-08c7fccb``),
    random ones ``<name>-random[-seed<seed>]``, a Hub model by its name alone; ``-d4`` marks
    D4 averaging. Characters other than letters, digits and ``._+-`` become ``_``.
    """
    name = _UNSAFE.sub("_", info.name).strip("._") or "model"
    if info.random_weights:
        name += "-random" if seed is None else f"-random-seed{seed}"
    elif info.checkpoint_sha256:
        name += f"-{info.checkpoint_sha256[:8]}"
    return f"{name}-d4" if d4_average else name


def _checked_enc_name(enc_name: str) -> str:
    if not isinstance(enc_name, str) or not enc_name.strip() or enc_name in (".", "..") \
            or "/" in enc_name or "\\" in enc_name:
        raise ValueError(f"enc_name= must be a non-empty name without path separators (TRIDENT "
                         f"writes to features_<enc_name>/), got {enc_name!r}")
    return enc_name


def trident_encoder_parts(source: str | os.PathLike, *,
                          weights: str | os.PathLike | None = None, d4_average: bool = False,
                          seed: int | None = None, precision: Any = "fp32",
                          enc_name: str | None = None) -> dict[str, Any]:
    """The keyword arguments of TRIDENT's ``CustomInferenceEncoder`` for a model source.

    Args:
        source: what :func:`~equivit_plugin.models.load_encoder` takes: a checkpoint written by
            :func:`~equivit_plugin.models.save_checkpoint` (``"student.pt"``), a registered
            name (random weights; ``seed`` draws them reproducibly) or a foundation model's
            name with ``weights``.
        weights: a foundation model's released weights (file or folder).
        d4_average: average each tile's features over its 8 rotations/flips (exactly
            invariant to them with any model, at 8x the cost).
        seed: seed of a registered name's random weights.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (or a ``torch.dtype``):
            TRIDENT autocasts the forward pass to it.
        enc_name: TRIDENT's name of the encoder (the ``features_<enc_name>/`` folder); default
            :func:`default_enc_name`.

    Returns:
        ``{"enc_name": str, "model": TridentPatchModel, "transforms": TileTransform,
        "precision": torch.dtype}``: ``transforms`` maps a PIL tile (any size; resized to the
        model's side ``S``) to float32 ``(3, S, S)`` normalised with the model's mean/std;
        ``model`` maps their ``(B, 3, S, S)`` stack to float32 ``(B, D)`` (eval mode, CPU).

    Raises:
        ValueError: an unknown ``precision`` or a bad ``enc_name`` (checked before the model
            is built).
        ModelLoadError: ``source`` cannot be loaded (as :func:`load_encoder`).
    """
    dtype = trident_precision(precision)
    if enc_name is not None:
        _checked_enc_name(enc_name)
    encoder, info = load_encoder(source, weights=weights, d4_average=d4_average, seed=seed)
    transforms: TileTransform = tile_transform(info)
    return {"enc_name": enc_name or default_enc_name(info, d4_average=d4_average, seed=seed),
            "model": TridentPatchModel(encoder, info).eval(), "transforms": transforms,
            "precision": dtype}


def trident_encoder(source: str | os.PathLike, *, weights: str | os.PathLike | None = None,
                    d4_average: bool = False, seed: int | None = None, precision: Any = "fp32",
                    enc_name: str | None = None) -> nn.Module:
    """TRIDENT's ``CustomInferenceEncoder`` built from :func:`trident_encoder_parts` (same
    arguments), for ``Processor.run_patch_feature_extraction_job(patch_encoder=...)``.

    It also carries ``embedding_dim = D``: for a slide without patches TRIDENT then writes
    ``(0, D)`` features rather than ``(0,)``.

    Raises:
        ImportError: TRIDENT (``trident.patch_encoder_models``) is not installed.
        ValueError, ModelLoadError: as :func:`trident_encoder_parts`.
    """
    try:
        from trident.patch_encoder_models import CustomInferenceEncoder
    except ImportError as error:
        raise ImportError(
            f"trident_encoder needs mahmoodlab's TRIDENT (`from trident.patch_encoder_models "
            f"import CustomInferenceEncoder` failed: {error}); install it from "
            f"https://github.com/mahmoodlab/TRIDENT (PyPI's `trident` is another project) or "
            f"pass trident_encoder_parts(...) to CustomInferenceEncoder yourself") from None
    parts = trident_encoder_parts(source, weights=weights, d4_average=d4_average, seed=seed,
                                  precision=precision, enc_name=enc_name)
    encoder = CustomInferenceEncoder(**parts)
    encoder.embedding_dim = parts["model"].embedding_dim
    return encoder


def features_dir(job_dir: str | os.PathLike, coords_dir: str, enc_name: str) -> Path:
    """Where TRIDENT's ``run_patch_feature_extraction_job`` writes an encoder's files:
    ``<job_dir>/<coords_dir>/features_<enc_name>/`` (``<slide>.h5`` each)."""
    return Path(job_dir) / coords_dir / f"features_{_checked_enc_name(enc_name)}"

