"""The feature encoder of a run: :func:`~equivit_plugin.models.load_model` (a foundation model
by name with its released weights, a registered name with seeded random weights, or a
self-describing checkpoint) wrapped in :class:`~equivit_plugin.models.PooledEncoder`
(``(B, 3, P, P)`` -> ``(B, D)``, the model's own embedding rule)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..models import (
    ModelInfo,
    ModelLoadError,
    PooledEncoder,
    is_checkpoint_path,
    is_encoder,
    load_model,
    unknown_source_reason,
)
from .config import DEFAULT_MODEL, ExtractionConfigError

__all__ = ["RandomWeightsWarning", "build_encoder", "warn_random_weights"]


class RandomWeightsWarning(UserWarning):
    """The encoder is a registered architecture with random weights (no checkpoint)."""


def _load(model: str | Path, weights: str | Path | None, patch_size: int | None,
          model_kwargs: Mapping[str, Any], seed: int) -> tuple[torch.nn.Module, ModelInfo]:
    reason = unknown_source_reason(model)
    if reason is not None:
        raise ExtractionConfigError(f"model={reason}", "model")
    if weights is not None and not is_encoder(str(model)):
        raise ExtractionConfigError(
            f"weights= is for the foundation models of `equivit encoders` (uni_v1, "
            f"kaiko-vits16...); model={str(model)!r} is not one", "weights")
    try:
        if is_encoder(str(model)):
            net, info = load_model(str(model), weights=weights, seed=seed, **model_kwargs)
        elif is_checkpoint_path(model):
            net, info = load_model(model, **model_kwargs)
        else:
            net, info = load_model(model, num_classes=0, img_size=patch_size or 224, seed=seed,
                                   **model_kwargs)
    except ModelLoadError as error:
        argument = "weights" if is_encoder(str(model)) and weights is not None else "model"
        raise ExtractionConfigError(f"model={str(model)!r}: {error}", argument) from error
    if patch_size is not None and info.img_size != patch_size:
        raise ExtractionConfigError(
            f"patch_size={patch_size} does not match the input size {info.img_size} of "
            f"model={str(model)!r} ({info.name}); use patch_size={info.img_size} (or leave it "
            f"out)", "patch_size")
    return net, info


def build_encoder(model: str | Path = DEFAULT_MODEL, *, weights: str | Path | None = None,
                  patch_size: int | None = None,
                  model_kwargs: Mapping[str, Any] | None = None, d4_average: bool = False,
                  seed: int = 0) -> tuple[PooledEncoder, ModelInfo]:
    """The encoder for ``model``: a foundation model by name with its released ``weights``
    (``equivit encoders``), a self-describing checkpoint
    (``equivit_plugin.models.save_checkpoint``) or a registered timm name with random weights
    drawn under ``torch.manual_seed(seed)`` in a forked RNG (so every ``torchrun`` rank and
    every resumed run embeds with the same weights; the caller's RNG is untouched).

    Shapes:
        the encoder maps ``(B, 3, P, P)`` tiles (``P = info.img_size``, ``patch_size`` when
        given), normalised with ``info.mean``/``info.std``, to ``(B, info.embed_dim)``
        features (averaged over the 8 rotations/flips with ``d4_average``).

    Raises:
        ExtractionConfigError: unknown name, unreadable checkpoint or weights, a model whose
            input size is not ``patch_size`` or that cannot embed its tiles; ``.argument`` is
            ``"model"``, ``"weights"`` or ``"patch_size"``.
    """
    net, info = _load(model, weights, None if patch_size is None else int(patch_size),
                      dict(model_kwargs or {}), seed)
    patch_size = info.img_size
    encoder = PooledEncoder(net.eval(), d4_average=d4_average).eval()
    try:
        with torch.inference_mode():
            probe = encoder(torch.zeros(1, 3, patch_size, patch_size))
    except (RuntimeError, ValueError, AssertionError) as error:
        raise ExtractionConfigError(
            f"patch_size={patch_size}: model={str(model)!r} cannot embed {patch_size}x"
            f"{patch_size} tiles ({type(error).__name__}: {error})", "patch_size") from error
    if probe.ndim != 2 or probe.shape[1] != info.embed_dim:
        raise ExtractionConfigError(
            f"model={str(model)!r}: expected (B, {info.embed_dim}) pooled features from "
            f"forward_head(pre_logits=True), got {tuple(probe.shape)}", "model")
    return encoder, info


def warn_random_weights(info: ModelInfo, seed: int) -> None:
    """Warn (:class:`RandomWeightsWarning`) when ``info`` describes random weights."""
    if info.random_weights:
        warnings.warn(f"model={info.name!r}: no checkpoint given, the weights are RANDOM "
                      f"(seed {seed}); the features are only useful for testing. Give a "
                      f"checkpoint path as the model, or a foundation model with its "
                      f"weights=, for meaningful features.",
                      RandomWeightsWarning, stacklevel=4)  # the caller of extract_features
