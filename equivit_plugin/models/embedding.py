"""The pooled embedding of a timm ViT, the one definition of "a tile's features".

``pooled_embedding(net, x) = net.forward_head(net.forward_features(x), pre_logits=True)``:
the class token (or mean token, ``global_pool="avg"``) after the final norm, before the head.
:class:`PooledEncoder` wraps it as a module, optionally averaged over the 8 rotations/flips.
"""

from __future__ import annotations

import torch
from torch import nn

from ..equivariance.transforms import D4_TRANSFORMS

__all__ = ["PooledEncoder", "pooled_embedding"]


def pooled_embedding(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` normalised tiles -> ``(B, D)`` pooled embeddings of a timm model."""
    return net.forward_head(net.forward_features(x), pre_logits=True)


class PooledEncoder(nn.Module):
    """``(B, 3, H, W)`` normalised tiles -> ``(B, D)`` pooled embeddings.

    Args:
        net: a timm model (``forward_features``/``forward_head``).
        d4_average: average each tile's embedding over its 8 rotations/flips
            (:data:`~equivit_plugin.equivariance.D4_TRANSFORMS`): exactly invariant to them
            with any model, at 8x the cost.
        upcast: return float32 where autocast left bf16/fp16 (a float64 model stays float64).
            Under bf16/fp16 autocast a final linear layer (a student's projection) returns
            bf16/fp16; frameworks that store ``output.cpu().numpy()`` (TRIDENT, LazySlide)
            fail on bf16 (numpy has none) or store fp16.
    """

    def __init__(self, net: nn.Module, d4_average: bool = False, upcast: bool = False) -> None:
        super().__init__()
        self.net = net
        self.d4_average = d4_average
        self.upcast = upcast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.d4_average:
            embedded = pooled_embedding(self.net, x)
        else:
            # One (8B, ...) forward pass rather than 8 small ones keeps the device busy.
            stacked = torch.cat([transform(x) for _, transform in D4_TRANSFORMS])
            embedded = pooled_embedding(self.net, stacked)
            embedded = embedded.unflatten(0, (len(D4_TRANSFORMS), x.shape[0])).mean(0)
        if self.upcast and embedded.dtype in (torch.float16, torch.bfloat16):
            return embedded.float()
        return embedded
