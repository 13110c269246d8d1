"""Equi-ViT with MONAI-style arguments, for ``_target_`` in bundle configs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..layers import StackedConvPatchEmbed
from ..models import (
    EMBED_LAYERS,
    EquiVisionTransformer,
    checkpoint_weights,
    create_model,
    load_checkpoint,
    load_vit_weights,
    model_config,
)

__all__ = ["EquiViT", "create_network"]


class EquiViT(EquiVisionTransformer):
    """Equi-ViT (or a baseline) as a MONAI network that returns a logits tensor.

    The state dict is that of the timm model of the same variant and size, so checkpoints move
    freely between ``timm.create_model("equivit_ri_tiny_patch16_224")`` and this class.

    Args:
        in_channels: image channels ``C``.
        num_classes: number of output logits ``K`` (0 gives the pooled features).
        img_size: input spatial size (``int`` or ``(H, W)``), a multiple of ``patch_size``.
        patch_size: patch size ``p``.
        variant: ``"equivit"``, ``"equivit_ri"`` (rotation-invariant), ``"convvit"`` or ``"vit"``.
        size: ``"tiny"``, ``"small"`` or ``"base"``.
        kernel_sizes: GMR/conv stem kernel sizes (default ``(6, 11)`` for ``p = 16``).
        mid_channels: channels between stem layers.
        dropout_rate: classifier-head dropout.
        drop_path_rate: stochastic depth.
        global_pool: ``"token"`` (class token) or ``"avg"``; default the variant's (``"avg"``
            for ``equivit_rid``/``equivit_ric``, else ``"token"``).
        **kwargs: any other ``timm`` ``VisionTransformer`` argument.

    Shapes:
        ``(B, C, H, W) -> (B, K)``.

    Example:
        >>> net = EquiViT(in_channels=3, num_classes=9, variant="equivit_ri", size="tiny")
        >>> net(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 9])
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 9,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        variant: str = "equivit",
        size: str = "tiny",
        kernel_sizes: Sequence[int] | None = None,
        mid_channels: int = 64,
        dropout_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str | None = None,
        **kwargs: Any,
    ) -> None:
        config = model_config(
            variant, size, in_chans=in_channels, num_classes=num_classes,
            img_size=img_size if isinstance(img_size, int) else tuple(img_size),
            patch_size=patch_size, drop_rate=dropout_rate, drop_path_rate=drop_path_rate,
            **({"global_pool": global_pool} if global_pool is not None else {}), **kwargs,
        )
        embed_layer = config["embed_layer"]
        if isinstance(embed_layer, str):
            embed_layer = EMBED_LAYERS[embed_layer]
        if isinstance(embed_layer, type) and issubclass(embed_layer, StackedConvPatchEmbed):
            config["embed_layer"] = partial(embed_layer, kernel_sizes=kernel_sizes,
                                            mid_channels=mid_channels)
        elif kernel_sizes is not None:
            raise ValueError(f"kernel_sizes={kernel_sizes} needs a stacked stem, "
                             f"but variant {variant!r} uses {embed_layer.__name__}")
        super().__init__(**config)
        self.variant, self.size = variant, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, K)`` logits."""
        return super().forward(x)


def create_network(model_name: str, num_classes: int, in_channels: int = 3,
                   img_size: int = 224, init_checkpoint: str | os.PathLike | None = None,
                   **kwargs: Any) -> torch.nn.Module:
    """Any registered timm model (``equivit_*``, ``equivit_ri_*``, ``convvit_*``, ``vit_*``...)
    from MONAI-style arguments (:func:`equivit_plugin.models.create_model`).

    Args:
        model_name: timm registry name.
        num_classes: head size ``K``.
        in_channels: image channels.
        img_size: input side.
        init_checkpoint: a self-describing checkpoint (e.g. a distilled student, whose pooled
            features are its teacher's) to start from: every weight is copied but a classifier
            head of another size, which stays freshly initialised. Its architecture must be this
            one: the same ``model_name`` and architecture arguments in ``kwargs``.
        **kwargs: more ``timm.create_model`` arguments (``depth``, ``feature_dim``...).

    Shapes:
        ``(B, in_channels, img_size, img_size) -> (B, num_classes)``.

    Raises:
        ValueError: ``init_checkpoint`` is another architecture (the message says which
            arguments rebuild it).
    """
    net = create_model(model_name, num_classes, img_size=img_size, in_chans=in_channels,
                       **kwargs)
    if init_checkpoint:
        _initialise_from(net, model_name, Path(init_checkpoint))
    return net


def _initialise_from(net: torch.nn.Module, model_name: str, path: Path) -> None:
    payload = load_checkpoint(path)
    built_with = {k: v for k, v in (payload.get("model_kwargs") or {}).items()
                  if k != "num_classes"}
    advice = (f"it was built as {payload['model_name']} with {built_with}: give that "
              f"network_name and the same arguments to network_def and model_kwargs "
              f"(e.g. --network_def#feature_dim 768 --model_kwargs#feature_dim 768)")
    if payload["model_name"] != model_name:
        raise ValueError(f"init_checkpoint {path} is not a {model_name}: {advice}")
    report = load_vit_weights(net, checkpoint_weights(payload), skip_prefixes=())
    misfits = {k: why for k, why in report.skipped.items() if not k.startswith("head.")}
    missing = [k for k in report.missing if not k.startswith("head.")]
    if misfits or missing:
        example = next(iter(misfits.items()), (missing[0] if missing else "",
                                               "not in the checkpoint"))
        raise ValueError(f"init_checkpoint {path}: {len(misfits) + len(missing)} weights do "
                         f"not fit this network (e.g. {example[0]}: {example[1]}); {advice}")
