"""The Equi-ViT family in timm's registry: one ``@register_model`` entry per model.

Registered (``timm.create_model(name)`` once ``equivit_plugin`` and timm are imported):

* ``equivit_{tiny,small,base}_patch16_224``: GMR patch embedding, learned absolute position
  embedding, class token - as published.
* ``equivit_ri_{tiny,small,base}_patch16_224``: GMR patch embedding and a radial position
  embedding: logits and pooled features are invariant to 90-degree rotations and flips.
* ``equivit_rid_{tiny,small,base}_patch16_224``: as ``equivit_ri`` plus a learned per-head
  attention bias that depends only on the distance between two patches (which patches are
  neighbours), mean-pooled tokens: still exactly invariant.
* ``equivit_ric_{tiny,small,base}_patch16_224``: as ``equivit_rid`` with an exactly
  equivariant convolutional stem (four 4 x 4 stride-2 GMR convolutions, GroupNorm, GELU)
  instead of the single stride-16 projection, and two transformer blocks fewer to pay for it:
  invariant at 90-degree steps, and more robust off the 90-degree grid and to sub-patch shifts
  than ViT at about its cost.
* ``equivit_disc_{tiny,small,base}_patch16_224``: as ``equivit_ric``, attending and pooling
  only over the patches inside the tile's inscribed disc (156 of 196 tokens), the one part of a
  tile that every rotation shows: still exactly invariant at 90-degree steps, and much steadier
  at other angles (the default distillation student).
* ``convvit_{tiny,small,base}_patch16_224``: the same two-layer stem with plain convolutions
  (the paper's "Conv2D ViT" baseline). timm's own ``vit_*`` is the standard ViT.

This module imports only timm's registry: the entries build through
:func:`~.equivit.build_family_member` when called. So registering can happen at the moment
timm finishes importing (:mod:`equivit_plugin.registration`), even when that import was
started by the package's own layers.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from torch import nn

__all__: list[str] = []  # the entries are reached through timm.create_model


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.convs.0",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    f"{variant}_{size}_patch16_224": _cfg()
    for variant in ("equivit", "equivit_ri", "equivit_rid", "equivit_ric", "equivit_disc",
                    "convvit")
    for size in ("tiny", "small", "base")
})


def _create(name: str, pretrained: bool, variant: str, size: str, **kwargs: Any) -> nn.Module:
    # Imported here, not at the top: registering must not import the layers (see above).
    from .equivit import build_family_member

    return build_family_member(name, pretrained, variant, size, **kwargs)


@register_model
def equivit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Equi-ViT-Ti/16: GMR stem (6, 11), learned absolute position embedding."""
    return _create("equivit_tiny_patch16_224", pretrained, "equivit", "tiny", **kwargs)


@register_model
def equivit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Equi-ViT-S/16: GMR stem (6, 11), learned absolute position embedding."""
    return _create("equivit_small_patch16_224", pretrained, "equivit", "small", **kwargs)


@register_model
def equivit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Equi-ViT-B/16: GMR stem (6, 11), learned absolute position embedding."""
    return _create("equivit_base_patch16_224", pretrained, "equivit", "base", **kwargs)


@register_model
def equivit_ri_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Rotation-invariant Equi-ViT-Ti/16: GMR stem, radial position embedding."""
    return _create("equivit_ri_tiny_patch16_224", pretrained, "equivit_ri", "tiny", **kwargs)


@register_model
def equivit_ri_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Rotation-invariant Equi-ViT-S/16: GMR stem, radial position embedding."""
    return _create("equivit_ri_small_patch16_224", pretrained, "equivit_ri", "small", **kwargs)


@register_model
def equivit_ri_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Rotation-invariant Equi-ViT-B/16: GMR stem, radial position embedding."""
    return _create("equivit_ri_base_patch16_224", pretrained, "equivit_ri", "base", **kwargs)


@register_model
def equivit_rid_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Equi-ViT-RID-Ti/16: GMR stem, radial position embedding, distance attention bias."""
    return _create("equivit_rid_tiny_patch16_224", pretrained, "equivit_rid", "tiny", **kwargs)


@register_model
def equivit_rid_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Equi-ViT-RID-S/16: GMR stem, radial position embedding, distance attention bias."""
    return _create("equivit_rid_small_patch16_224", pretrained, "equivit_rid", "small", **kwargs)


@register_model
def equivit_rid_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Equi-ViT-RID-B/16: GMR stem, radial position embedding, distance attention bias."""
    return _create("equivit_rid_base_patch16_224", pretrained, "equivit_rid", "base", **kwargs)


@register_model
def equivit_ric_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Equi-ViT-RIC-Ti/16: equivariant conv stem, radial position, distance attention bias."""
    return _create("equivit_ric_tiny_patch16_224", pretrained, "equivit_ric", "tiny", **kwargs)


@register_model
def equivit_ric_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Equi-ViT-RIC-S/16: equivariant conv stem, radial position, distance attention bias."""
    return _create("equivit_ric_small_patch16_224", pretrained, "equivit_ric", "small", **kwargs)


@register_model
def equivit_ric_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Equi-ViT-RIC-B/16: equivariant conv stem, radial position, distance attention bias."""
    return _create("equivit_ric_base_patch16_224", pretrained, "equivit_ric", "base", **kwargs)


@register_model
def equivit_disc_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Equi-ViT-Disc-Ti/16: Equi-ViT-RIC over the tokens of the inscribed disc."""
    return _create("equivit_disc_tiny_patch16_224", pretrained, "equivit_disc", "tiny",
                   **kwargs)


@register_model
def equivit_disc_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Equi-ViT-Disc-S/16: Equi-ViT-RIC over the tokens of the inscribed disc."""
    return _create("equivit_disc_small_patch16_224", pretrained, "equivit_disc", "small",
                   **kwargs)


@register_model
def equivit_disc_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Equi-ViT-Disc-B/16: Equi-ViT-RIC over the tokens of the inscribed disc."""
    return _create("equivit_disc_base_patch16_224", pretrained, "equivit_disc", "base",
                   **kwargs)


@register_model
def convvit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ConvViT-Ti/16 baseline: two plain convolutions (6, 11) as the stem."""
    return _create("convvit_tiny_patch16_224", pretrained, "convvit", "tiny", **kwargs)


@register_model
def convvit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ConvViT-S/16 baseline: two plain convolutions (6, 11) as the stem."""
    return _create("convvit_small_patch16_224", pretrained, "convvit", "small", **kwargs)


@register_model
def convvit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ConvViT-B/16 baseline: two plain convolutions (6, 11) as the stem."""
    return _create("convvit_base_patch16_224", pretrained, "convvit", "base", **kwargs)
