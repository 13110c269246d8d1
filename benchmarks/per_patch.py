"""The published per-patch formulation of a stacked-conv patch embedding (slow reference).

Equi-ViT's code cuts the image into ``p x p`` patches and runs each patch through the valid
convolutions of the stack down to 1x1, then averages the (1x1) map. It computes the same
tokens as :class:`~equivit_plugin.layers.ConvStackProjection` at a much higher cost; it is
kept as the speed baseline of ``benchmarks/throughput.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from equivit_plugin.layers import ConvStackProjection

__all__ = ["PerPatchProjection"]


class PerPatchProjection(nn.Module):
    """Run a :class:`ConvStackProjection`'s layers patch by patch, as published.

    Shares the parameters of ``stack``: outputs are comparable token for token.

    Shapes:
        ``(B, C, H, W) -> (B, D, H // p, W // p)``.
    """

    def __init__(self, stack: ConvStackProjection) -> None:
        super().__init__()
        self.stack = stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.stack.patch_size
        b, c, h, w = x.shape
        gh, gw = h // p, w // p
        patches = x[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c, p, p)
        last = len(self.stack.convs) - 1
        for i, conv in enumerate(self.stack.convs):
            patches = conv(patches)  # valid: p x p -> ... -> 1 x 1
            if i < last and self.stack.act is not None:
                patches = self.stack.act(patches)
        tokens = patches.mean(dim=(-2, -1))
        return tokens.reshape(b, gh, gw, -1).permute(0, 3, 1, 2)
