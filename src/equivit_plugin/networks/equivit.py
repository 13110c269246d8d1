"""Equi-ViT with MONAI-style arguments, for ``_target_`` in bundle configs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..models import EquiVisionTransformer, model_config

__all__ = ["EquiViT"]


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
        global_pool: ``"token"`` (class token) or ``"avg"``.
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
        global_pool: str = "token",
        **kwargs: Any,
    ) -> None:
        if variant in ("equivit", "equivit_ri", "convvit"):
            kwargs["embed_layer"] = None  # filled below, with the stem's own arguments
        config = model_config(
            variant, size, in_chans=in_channels, num_classes=num_classes,
            img_size=tuple(img_size) if not isinstance(img_size, int) else img_size,
            patch_size=patch_size, drop_rate=dropout_rate, drop_path_rate=drop_path_rate,
            global_pool=global_pool, **{k: v for k, v in kwargs.items() if k != "embed_layer"},
        )
        if "embed_layer" in kwargs:
            stem = config["embed_layer"]
            config["embed_layer"] = lambda **a: stem(
                kernel_sizes=kernel_sizes, mid_channels=mid_channels, **a
            )
        super().__init__(**config)
        self.variant, self.size = variant, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, K)`` logits."""
        return super().forward(x)
