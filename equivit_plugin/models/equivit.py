"""Equi-ViT (arXiv 2601.09130) and its baselines, built on timm's ``VisionTransformer``.

The family members and their timm registry entries are listed in :mod:`.registry`; this
module holds the model class and how a member is configured and built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from timm.layers import PatchEmbed
from timm.models import VisionTransformer, build_model_with_cfg
from torch import nn

from ..layers import ConvPatchEmbed, GMRPatchEmbed, RadialPosEmbed

__all__ = ["EquiVisionTransformer", "MODEL_SIZES", "STEMS", "build_family_member",
           "model_config", "model_name"]

PosEmbedType = Literal["learn", "radial", "none"]

MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}

# variant -> (patch embedding, position embedding)
STEMS: dict[str, tuple[Callable[..., nn.Module], PosEmbedType]] = {
    "equivit": (GMRPatchEmbed, "learn"),
    "equivit_ri": (GMRPatchEmbed, "radial"),
    "convvit": (ConvPatchEmbed, "learn"),
    "vit": (PatchEmbed, "learn"),
}


class EquiVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` with a choice of radial position embedding.

    Args:
        pos_embed: ``"learn"`` (timm's learned absolute table), ``"radial"``
            (:class:`~equivit_plugin.layers.RadialPosEmbed`, rotation-invariant) or ``"none"``.
        radial_knot_spacing: knot spacing of the radial table, in patches.
        **kwargs: every other ``VisionTransformer`` argument (``embed_layer``, ``embed_dim``...).

    Shapes:
        ``forward``: ``(B, C, H, W) -> (B, num_classes)``; ``forward_features``:
        ``(B, C, H, W) -> (B, num_prefix_tokens + N, D)``.
    """

    def __init__(self, *args: Any, pos_embed: PosEmbedType = "learn",
                 radial_knot_spacing: float = 0.5, **kwargs: Any) -> None:
        if pos_embed not in ("learn", "radial", "none", ""):
            raise ValueError(f"pos_embed must be 'learn', 'radial' or 'none', got {pos_embed!r}")
        radial = pos_embed == "radial"
        super().__init__(*args, pos_embed="none" if radial else pos_embed, **kwargs)
        self.radial_pos_embed = (
            RadialPosEmbed(self.embed_dim, self.patch_embed.grid_size or (14, 14),
                           knot_spacing=radial_knot_spacing)
            if radial else None
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"radial_pos_embed.weight"}

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.radial_pos_embed is None:
            return super()._pos_embed(x)
        if x.dim() == 4:  # NHWC from a dynamic-size patch embedding
            grid = (x.shape[1], x.shape[2])
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        else:
            grid = self.patch_embed.grid_size
        x = x + self.radial_pos_embed(grid).to(x.dtype)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token)
                  if t is not None]
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        return self.pos_drop(x)


def model_config(variant: str, size: str, **overrides: Any) -> dict[str, Any]:
    """Constructor arguments of ``EquiVisionTransformer`` for a family member.

    Args:
        variant: ``"equivit"``, ``"equivit_ri"``, ``"convvit"`` or ``"vit"``.
        size: ``"tiny"``, ``"small"`` or ``"base"``.
        **overrides: any constructor argument (``num_classes``, ``img_size``...).
    """
    if variant not in STEMS:
        raise ValueError(f"variant must be one of {sorted(STEMS)}, got {variant!r}")
    if size not in MODEL_SIZES:
        raise ValueError(f"size must be one of {sorted(MODEL_SIZES)}, got {size!r}")
    embed_layer, pos_embed = STEMS[variant]
    return {"embed_layer": embed_layer, "pos_embed": pos_embed, **MODEL_SIZES[size], **overrides}


def model_name(variant: str, size: str, patch_size: int = 16, img_size: int = 224) -> str:
    """Registry name, e.g. ``model_name("equivit_ri", "tiny") == "equivit_ri_tiny_patch16_224"``."""
    return f"{variant}_{size}_patch{patch_size}_{img_size}"


def build_family_member(name: str, pretrained: bool, variant: str, size: str,
                        **kwargs: Any) -> EquiVisionTransformer:
    """Build the registered model ``name`` (= ``model_name(variant, size)``) through timm's
    ``build_model_with_cfg`` (pretrained config, ``checkpoint_path=``, feature extraction)."""
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        EquiVisionTransformer, name, pretrained,
        feature_cfg={"out_indices": out_indices, "feature_cls": "getter"},
        **model_config(variant, size, **{"patch_size": 16, "img_size": 224, **kwargs}),
    )
