"""The feature encoder of a run: :func:`~equivit_plugin.models.load_model` (a foundation model
by name with its released weights, a registered name with seeded random weights, or a
self-describing checkpoint) wrapped in :class:`~equivit_plugin.models.PooledEncoder`
(``(B, 3, C, C)`` -> ``(B, D)``, the model's own embedding rule), and the side ``C`` of the
region it embeds around each ``P x P`` grid cell (:func:`automatic_context`: ``P`` itself, or
for a model that sees only its inscribed disc a region whose disc covers the whole cell).
"""

from __future__ import annotations

import math
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
from .config import DEFAULT_MODEL, ExtractionConfigError, resolve_context

__all__ = ["RandomWeightsWarning", "automatic_context", "build_encoder", "warn_random_weights"]


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


def automatic_context(net: torch.nn.Module, cell: int) -> int:
    """The side of the region a model embeds around a ``cell x cell`` grid cell by default.

    A model that sees only the disc inscribed in its input (an Equi-ViT with ``disc_radius``:
    tokens, attention, pooling and the stem's norm statistics stay inside a disc of radius
    ``disc_radius * side / 2``) would leave the cell's corners out of every feature (outside
    the disc lies a fifth of the cell; measured, 9.8 % of a 224 px cell's pixels never reach
    an ``equivit_disc`` feature, the stem's receptive fields seeing a little past the disc);
    it gets the smallest multiple of its patch size whose disc circumscribes the cell,
    ``>= ceil(cell * sqrt(2) / disc_radius)`` (320 for a 224 px cell), so every pixel of
    the cell can reach the feature. Every other model gets the cell itself.
    """
    radius = getattr(net, "disc_radius", None)
    if radius is None:
        return int(cell)
    patch = getattr(getattr(net, "patch_embed", None), "patch_size", 1)
    step = max(int(v) for v in (patch if isinstance(patch, (tuple, list)) else (patch,)))
    needed = math.ceil(cell * math.sqrt(2.0) / float(radius) - 1e-9)
    return max(int(cell), step * math.ceil(needed / step))


def build_encoder(model: str | Path = DEFAULT_MODEL, *, weights: str | Path | None = None,
                  patch_size: int | None = None, context: int | None = 0,
                  model_kwargs: Mapping[str, Any] | None = None, d4_average: bool = False,
                  seed: int = 0) -> tuple[PooledEncoder, ModelInfo]:
    """The encoder for ``model``: a foundation model by name with its released ``weights``
    (``equivit encoders``), a self-describing checkpoint
    (``equivit_plugin.models.save_checkpoint``) or a registered timm name with random weights
    drawn under ``torch.manual_seed(seed)`` in a forked RNG (so every ``torchrun`` rank and
    every resumed run embeds with the same weights; the caller's RNG is untouched).

    ``context`` is the side ``C`` of the region the encoder will embed around each cell
    (:func:`~.config.resolve_context`: ``None`` is :func:`automatic_context`, ``0`` the
    cell). When ``C`` is not the model's input size the model is built with timm's
    ``dynamic_img_size=True`` (the same weights: the state dict does not depend on it) and
    must embed ``C x C`` inputs. The caller gets ``C`` back as
    ``resolve_context(context, info.img_size, automatic_context(encoder.net, info.img_size))``
    (:meth:`~.config.ExtractionConfig.set_context` does that).

    Shapes:
        the encoder maps ``(B, 3, C, C)`` regions (``C = P = info.img_size`` by default,
        ``patch_size`` when given), normalised with ``info.mean``/``info.std``, to
        ``(B, info.embed_dim)`` features (averaged over the 8 rotations/flips with
        ``d4_average``).

    Raises:
        ExtractionConfigError: unknown name, unreadable checkpoint or weights, a model whose
            input size is not ``patch_size``, a context smaller than it, or a model that
            cannot embed its tiles or its contexts; ``.argument`` is ``"model"``,
            ``"weights"``, ``"patch_size"`` or ``"context"``.
    """
    kwargs = dict(model_kwargs or {})
    size = None if patch_size is None else int(patch_size)
    net, info = _load(model, weights, size, kwargs, seed)
    side = resolve_context(context, info.img_size, automatic_context(net, info.img_size))
    if side != info.img_size and not getattr(net, "dynamic_img_size", False):
        if is_encoder(str(model)):
            raise ExtractionConfigError(
                f"context={side}: model={str(model)!r} is built as its card builds it and "
                f"embeds {info.img_size} px tiles only; give context=0 (the cell)", "context")
        # Rebuilt rather than switched on in place: timm wires dynamic_img_size into the
        # patch embedding at construction. Same seed, same weights.
        try:
            net, info = _load(model, weights, size, {**kwargs, "dynamic_img_size": True},
                              seed)
        except ExtractionConfigError as error:
            raise ExtractionConfigError(
                f"context={side}: {error} (a context other than the cell needs a model "
                f"built with dynamic_img_size=True)", "context") from error
    encoder = PooledEncoder(net.eval(), d4_average=d4_average).eval()
    argument = "patch_size" if side == info.img_size else "context"
    try:
        with torch.inference_mode():
            probe = encoder(torch.zeros(1, 3, side, side))
    except (RuntimeError, ValueError, AssertionError, TypeError) as error:
        what = (f"{side}x{side} tiles" if side == info.img_size
                else f"{side}x{side} contexts around its {info.img_size} px cells")
        first = (str(error).strip().splitlines() or [""])[0]  # the message stays one line
        raise ExtractionConfigError(
            f"{argument}={side}: model={str(model)!r} cannot embed {what} "
            f"({type(error).__name__}: {first})", argument) from error
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
