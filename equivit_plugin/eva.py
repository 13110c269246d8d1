"""The kaiko eva door: an Equi-ViT (or any :func:`~equivit_plugin.models.load_model` source) as
an eva backbone, built by eva's ``ModelFromFunction`` wrapper from a YAML config::

    backbone:
      class_path: eva.core.models.wrappers.ModelFromFunction
      init_args:
        path: equivit_plugin.eva.backbone
        arguments:
          model_name: equivit_disc_small_patch16_224
          checkpoint: models/equivit_disc_small.pt      # optional: trained weights

(eva's docs spell it ``eva.models.wrappers.ModelFromFunction``, a path jsonargparse 4.53 cannot
import.) ``ModelFromFunction`` (kaiko-eva 0.4.5, ``eva/core/models/wrappers/from_function.py``)
calls ``jsonargparse.class_from_function(path, func_return=nn.Module)(**arguments)``; its own
``checkpoint_path`` then loads a state dict *of the returned module* strictly (this package's
self-describing checkpoints go to ``arguments.checkpoint`` instead). The returned module keeps
the contract of eva's timm backbones (``eva/vision/models/wrappers/from_timm.py``:
``timm.create_model(..., features_only=out_indices is not None, out_indices=out_indices)``):

* ``out_indices=None``: ``(B, 3, S, S) -> (B, D)`` pooled embeddings, what
  ``eva.callbacks.ClassificationEmbeddingsWriter`` stores and ``eva.HeadModule``'s head reads;
* ``out_indices``: ``(B, 3, S, S) ->`` a list of ``(B, D, S/16, S/16)`` maps, timm's
  ``forward_intermediates(x, indices=out_indices, norm=False, output_fmt="NCHW",
  intermediates_only=True)`` on the model pruned after the last block asked for - what timm's
  ``FeatureGetterNet`` returns for eva and what eva's segmentation decoders
  (``eva/vision/models/networks/decoders/segmentation``) and ``SegmentationEmbeddingsWriter``
  read.

Inputs are normalised by eva's transforms: set ``NORMALIZE_MEAN``/``NORMALIZE_STD`` (the mean/std
of ``ResizeAndCrop``) to the model's ``ModelInfo.mean``/``.std`` - ImageNet's
``[0.485, 0.456, 0.406]``/``[0.229, 0.224, 0.225]`` (eva's defaults) for every ``equivit_*`` name
and this package's checkpoints, the card's for a foundation model (0.5/0.5 for Kaiko's).

eva is not imported here: eva imports this module (through ``path:``), not the reverse.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .layers import disc_token_mask
from .models import ModelLoadError, is_checkpoint_path, load_encoder, unknown_source_reason

__all__ = ["DEFAULT_MODEL", "IntermediateFeatures", "backbone"]

DEFAULT_MODEL = "equivit_disc_small_patch16_224"
"""The backbone without a ``model_name`` or ``checkpoint``: the distillation student's
architecture (:data:`~equivit_plugin.models.DEFAULT_STUDENT_VARIANT`, also the default
invariant variant trained from scratch), ``D = 384`` as eva's ``IN_FEATURES`` default."""


class IntermediateFeatures(nn.Module):
    """Block outputs of a timm ViT as ``(B, D, h, w)`` maps: what timm's ``FeatureGetterNet``
    (``timm.create_model(..., features_only=True, out_indices=...)``, eva's ``TimmModel``)
    returns, for a model built by :func:`~equivit_plugin.models.load_model`.

    The blocks after the last one asked for, the final norm and the head are pruned
    (``prune_intermediate_layers``, as ``FeatureGetterNet`` does): they would be computed for
    nothing. The maps are the blocks' raw outputs, before the final norm, prefix tokens dropped.

    Args:
        net: a timm ``VisionTransformer`` (``forward_intermediates``,
            ``prune_intermediate_layers``); pruned in place.
        out_indices: ``n``: the last ``n`` blocks; a sequence: those blocks (negative from the
            end).

    Shapes:
        ``(B, 3, H, W) -> [(B, D, H / p, W / p)] * len(indices)`` (``p``: the patch size).
    """

    def __init__(self, net: nn.Module, out_indices: int | Sequence[int]) -> None:
        super().__init__()
        indices = out_indices if isinstance(out_indices, int) else list(out_indices)
        self.out_indices: list[int] = net.prune_intermediate_layers(indices, prune_norm=True)
        self.model = net  # "model.*" state-dict keys, as FeatureGetterNet's

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, norm=False,
                                                output_fmt="NCHW", intermediates_only=True)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_out_indices(out_indices: object, depth: int | None) -> int | list[int]:
    """``out_indices`` as timm takes it: its type (``depth=None``, before anything is built),
    then its range against the model's ``depth`` blocks (timm's own check is a bare assert)."""
    if not _is_int(out_indices) and not (
            isinstance(out_indices, Sequence) and not isinstance(out_indices, str | bytes)
            and out_indices and all(_is_int(i) for i in out_indices)):
        raise ValueError(f"out_indices= must be an int (the last n blocks) or a non-empty list "
                         f"of block indices, got {out_indices!r} (in eva's YAML write a list or "
                         f"an int, or wrap ${{oc.env:...}} in ${{oc.decode:...}})")
    if _is_int(out_indices):
        if depth is not None and not 1 <= out_indices <= depth:
            raise ValueError(f"out_indices={out_indices} asks for the last {out_indices} "
                             f"blocks of a {depth}-block model (1 to {depth})")
        return out_indices
    for index in out_indices:
        if depth is not None and not -depth <= index < depth:
            raise ValueError(f"out_indices={list(out_indices)}: {index} is not a block of a "
                             f"{depth}-block model ({-depth} to {depth - 1})")
    return list(out_indices)


def _map_source(net: nn.Module, name: str) -> nn.Module:
    """The timm ViT whose blocks make the maps: the model itself, or a foundation model's
    timm backbone (its ``timm_backbone``)."""
    target = net if hasattr(net, "forward_intermediates") else getattr(net, "timm_backbone", None)
    if target is None or not hasattr(target, "prune_intermediate_layers"):
        raise ValueError(f"out_indices: {name} has no timm ViT (forward_intermediates) to take "
                         f"feature maps from; leave out_indices=None for (B, D) features")
    radius = getattr(target, "disc_radius", None)
    if radius is not None:
        grid = tuple(target.patch_embed.grid_size)
        kept = int(disc_token_mask(grid, radius).sum())
        raise ValueError(
            f"out_indices: {name} attends only to the {kept} of {grid[0] * grid[1]} patch "
            f"tokens inside the tile's inscribed disc, which do not fill a (B, D, h, w) map; "
            f"for segmentation use equivit_ric_* (the same stem, every token), or leave "
            f"out_indices=None for (B, D) features")
    return target


def backbone(model_name: str | None = None, checkpoint: str | os.PathLike | None = None,
             weights: str | os.PathLike | None = None,
             out_indices: int | Sequence[int] | None = None, d4_average: bool = False,
             seed: int | None = None) -> nn.Module:
    """An eva backbone (``path: equivit_plugin.eva.backbone`` of
    ``eva.core.models.wrappers.ModelFromFunction``), in eval mode, on the CPU (eva moves it).

    Args:
        model_name: a registered timm name (``equivit_disc_small_patch16_224``,
            ``equivit_ric_tiny_patch16_224``...: random weights unless ``checkpoint``) or a
            foundation model of ``equivit encoders`` (``uni_v1``, ``kaiko-vits16``...: give
            ``weights``). Default :data:`DEFAULT_MODEL`; with ``checkpoint`` it is checked
            against the checkpoint's architecture (so eva's ``MODEL_NAME``, which also names
            the output folders, cannot silently disagree with the weights).
        checkpoint: a self-describing checkpoint of this package
            (:func:`~equivit_plugin.models.save_checkpoint`; the bundle and distillation write
            them): architecture and weights.
        weights: a foundation model's released weights (file or folder; ``"random"``: random
            weights of its architecture). Only with a foundation model's ``model_name``.
        out_indices: ``None``: pooled ``(B, D)`` embeddings (classification); ``n``: the last
            ``n`` blocks, or a list of block indices: feature maps (segmentation).
        d4_average: average each tile's ``(B, D)`` embedding over its 8 rotations/flips (exactly
            invariant to them with any model, 8x the cost). Not with ``out_indices``.
        seed: draw a registered name's random weights under ``torch.manual_seed(seed)`` (the
            caller's RNG untouched); ``None``: the global RNG.

    Shapes:
        ``(B, 3, S, S)`` tiles normalised with the model's mean/std (``S = 224`` for the
        registered names) -> ``(B, D)`` without ``out_indices`` (float32 under autocast, as
        :func:`~equivit_plugin.models.load_encoder` returns it); with it a list of
        ``(B, D, S / 16, S / 16)`` maps, one per block asked for
        (:class:`IntermediateFeatures`).

    Raises:
        ValueError: a bad argument, named in the one-line message
            (:class:`~equivit_plugin.models.ModelLoadError` for what cannot be loaded).
        FileNotFoundError: ``checkpoint`` does not exist.
    """
    if model_name is not None and not isinstance(model_name, str):
        raise ValueError(f"model_name= must be a model name (str), got {model_name!r}")
    if not isinstance(d4_average, bool):
        raise ValueError(f"d4_average= must be true or false, got {d4_average!r} (in eva's "
                         f"YAML wrap ${{oc.env:...}} in ${{oc.decode:...}}: oc.env gives "
                         f"strings)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed= must be an integer or null, got {seed!r}")
    if out_indices is not None:
        _checked_out_indices(out_indices, None)
    if d4_average and out_indices is not None:
        raise ValueError("d4_average=True averages (B, D) embeddings; feature maps "
                         "(out_indices=...) turn with the tile, so they cannot be averaged")
    if checkpoint is not None:
        if weights is not None:
            raise ValueError(f"weights= is for a foundation model by name; checkpoint="
                             f"{str(checkpoint)!r} carries its own weights")
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint={str(checkpoint)!r}: no such file")
        encoder, info = load_encoder(path, d4_average=d4_average)
        if model_name is not None and model_name != info.name:
            raise ModelLoadError(f"checkpoint={str(checkpoint)!r} holds {info.name}, but "
                                 f"model_name={model_name!r}: give the checkpoint's name "
                                 f"(MODEL_NAME in docs/eva's configs) or leave model_name out")
    else:
        name = DEFAULT_MODEL if model_name is None else model_name
        if is_checkpoint_path(name):
            raise ValueError(f"model_name={name!r} is a file: pass it as checkpoint=")
        if unknown_source_reason(name) is not None:
            raise ModelLoadError(f"model_name={name!r} is neither a registered timm model "
                                 f"(equivit_disc_small_patch16_224, equivit_ric_tiny_patch16_224"
                                 f"...) nor a foundation model (`equivit encoders`)")
        encoder, info = load_encoder(name, weights=weights, d4_average=d4_average, seed=seed)
    if out_indices is None:
        return encoder.eval()
    target = _map_source(encoder.net, info.name)
    return IntermediateFeatures(target, _checked_out_indices(out_indices, len(target.blocks)))
