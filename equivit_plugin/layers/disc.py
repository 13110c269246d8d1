"""The inscribed disc: the patch tokens inside it, and normalisation over it alone.

Turning a square tile by an angle that is not a multiple of 90 degrees brings new tissue into
its corners and takes some out; only the inscribed disc shows the same tissue at every angle.
A model that attends and pools over the tokens inside that disc (156 of 196 on a 14 x 14 grid,
:func:`disc_token_indices`) and whose stem normalises with statistics of the disc only
(:class:`DiscGroupNorm`) is not moved by what the corners show. The disc is
centred on the grid centre, so a 90-degree rotation or a flip of a square grid maps it onto
itself: exact invariance to those is kept.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

from .pos_embed import radial_distances

__all__ = ["DiscGroupNorm", "disc_token_indices", "disc_token_mask"]

_TOLERANCE = 1e-9  # cells exactly on the circle (e.g. (0, 7) of a 15 x 15 grid) are inside


def disc_token_mask(grid_size: tuple[int, int], radius: float) -> torch.Tensor:
    """Which cells of a grid have their centre within the disc.

    Args:
        grid_size: ``(H, W)`` patch grid.
        radius: disc radius as a fraction of half the grid's shorter side, measured from the
            grid centre to the cell centres (``1.0``: the inscribed disc; ``sqrt(2)`` keeps
            every cell of a square grid).

    Returns:
        ``(H * W,)`` bool, row-major (token) order.
    """
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius!r}")
    distances = radial_distances(tuple(grid_size), dtype=torch.float64)
    return distances <= radius * min(grid_size) / 2 + _TOLERANCE


@lru_cache(maxsize=32)
def _indices(grid_size: tuple[int, int], radius: float, num_prefix_tokens: int) -> torch.Tensor:
    # Cached across calls: built outside inference mode, or a first call under
    # torch.inference_mode() would leave an inference tensor that training may not use.
    with torch.inference_mode(False):
        kept = disc_token_mask(grid_size, radius).nonzero().flatten() + num_prefix_tokens
        return torch.cat([torch.arange(num_prefix_tokens), kept])


def disc_token_indices(grid_size: tuple[int, int], radius: float, num_prefix_tokens: int = 0,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """Positions, in a ``(P + H * W)``-token sequence, of the prefix tokens and of the patch
    tokens inside the disc (:func:`disc_token_mask`), in order.

    Returns:
        ``(P + M,)`` int64, ``M`` the number of cells inside the disc.
    """
    key = (tuple(int(s) for s in grid_size), float(radius), int(num_prefix_tokens))
    if torch.jit.is_tracing():
        # A trace records every op it runs: built afresh, so that every traced call has the
        # same graph (torch.jit.trace's check reruns the model and a cache hit would differ).
        return _indices.__wrapped__(*key).to(device)
    return _indices(*key).to(device)


class DiscGroupNorm(nn.GroupNorm):
    """``GroupNorm`` whose mean and variance are taken over the positions inside the feature
    map's inscribed disc only (:func:`disc_token_mask` of its ``(H, W)``); every position is
    then normalised with them. With ``radius >= sqrt(2)`` it is ``nn.GroupNorm``.

    Args:
        num_channels: ``C``; ``gcd(8, C)`` groups, as :func:`~.conv_stem.stem_group_norm`.
        radius: disc radius as a fraction of half the map's shorter side.

    Shapes:
        ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, num_channels: int, radius: float = 1.0, eps: float = 1e-5) -> None:
        super().__init__(math.gcd(8, num_channels), num_channels, eps=eps)
        disc_token_mask((1, 1), radius)  # checks the radius once, here
        self.radius = float(radius)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        inside = disc_token_indices((h, w), self.radius, device=x.device)
        grouped = x.reshape(b, self.num_groups, -1, h * w)[..., inside]
        var, mean = torch.var_mean(grouped, dim=(2, 3), unbiased=False)
        # Normalisation and affine as one per-(sample, channel) scale and shift: a single
        # pass over the full-resolution stem map.
        per_group = c // self.num_groups
        scale = torch.rsqrt(var + self.eps).repeat_interleave(per_group, 1) * self.weight
        shift = self.bias - mean.repeat_interleave(per_group, 1) * scale
        return torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, radius={self.radius}"
