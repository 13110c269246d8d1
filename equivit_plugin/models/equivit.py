"""Equi-ViT (arXiv 2601.09130) and its baselines, built on timm's ``VisionTransformer``.

The family members and their timm registry entries are listed in :mod:`.registry`; this
module holds the model class and how a member is configured and built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Literal

import torch
from timm.layers import PatchEmbed
from timm.models import VisionTransformer, build_model_with_cfg
from torch import nn

from ..layers import (
    ConvPatchEmbed,
    DistanceAttentionBias,
    GMRConvStemEmbed,
    GMRPatchEmbed,
    RadialPosEmbed,
    disc_token_indices,
)

__all__ = ["DEFAULT_INVARIANT_VARIANT", "DEFAULT_STUDENT_VARIANT", "DEPTH_CHANGE",
           "EMBED_LAYERS", "MODEL_SIZES", "VARIANTS", "EquiVisionTransformer",
           "build_family_member", "model_config", "model_name"]

PosEmbedType = Literal["learn", "radial", "none"]
AttnBiasType = Literal["none", "distance"]

MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}

EMBED_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "linear": PatchEmbed,
    "gmr": GMRPatchEmbed,
    "gmr_stem": GMRConvStemEmbed,
    "conv": ConvPatchEmbed,
}
"""Patch embeddings by name (``embed_layer="gmr_stem"``: a name keeps checkpoints
self-describing): timm's linear projection, the published two-layer GMR stack, the equivariant
convolutional stem (:class:`~equivit_plugin.layers.GMRConvStemEmbed`), the plain-conv stack."""

VARIANTS: dict[str, dict[str, Any]] = {
    "equivit": {"embed_layer": "gmr", "pos_embed": "learn"},
    "equivit_ri": {"embed_layer": "gmr", "pos_embed": "radial"},
    "equivit_rid": {"embed_layer": "gmr", "pos_embed": "radial", "attn_bias": "distance",
                    "global_pool": "avg"},
    "equivit_ric": {"embed_layer": "gmr_stem", "pos_embed": "radial", "attn_bias": "distance",
                    "global_pool": "avg"},
    "equivit_disc": {"embed_layer": "gmr_stem", "embed_kwargs": {"norm_disc_radius": 1.0},
                     "pos_embed": "radial", "attn_bias": "distance", "global_pool": "avg",
                     "disc_radius": 1.0},
    "convvit": {"embed_layer": "conv", "pos_embed": "learn"},
    "vit": {"embed_layer": "linear", "pos_embed": "learn"},
}
"""Constructor arguments that make each family member (sizes come from :data:`MODEL_SIZES`)."""

DEFAULT_INVARIANT_VARIANT = "equivit_disc"
"""The exactly invariant variant trained from scratch that kept feature neighbourhoods best
off the 90-degree grid, on four sources over three training seeds, with sub-patch shifts,
accuracy and speed level with ``equivit_ric`` (``benchmarks/rotation_robustness.py``,
``docs/invariant_models.md``: off-grid mutual-kNN 0.841 +- 0.023 pooled vs 0.686 +- 0.078,
8 px 0.692 +- 0.020 vs 0.714 +- 0.096, ViT 0.545 and 0.563): the default network of the
bundle's ``train.json`` and of ``equivit extract-features``."""

DEFAULT_STUDENT_VARIANT = "equivit_disc"
"""The default student of distillation (``benchmarks/distillation.py``,
``docs/distillation.md``): distilled from the same ``vit_tiny`` teacher, the one student that
held its feature neighbourhoods clearly better than the teacher off the 90-degree grid
(mutual-kNN 0.887, teacher 0.689; ``equivit_rid`` 0.714, ``equivit_ric`` 0.707,
``equivit_ri`` 0.663), at the teacher's speed. It pays 2-3 points of accuracy on upright tiles
(``equivit_rid``, which inherits all of a ViT teacher's blocks, gained 1-2): the corners it
never sees carry some of the teacher's signal."""

DEPTH_CHANGE: dict[str, int] = {"equivit_ric": -2, "equivit_disc": -2}
"""Blocks a variant adds to its size's depth: the convolutional stem (about ``4700 D^2``
multiply-adds, two blocks' worth at every width) pays for itself with two transformer blocks
fewer, as in "Early convolutions help transformers see better" (Xiao et al. 2021)."""


class EquiVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` with a choice of radial position embedding and of a
    distance-dependent attention bias.

    Args:
        pos_embed: ``"learn"`` (timm's learned absolute table), ``"radial"``
            (:class:`~equivit_plugin.layers.RadialPosEmbed`, rotation-invariant) or ``"none"``.
        radial_knot_spacing: knot spacing of the radial table, in patches.
        embed_layer: a patch-embedding class or one of :data:`EMBED_LAYERS`' names.
        embed_kwargs: more keyword arguments of the patch embedding (JSON-able, so a
            checkpoint stays self-describing), e.g. ``{"stages": [[4, 2], [4, 2], [4, 2],
            [4, 2]]}`` for ``"gmr_stem"``.
        attn_bias: ``"none"`` or ``"distance"``
            (:class:`~equivit_plugin.layers.DistanceAttentionBias`: every block's attention
            logits get a learned per-head function of the distance between the two patches,
            which keeps rotation invariance exact and tells attention which patches are
            neighbours).
        feature_dim: width ``F`` of a linear projection applied to the pooled (and
            ``fc_norm``-ed) token, so that the pooled features - ``forward_head(...,
            pre_logits=True)``, what every feature extractor reads - are ``F``-dimensional and
            the classifier head reads ``F`` features (``None``: no projection, ``F = D``).
            A distilled student uses it to speak its teacher's feature space; a linear map of
            an invariant vector stays invariant.
        disc_radius: keep only the patch tokens whose centre lies within this fraction of half
            the grid's side from the grid centre (``1.0``: the inscribed disc;
            :func:`~equivit_plugin.layers.disc_token_mask`), dropped right after the position
            embedding: attention and pooling see only the tissue that every rotation of the
            tile shows (``None``: all tokens). An ``attn_mask`` then covers the kept tokens.
        **kwargs: every other ``VisionTransformer`` argument (``embed_layer``, ``embed_dim``...).

    Shapes:
        ``forward``: ``(B, C, H, W) -> (B, num_classes)``; ``forward_features``:
        ``(B, C, H, W) -> (B, num_prefix_tokens + N, D)`` (``N``: the patches kept, all
        ``H W / p^2`` without ``disc_radius``); ``forward_head(..., pre_logits=True)``:
        ``-> (B, F)``.
    """

    def __init__(self, *args: Any, pos_embed: PosEmbedType = "learn",
                 radial_knot_spacing: float = 0.5, attn_bias: AttnBiasType = "none",
                 embed_layer: str | Callable[..., nn.Module] = "linear",
                 embed_kwargs: Mapping[str, Any] | None = None,
                 feature_dim: int | None = None, disc_radius: float | None = None,
                 **kwargs: Any) -> None:
        if isinstance(embed_layer, str):
            if embed_layer not in EMBED_LAYERS:
                raise ValueError(f"embed_layer must be one of {sorted(EMBED_LAYERS)} or a class, "
                                 f"got {embed_layer!r}")
            embed_layer = EMBED_LAYERS[embed_layer]
        if embed_kwargs:
            embed_layer = partial(embed_layer, **embed_kwargs)
        if pos_embed not in ("learn", "radial", "none", ""):
            raise ValueError(f"pos_embed must be 'learn', 'radial' or 'none', got {pos_embed!r}")
        if attn_bias not in ("none", "distance"):
            raise ValueError(f"attn_bias must be 'none' or 'distance', got {attn_bias!r}")
        if disc_radius is not None and (isinstance(disc_radius, bool)
                                        or not isinstance(disc_radius, int | float)
                                        or not disc_radius > 0):
            raise ValueError(f"disc_radius must be a positive number or None, got "
                             f"{disc_radius!r}")
        radial = pos_embed == "radial"
        super().__init__(*args, pos_embed="none" if radial else pos_embed,
                         embed_layer=embed_layer, **kwargs)
        self.radial_pos_embed = (
            RadialPosEmbed(self.embed_dim, self.patch_embed.grid_size or (14, 14),
                           knot_spacing=radial_knot_spacing)
            if radial else None
        )
        self.attn_bias = (
            DistanceAttentionBias(self.blocks[0].attn.num_heads,
                                  self.patch_embed.grid_size or (14, 14))
            if attn_bias == "distance" else None
        )
        self.disc_radius = None if disc_radius is None else float(disc_radius)
        self.feature_proj: nn.Linear | None = None
        if feature_dim is not None:
            if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) \
                    or feature_dim < 1:
                raise ValueError(f"feature_dim must be a positive integer or None, got "
                                 f"{feature_dim!r}")
            self.feature_proj = nn.Linear(self.embed_dim, feature_dim)
            self.num_features = self.head_hidden_size = feature_dim
            self.reset_classifier(self.num_classes)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        if getattr(self, "feature_proj", None) is not None and num_classes > 0:
            self.head = nn.Linear(self.head_hidden_size, num_classes)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.feature_proj is None:
            return super().forward_head(x, pre_logits)
        x = self.feature_proj(self.fc_norm(self.pool(x)))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"radial_pos_embed.weight", "attn_bias.weight",
                                            "attn_bias.prefix"}

    def _grid_size(self, x: torch.Tensor) -> tuple[int, int]:
        if self.dynamic_img_size:
            return tuple(self.patch_embed.dynamic_feat_size(x.shape[-2:]))
        return tuple(self.patch_embed.grid_size)

    def _kept_tokens(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """Sequence positions of the prefix tokens and the patches inside the disc
        (``None``: every token is kept)."""
        if self.disc_radius is None:
            return None
        return disc_token_indices(grid, self.disc_radius, self.num_prefix_tokens, device)

    def _with_attn_bias(self, x: torch.Tensor,
                        attn_mask: torch.Tensor | None) -> torch.Tensor | None:
        """``attn_mask`` plus the distance bias of ``x``'s token grid (``None``: no bias)."""
        if self.attn_bias is None:
            return attn_mask
        if self.training and self.patch_drop is not None \
                and not isinstance(self.patch_drop, nn.Identity):
            raise NotImplementedError("patch dropout with attn_bias='distance'")
        grid = self._grid_size(x)
        bias = self.attn_bias(grid, self.num_prefix_tokens).to(x.dtype)
        kept = self._kept_tokens(grid, bias.device)
        if kept is not None:
            bias = bias[..., kept, :][..., kept]
        if attn_mask is None:
            return bias
        if attn_mask.dtype == torch.bool:
            return bias.masked_fill(~attn_mask, float("-inf"))
        return bias + attn_mask

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        """``(B, C, H, W) -> (B, num_prefix_tokens + N, D)``."""
        if isinstance(is_causal, torch.Tensor):
            # torch.onnx's TorchScript-based exporter passes the defaults of forward's
            # arguments as traced tensors; attention wants the Python bool back.
            is_causal = bool(is_causal)
        return super().forward_features(x, attn_mask=self._with_attn_bias(x, attn_mask),
                                        is_causal=is_causal)

    def forward_intermediates(self, x: torch.Tensor, *args: Any,
                              attn_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """timm's ``forward_intermediates`` with the distance bias (when there is one). With
        ``disc_radius`` the kept tokens do not fill a grid: ask for ``output_fmt="NLC"``."""
        output_fmt = kwargs.get("output_fmt", args[4] if len(args) > 4 else "NCHW")
        if self.disc_radius is not None and output_fmt == "NCHW":
            raise ValueError("forward_intermediates: a model with disc_radius keeps only the "
                             "tokens inside the disc, which do not form an NCHW grid; pass "
                             "output_fmt='NLC'")
        return super().forward_intermediates(
            x, *args, attn_mask=self._with_attn_bias(x, attn_mask), **kwargs)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # NHWC from a dynamic-size patch embedding, else (B, N, D) on the fixed grid.
        grid = (x.shape[1], x.shape[2]) if x.dim() == 4 else tuple(self.patch_embed.grid_size)
        if self.radial_pos_embed is None:
            x = super()._pos_embed(x)
        else:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            x = x + self.radial_pos_embed(grid).to(x.dtype)
            prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token)
                      if t is not None]
            if prefix:
                x = torch.cat(prefix + [x], dim=1)
            x = self.pos_drop(x)
        kept = self._kept_tokens(grid, x.device)
        return x if kept is None else x[:, kept]


def model_config(variant: str, size: str, **overrides: Any) -> dict[str, Any]:
    """Constructor arguments of ``EquiVisionTransformer`` for a family member.

    Args:
        variant: one of :data:`VARIANTS` (``"equivit"``, ``"equivit_ri"``, ``"equivit_rid"``,
            ``"equivit_ric"``, ``"equivit_disc"``, ``"convvit"``, ``"vit"``).
        size: ``"tiny"``, ``"small"`` or ``"base"``.
        **overrides: any constructor argument (``num_classes``, ``img_size``...).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    if size not in MODEL_SIZES:
        raise ValueError(f"size must be one of {sorted(MODEL_SIZES)}, got {size!r}")
    dims = dict(MODEL_SIZES[size])
    dims["depth"] += DEPTH_CHANGE.get(variant, 0)
    return {**dims, **VARIANTS[variant], **overrides}


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
