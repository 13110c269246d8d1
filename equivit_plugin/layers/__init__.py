"""Equivariant building blocks: GMR convolutions, patch embeddings and stems, radial position
embedding, distance attention bias, disc token selection, anti-aliasing blur."""

from .attn_bias import DistanceAttentionBias, pairwise_distances
from .blur import GaussianBlur2d, gaussian_taps
from .conv_stem import ConvStem, GMRConvStemEmbed, default_stem_stages, stem_group_norm
from .disc import DiscGroupNorm, disc_token_indices, disc_token_mask
from .gmr_conv import GMRConv1d, GMRConv2d, GMRConv3d, GMRConvNd, ring_basis, ring_distances
from .patch_embed import (
    ConvPatchEmbed,
    ConvStackProjection,
    GMRPatchEmbed,
    ProjectedPatchEmbed,
    StackedConvPatchEmbed,
    compose_kernels,
    default_kernel_sizes,
)
from .pos_embed import RadialPosEmbed, radial_distances

__all__ = [
    "ConvPatchEmbed",
    "ConvStackProjection",
    "ConvStem",
    "DiscGroupNorm",
    "DistanceAttentionBias",
    "GaussianBlur2d",
    "GMRConv1d",
    "GMRConv2d",
    "GMRConv3d",
    "GMRConvNd",
    "GMRConvStemEmbed",
    "GMRPatchEmbed",
    "ProjectedPatchEmbed",
    "RadialPosEmbed",
    "StackedConvPatchEmbed",
    "compose_kernels",
    "default_kernel_sizes",
    "default_stem_stages",
    "disc_token_indices",
    "disc_token_mask",
    "gaussian_taps",
    "pairwise_distances",
    "radial_distances",
    "ring_basis",
    "ring_distances",
    "stem_group_norm",
]
