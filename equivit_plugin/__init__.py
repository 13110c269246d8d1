"""equivit-plugin: rotation-equivariant vision transformers for MONAI, timm and TIAToolbox.

``import equivit_plugin`` is instant: it imports neither torch, timm, MONAI nor TIAToolbox.
The models are registered in timm (``equivit_*``, ``equivit_ri_*``, ``convvit_*``) as soon as
timm is imported (see :mod:`equivit_plugin.registration`); the names below and the
subpackages load on first use. The MONAI door (``import equivit_plugin.networks``) registers
``monai.networks.layers.Conv["gmr", 2]``; the TIAToolbox door is ``equivit_plugin.tiatoolbox``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .registration import register_models_with_timm
from .utils.lazy import lazy_attributes
from .version import __version__

_LAZY_NAMES = {
    "GMRConv1d": "layers", "GMRConv2d": "layers", "GMRConv3d": "layers",
    "GMRPatchEmbed": "layers", "RadialPosEmbed": "layers",
    "EquiVisionTransformer": "models", "ModelInfo": "models", "create_model": "models",
    "load_model": "models", "load_vit_weights": "models", "pooled_embedding": "models",
}
_SUBPACKAGES = ("bundle", "cli", "equivariance", "eva", "export", "features", "lazyslide",
                "layers", "models", "networks", "robustness", "tiatoolbox", "trident", "utils")

__all__ = [
    "EquiVisionTransformer",
    "GMRConv1d",
    "GMRConv2d",
    "GMRConv3d",
    "GMRPatchEmbed",
    "ModelInfo",
    "RadialPosEmbed",
    "__version__",
    "create_model",
    "load_model",
    "load_vit_weights",
    "pooled_embedding",
]

if TYPE_CHECKING:
    from .layers import GMRConv1d, GMRConv2d, GMRConv3d, GMRPatchEmbed, RadialPosEmbed
    from .models import (
        EquiVisionTransformer,
        ModelInfo,
        create_model,
        load_model,
        load_vit_weights,
        pooled_embedding,
    )


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_NAMES, globals(), _SUBPACKAGES)


register_models_with_timm()
