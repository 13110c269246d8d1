"""Equivariant building blocks: GMR convolutions, patch embeddings, radial position embedding."""

from .gmr_conv import GMRConv1d, GMRConv2d, GMRConv3d, GMRConvNd, ring_basis, ring_distances
from .patch_embed import (
    ConvPatchEmbed,
    ConvStackProjection,
    GMRPatchEmbed,
    StackedConvPatchEmbed,
    compose_kernels,
    default_kernel_sizes,
)
from .pos_embed import RadialPosEmbed, radial_distances

__all__ = [
    "ConvPatchEmbed",
    "ConvStackProjection",
    "GMRConv1d",
    "GMRConv2d",
    "GMRConv3d",
    "GMRConvNd",
    "GMRPatchEmbed",
    "RadialPosEmbed",
    "StackedConvPatchEmbed",
    "compose_kernels",
    "default_kernel_sizes",
    "radial_distances",
    "ring_basis",
    "ring_distances",
]
