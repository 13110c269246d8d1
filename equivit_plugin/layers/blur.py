"""A fixed Gaussian low-pass: anti-aliasing before a strided convolution, exactly D4-symmetric.

Subsampling a feature map whose content is finer than the new grid folds that content onto
coarser frequencies (aliasing), so a shift of the input by a fraction of the stride changes
the output by more than a fraction of a step. "Making Convolutional Networks Shift-Invariant
Again" (Zhang 2019) low-passes every feature map just before it is subsampled. Its
``BlurPool`` (timm's ``BlurPool2d``) blurs *with* the stride, which on an even grid puts the
output samples off the centre of the input's symmetry, so a flip of the input is not a flip of
the output. Here the blur runs at stride 1 with an odd, centred kernel and the strided GMR
convolution that follows does the subsampling: each stride-``s`` stage keeps the even
``k - s`` that makes it exactly equivariant (:mod:`.conv_stem`).

The kernel is a sampled Gaussian, ``exp(-(x^2 + y^2) / (2 sigma^2))``: a function of the
distance from the centre only (like a GMR ring kernel) and separable, so it runs as two 1-D
depthwise passes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GaussianBlur2d", "gaussian_taps"]


def gaussian_taps(sigma: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The normalised 1-D taps of a Gaussian of standard deviation ``sigma`` pixels, cut at
    ``2 sigma`` (rounded up), so ``2 ceil(2 sigma) + 1`` taps, symmetric about the centre.

    Raises:
        ValueError: ``sigma`` is not a positive number.
    """
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not sigma > 0 \
            or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a positive number of pixels, got {sigma!r}")
    radius = math.ceil(2 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-x.square() / (2 * sigma * sigma))
    return (taps / taps.sum()).to(dtype)


class GaussianBlur2d(nn.Module):
    """Depthwise Gaussian blur at stride 1, zero padding that keeps the size.

    Args:
        sigma: standard deviation in pixels of the map it blurs (``0.7`` is close to the
            ``[1, 2, 1] / 4`` binomial filter of Zhang 2019).

    Shapes:
        ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        taps = gaussian_taps(sigma)  # float64; cast to the input's dtype when used
        self.sigma = float(sigma)
        # Derived from sigma (an argument): not stored in checkpoints.
        self.register_buffer("taps", taps, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        taps = self.taps.to(x.dtype)
        pad = (taps.numel() - 1) // 2
        x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(pad, 0), groups=c)
        return F.conv2d(x, taps.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, pad),
                        groups=c)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, taps={self.taps.numel()}"
