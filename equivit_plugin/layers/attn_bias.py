"""Attention bias that depends only on the Euclidean distance between two patches.

A rotation of the image by 90/180/270 degrees or a flip permutes the patches of a square grid
(the 180-degree turn and the flips also those of a rectangular one) and preserves every
pairwise distance, so a bias that is a function of distance alone is permuted with the tokens:
attention stays exactly equivariant, and a model whose other parts are invariant stays
invariant. Unlike a radial position embedding, which tells a token only how far it is from the
centre, the bias tells attention which patches are neighbours.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

__all__ = ["DistanceAttentionBias", "pairwise_distances"]


def pairwise_distances(grid_size: tuple[int, int], device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Euclidean distance, in patches, between every two cells of a grid.

    Returns:
        ``(H * W, H * W)`` in row-major (token) order.
    """
    h, w = grid_size
    rows = torch.arange(h, device=device, dtype=dtype).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=dtype).repeat(h)
    return torch.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :])


@functools.lru_cache(maxsize=16)
def _knot_interpolation(grid_size: tuple[int, int], knot_spacing: float, num_knots: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower knot index and fraction towards the next knot of every patch pair.

    Depends only on the grid and the table's shape, so it is built once, not every forward
    pass. Built outside inference mode: an inference tensor cached here could not be used by
    a later training step.
    """
    with torch.inference_mode(False):
        position = pairwise_distances(grid_size, device, torch.float64)
        position = (position / knot_spacing).clamp(max=num_knots - 1)
        lower = position.floor().long().clamp(max=num_knots - 2)
        return lower, position - lower


class DistanceAttentionBias(nn.Module):
    """Learned per-head attention bias ``b_h(|p_i - p_j|)`` between patch tokens.

    ``b_h`` is piecewise linear in the distance, with knots at ``0, s, 2s, ...`` patches
    (``s = knot_spacing``); distances beyond the last knot take the last value, so any grid
    works. Prefix tokens (class, register) have no position: a prefix token attending to a
    patch, a patch attending to a prefix token and prefix-to-prefix each get one learned
    per-head constant. Everything starts at zero, i.e. as plain attention.

    The bias is added to the attention logits (``attn_mask`` of timm's ``Attention``, i.e. of
    ``F.scaled_dot_product_attention``) and shared by all blocks, as T5's relative bias is.

    Args:
        num_heads: attention heads ``h``.
        grid_size: the grid the table is sized for (larger grids clamp to the last knot).
        knot_spacing: distance between knots, in patches.

    Shapes:
        ``forward(grid_size, num_prefix_tokens) -> (1, h, P + H * W, P + H * W)``.
    """

    def __init__(self, num_heads: int, grid_size: tuple[int, int] = (14, 14),
                 knot_spacing: float = 1.0) -> None:
        super().__init__()
        if knot_spacing <= 0:
            raise ValueError(f"knot_spacing must be positive, got {knot_spacing}")
        max_distance = math.hypot(grid_size[0] - 1, grid_size[1] - 1)
        num_knots = math.ceil(max_distance / knot_spacing) + 2
        self.knot_spacing = knot_spacing
        self.weight = nn.Parameter(torch.zeros(num_heads, num_knots))
        self.prefix = nn.Parameter(torch.zeros(num_heads, 3))  # to patch, from patch, prefix

    def patch_bias(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """``(h, H * W, H * W)`` bias between the patch tokens of a grid."""
        # dynamo would trace through the cache (and warn): call the plain function there
        interpolation = _knot_interpolation.__wrapped__ if torch.compiler.is_compiling() \
            else _knot_interpolation
        lower, frac = interpolation(tuple(grid_size), self.knot_spacing, self.weight.shape[1],
                                    self.weight.device)
        frac = frac.to(self.weight.dtype)
        return self.weight[:, lower] * (1 - frac) + self.weight[:, lower + 1] * frac

    def forward(self, grid_size: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
        patches = self.patch_bias(grid_size)
        heads, n, _ = patches.shape
        if num_prefix_tokens:
            p = num_prefix_tokens
            top = torch.cat([self.prefix[:, 2, None, None].expand(heads, p, p),
                             self.prefix[:, 0, None, None].expand(heads, p, n)], dim=2)
            bottom = torch.cat([self.prefix[:, 1, None, None].expand(heads, n, p), patches],
                               dim=2)
            patches = torch.cat([top, bottom], dim=1)
        return patches.unsqueeze(0)

    def extra_repr(self) -> str:
        return f"num_heads={self.weight.shape[0]}, num_knots={self.weight.shape[1]}, " \
               f"knot_spacing={self.knot_spacing}"
