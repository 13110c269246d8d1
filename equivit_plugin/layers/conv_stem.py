"""An exactly D4-equivariant convolutional stem: the "early convolutions" patch embedding.

A single stride-``p`` projection makes every token a linear function of its own ``p x p``
patch, so moving the tissue by half a patch, or rotating it by an angle off the 90-degree grid,
changes what every token sees at once. A stem of a few strided convolutions with norm and
activation in between (Xiao et al. 2021, "Early convolutions help transformers see better")
gives tokens overlapping receptive fields and averages non-linear responses before each
downsampling, which makes them vary smoothly as the grid slides over the tissue.

Built from GMR convolutions it stays exactly equivariant to the 8 rotations/flips:

* every kernel is D4-symmetric;
* every stage has an even ``k - s`` and pads ``(k - s) / 2`` on both sides, so a stride-``s``
  stage maps an input of side ``H`` (a multiple of ``s``) to ``H / s`` outputs whose windows,
  centred at ``s j + (s - 1) / 2``, are carried onto each other by a flip of the input;
* ``GroupNorm`` and the activation act per sample on all positions alike (with statistics of
  the whole map, or of its inscribed disc: :class:`~.disc.DiscGroupNorm`, also D4-symmetric);
* the optional anti-aliasing blur before each strided stage (:class:`~.blur.GaussianBlur2d`)
  is a stride-1, odd, centred Gaussian: radially symmetric, size-preserving.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from timm.layers import to_2tuple
from torch import nn

from .blur import GaussianBlur2d
from .disc import DiscGroupNorm
from .gmr_conv import GMRConv2d
from .patch_embed import ProjectedPatchEmbed

__all__ = ["ConvStem", "GMRConvStemEmbed", "default_stem_stages", "stem_group_norm"]

Stage = tuple[int, int]
"""``(kernel_size, stride)`` of one stage."""


def default_stem_stages(patch_size: int) -> tuple[Stage, ...]:
    """Stages for a patch size ``p = 2^m``: ``m`` stages ``(4, 2)`` (4 x 4 kernels, stride 2).

    Four for 16: tokens see 46 x 46 pixels, 16 apart, and the first stage already samples
    the image at stride 2 only. On rotated slide regions this kept feature neighbourhoods
    clearly better than a stride-4 first stage ``((6, 4), (4, 2), (4, 2))`` at about the same
    cost (``benchmarks/rotation_robustness.py``).
    """
    halvings = math.log2(patch_size) if patch_size >= 2 else -1.0
    if halvings < 1 or not halvings.is_integer():
        raise ValueError(f"the default stem needs patch_size = 2^m (2, 4, 8, 16, 32...), got "
                         f"{patch_size}; pass stages= explicitly")
    return ((4, 2),) * int(halvings)


def stem_group_norm(num_channels: int) -> nn.GroupNorm:
    """``GroupNorm`` with up to 8 groups (per-sample statistics: batch-size independent)."""
    return nn.GroupNorm(math.gcd(8, num_channels), num_channels)


class ConvStem(nn.Module):
    """Strided convolution stages: ``conv -> norm -> act`` each, the last one ``conv`` only;
    with ``blur_sigma``, ``blur -> conv -> norm -> act`` for every stage whose stride is above 1.

    Args:
        in_chans: input channels ``C``.
        embed_dim: output channels ``D``.
        stages: ``(kernel_size, stride)`` per stage; ``kernel_size - stride`` must be even.
        widths: output channels of every stage but the last (default ``D / 2^(n - 1 - i)``).
        conv_layer: called as ``conv_layer(c_in, c_out, kernel_size=k, stride=s, padding=q)``.
        norm_layer: called with the channel count (default :func:`stem_group_norm`).
        act_layer: activation class.
        blur_sigma: anti-aliasing: a Gaussian blur of this standard deviation (pixels of the
            stage's input, :class:`~.blur.GaussianBlur2d`) before every strided stage, so that
            subsampling does not fold detail finer than the new grid into the tokens (``None``:
            no blur).

    Shapes:
        ``(B, C, H, W) -> (B, D, H / p, W / p)`` with ``p`` the product of the strides
        (``H``, ``W`` multiples of ``p``).
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        stages: Sequence[Stage] = ((4, 2), (4, 2), (4, 2), (4, 2)),
        widths: Sequence[int] | None = None,
        conv_layer: Callable[..., nn.Module] = GMRConv2d,
        norm_layer: Callable[[int], nn.Module] = stem_group_norm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        blur_sigma: float | None = None,
    ) -> None:
        super().__init__()
        stages = tuple((int(k), int(s)) for k, s in stages)
        if not stages or any(k < s or s < 1 or (k - s) % 2 for k, s in stages):
            raise ValueError(f"stages must be (kernel_size, stride) pairs with kernel_size >= "
                             f"stride and an even kernel_size - stride, got {stages}")
        n = len(stages)
        widths = list(widths) if widths is not None else [
            max(embed_dim >> (n - 1 - i), 1) for i in range(n - 1)]
        if len(widths) != n - 1:
            raise ValueError(f"widths {widths} must give {n - 1} channel counts for {n} stages")
        channels = [in_chans, *widths, embed_dim]
        self.convs = nn.ModuleList(
            conv_layer(channels[i], channels[i + 1], kernel_size=k, stride=s,
                       padding=(k - s) // 2)
            for i, (k, s) in enumerate(stages)
        )
        self.norms = nn.ModuleList(norm_layer(c) for c in widths)
        self.act = act_layer()
        # One blur module serves every stage: it has no parameters, only its sigma.
        self.blur = GaussianBlur2d(blur_sigma) if blur_sigma is not None else None
        self.blurred = tuple(self.blur is not None and s > 1 for _, s in stages)
        self.stages = stages
        self.stride = math.prod(s for _, s in stages)

    def _conv(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.blurred[index]:
            x = self.blur(x)
        return self.convs[index](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, norm in enumerate(self.norms):
            x = self.act(norm(self._conv(index, x)))
        return self._conv(len(self.convs) - 1, x)

    def extra_repr(self) -> str:
        return f"stages={self.stages}"


class GMRConvStemEmbed(ProjectedPatchEmbed):
    """Patch embedding by an exactly D4-equivariant GMR :class:`ConvStem`.

    A drop-in ``embed_layer`` for ``timm.models.VisionTransformer``: ``PatchEmbed``'s keywords
    plus the stem's ``stages``, ``widths``, ``conv_layer``, ``norm_layer`` (``stem_norm_layer``),
    ``act_layer`` and ``blur_sigma`` (anti-aliasing before each strided stage), and
    ``norm_disc_radius``: take the stem's normalisation statistics over
    the inscribed disc of each feature map (:class:`~.disc.DiscGroupNorm`, this radius), so
    that what lies outside the disc reaches no token inside it through the norms (a number,
    unlike ``stem_norm_layer``, so a checkpoint stays self-describing).

    Shapes:
        ``(B, C, H, W) -> (B, N, D)`` when flattening (default), else ``output_fmt``.

    Example:
        >>> embed = GMRConvStemEmbed(img_size=224, patch_size=16, embed_dim=192)
        >>> embed(torch.randn(2, 3, 224, 224)).shape
        torch.Size([2, 196, 192])
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] | None = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[..., nn.Module] | None = None,
        flatten: bool = True,
        output_fmt: str | None = None,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        stages: Sequence[Stage] | None = None,
        widths: Sequence[int] | None = None,
        conv_layer: Callable[..., nn.Module] = GMRConv2d,
        stem_norm_layer: Callable[[int], nn.Module] = stem_group_norm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_disc_radius: float | None = None,
        blur_sigma: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        patch = to_2tuple(patch_size)
        if patch[0] != patch[1]:
            raise ValueError(f"patch_size must be square for an equivariant stem, got {patch_size}")
        stages = tuple(stages) if stages is not None else default_stem_stages(patch[0])
        if norm_disc_radius is not None:
            if stem_norm_layer is not stem_group_norm:
                raise ValueError("give stem_norm_layer or norm_disc_radius, not both")
            stem_norm_layer = partial(DiscGroupNorm, radius=norm_disc_radius)
        proj = ConvStem(in_chans, embed_dim, stages, widths=widths, conv_layer=conv_layer,
                        norm_layer=stem_norm_layer, act_layer=act_layer, blur_sigma=blur_sigma)
        if proj.stride != patch[0]:
            raise ValueError(f"the stem's strides {[s for _, s in proj.stages]} multiply to "
                             f"{proj.stride}, but patch_size is {patch[0]}")
        del bias  # every stage has its bias (PatchEmbed's keyword, kept for drop-in use)
        super().__init__(
            proj, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
            embed_dim=embed_dim, norm_layer=norm_layer, flatten=flatten, output_fmt=output_fmt,
            strict_img_size=strict_img_size, dynamic_img_pad=dynamic_img_pad, device=device,
            dtype=dtype,
        )
