"""MONAI door: the ``EquiViT`` network and GMR convolutions in MONAI's ``Conv`` factory.

Importing this door (``import equivit_plugin.networks``; the bundle configs do) makes
``monai.networks.layers.Conv["gmr", 2]`` ``GMRConv2d`` (and ``Conv["gmr", 3]`` ``GMRConv3d``),
so MONAI networks that take a conv type can use it. ``import equivit_plugin`` alone does not
import MONAI.
"""

from monai.networks.layers.factories import Conv

from ..layers import GMRConv1d, GMRConv2d, GMRConv3d
from .equivit import EquiViT, create_network

__all__ = ["EquiViT", "create_network", "register_monai_layers"]


def _gmr_factory(dim: int) -> type:
    """GMR (Gaussian Mixture Ring) rotation-equivariant convolution."""
    types = (GMRConv1d, GMRConv2d, GMRConv3d)
    if dim not in (1, 2, 3):
        raise ValueError(f"GMR convolutions exist for 1, 2 or 3 spatial dims, got {dim}")
    return types[dim - 1]


def register_monai_layers() -> None:
    """Add ``"gmr"`` to MONAI's ``Conv`` factory (idempotent)."""
    if "GMR" not in Conv.names:
        Conv.add_factory_callable("gmr", _gmr_factory)


register_monai_layers()
