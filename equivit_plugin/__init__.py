"""equivit-plugin: rotation-equivariant vision transformers for MONAI, timm and TIAToolbox.

Importing the package registers the models in timm (``equivit_*``, ``equivit_ri_*``,
``convvit_*``) and the GMR convolution in MONAI's ``Conv`` factory (``Conv["gmr", 2]``).
"""

from . import models, networks  # noqa: F401  (registration side effects)
from .layers import GMRConv1d, GMRConv2d, GMRConv3d, GMRPatchEmbed, RadialPosEmbed
from .models import EquiVisionTransformer, load_vit_weights

__version__ = "0.1.0"

__all__ = [
    "EquiVisionTransformer",
    "GMRConv1d",
    "GMRConv2d",
    "GMRConv3d",
    "GMRPatchEmbed",
    "RadialPosEmbed",
    "__version__",
    "load_vit_weights",
]
