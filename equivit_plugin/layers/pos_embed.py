"""Radial position embedding: a learned function of a patch's distance from the grid centre."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["RadialPosEmbed", "radial_distances"]


def radial_distances(grid_size: tuple[int, int], device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Distance of every grid cell from the grid centre ``((H - 1) / 2, (W - 1) / 2)``.

    Returns:
        ``(H * W,)`` in row-major (token) order.
    """
    h, w = grid_size
    rows = torch.arange(h, device=device, dtype=dtype) - (h - 1) / 2
    cols = torch.arange(w, device=device, dtype=dtype) - (w - 1) / 2
    return torch.sqrt(rows[:, None] ** 2 + cols[None, :] ** 2).flatten()


class RadialPosEmbed(nn.Module):
    """Position embedding that depends only on the distance from the grid centre.

    A table of ``D``-dim vectors at radii ``0, s, 2s, ...`` (``s = knot_spacing`` in patches)
    is linearly interpolated at each patch's distance; distances beyond the last knot take the
    last vector, so any grid size works. Rotating the image by 90/180/270 degrees or flipping it
    permutes the patches without changing their distances, hence their embeddings: with it a
    ViT whose tokens are patch-invariant (GMR stem) is invariant to those transformations.

    Args:
        embed_dim: token dimension ``D``.
        grid_size: the grid the table is sized for (larger grids clamp to the last knot).
        knot_spacing: distance between knots, in patches.

    Shapes:
        ``forward(grid_size) -> (1, H * W, D)``.
    """

    def __init__(self, embed_dim: int, grid_size: tuple[int, int] = (14, 14),
                 knot_spacing: float = 0.5) -> None:
        super().__init__()
        max_radius = math.hypot((grid_size[0] - 1) / 2, (grid_size[1] - 1) / 2)
        num_knots = math.ceil(max_radius / knot_spacing) + 2
        self.knot_spacing = knot_spacing
        self.weight = nn.Parameter(torch.zeros(num_knots, embed_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, grid_size: tuple[int, int]) -> torch.Tensor:
        position = radial_distances(grid_size, self.weight.device) / self.knot_spacing
        position = position.clamp(max=self.weight.shape[0] - 1)
        lower = position.floor().long().clamp(max=self.weight.shape[0] - 2)
        frac = (position - lower).to(self.weight.dtype).unsqueeze(-1)
        embed = self.weight[lower] * (1 - frac) + self.weight[lower + 1] * frac
        return embed.unsqueeze(0)

    def extra_repr(self) -> str:
        return f"num_knots={self.weight.shape[0]}, embed_dim={self.weight.shape[1]}, " \
               f"knot_spacing={self.knot_spacing}"
