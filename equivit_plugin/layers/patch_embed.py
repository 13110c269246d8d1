"""Patch embeddings built from a stack of convolutions (Equi-ViT's GMR stem, ConvViT's plain one).

The published Equi-ViT cuts the image into ``p x p`` patches and runs every patch through
valid convolutions of sizes ``k_1, ..., k_n`` with ``sum(k_i - 1) + 1 == p``, ending at 1x1.
Two equivalent, much faster formulations are used here:

* linear stack (no activation): convolutions compose, so the whole stack is ONE ``p x p``
  convolution with stride ``p`` whose kernel is the full convolution of the layer kernels.
  It costs what ``timm.layers.PatchEmbed`` costs; autograd flows through the composition.
* non-linear stack: the first layers run with stride 1 over the whole image and the last one
  with stride ``p``. The last layer only reads the intermediate positions that lie inside one
  patch, so every token depends on its own patch alone, exactly as in the per-patch form.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, to_2tuple
from torch import nn

from .gmr_conv import GMRConv2d
from .kernel_cache import DerivedTensorCache

__all__ = ["ConvStackProjection", "ProjectedPatchEmbed", "StackedConvPatchEmbed",
           "GMRPatchEmbed", "ConvPatchEmbed", "compose_factored", "compose_kernels",
           "d4_orbit_representative", "default_kernel_sizes"]


def default_kernel_sizes(patch_size: int) -> tuple[int, int]:
    """Two-layer stack for a patch size: ``(6, 11)`` for 16 as published, ``(3, 6)`` for 8."""
    first = (patch_size + 2) // 3
    return first, patch_size - first + 1


@functools.lru_cache(maxsize=32)
def _sum_index(first_size: tuple[int, ...], second_size: tuple[int, ...]) -> torch.Tensor:
    """Flat output tap ``a + b`` for every pair (tap ``b`` of second, tap ``a`` of first).

    Depends only on the sizes, so it is built once per pair of sizes (composition runs every
    training step). Built outside inference mode: a cached tensor first made under
    ``torch.inference_mode()`` would be an inference tensor, which training may not use.
    """
    out_size = [k1 + k2 - 1 for k1, k2 in zip(first_size, second_size)]
    with torch.inference_mode(False):
        grids = [torch.arange(k) for k in (*second_size, *first_size)]
        coords = torch.meshgrid(*grids, indexing="ij")
        n = len(first_size)
        index = torch.zeros_like(coords[0])
        for axis in range(n):
            index = index * out_size[axis] + coords[axis] + coords[n + axis]
        return index.flatten()


def compose_kernels(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Kernel of ``conv(conv(x, first), second)`` (valid, stride 1, cross-correlation).

    ``K(c) = sum_{a + b = c} first(a) second(b)``, summed over the middle channels. Eagerly,
    every pair of taps is one small matrix product (channels contracted first, which is the
    cheap order) and the pairs are summed into their output tap; when tracing (TorchScript,
    ONNX, which cannot export that scatter) the same sum is written as one convolution.

    Args:
        first: ``(C_mid, C_in, *k1)``.
        second: ``(C_out, C_mid, *k2)``.

    Returns:
        ``(C_out, C_in, *(k1 + k2 - 1))``.
    """
    k1, k2 = first.shape[2:], second.shape[2:]
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        conv_fn = (F.conv1d, F.conv2d, F.conv3d)[len(k1) - 1]
        weight = first.flip(list(range(2, first.dim()))).transpose(0, 1)
        return conv_fn(second, weight, padding=tuple(k - 1 for k in k1))
    out_size = [a + b - 1 for a, b in zip(k1, k2)]
    pairs = torch.einsum("omb,mia->oiba", second.flatten(2), first.flatten(2))
    # dynamo traces through the cache anyway (and warns about it): call the plain function
    sum_index = _sum_index.__wrapped__ if torch.compiler.is_compiling() else _sum_index
    index = sum_index(tuple(k1), tuple(k2)).to(first.device)
    kernel = pairs.new_zeros(*pairs.shape[:2], math.prod(out_size))
    kernel = kernel.index_add(2, index, pairs.flatten(2))
    return kernel.view(*pairs.shape[:2], *out_size)


def _dense_kernel(conv: nn.Module) -> torch.Tensor:
    return conv.kernel() if hasattr(conv, "kernel") else conv.weight


def compose_factored(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Compose a stack of factored kernels ``K_j = einsum(W_j, B_j)`` (GMR layers).

    Channels are contracted on the small coefficient tensors ``W_j`` (``(C_out, C_in, R_j)``)
    and the ring images ``B_j`` (``(R_j, *k_j)``) are composed pairwise, so the cost is that of
    ``R_1 * R_2`` tiny image convolutions plus one ``(C_out * C_in, R_1 R_2) x (R_1 R_2, p^2)``
    product instead of ``k_1^2 k_2^2`` channel products.

    Returns:
        ``(C_out, C_in, p, ..., p)``, equal to :func:`compose_kernels` of the dense kernels.
    """
    coeffs, basis = factors[0]
    for next_coeffs, next_basis in factors[1:]:
        coeffs = torch.einsum("omb,mia->oiba", next_coeffs, coeffs).flatten(2)
        basis = compose_kernels(basis.unsqueeze(0), next_basis.unsqueeze(1)).flatten(0, 1)
    return torch.einsum("oir,r...->oi...", coeffs, basis)


def d4_orbit_representative(size: int) -> torch.Tensor:
    """For each tap of a ``size x size`` grid, the smallest flat index in its D4 orbit.

    Gathering a kernel with it (``K.flatten(-2)[..., rep]``) makes taps related by a
    rotation/flip bitwise equal: a composed kernel of symmetric kernels is symmetric in exact
    arithmetic, and this removes the rounding that summation order adds.
    """
    index = torch.arange(size * size).view(size, size)
    images = [torch.rot90(index, r, (0, 1)) for r in range(4)]
    images += [image.transpose(0, 1) for image in images]
    return torch.stack(images).amin(0).flatten()


class ConvStackProjection(nn.Module):
    """``p x p`` patch projection made of stacked valid convolutions.

    Args:
        in_chans: input channels.
        embed_dim: output channels (token dimension ``D``).
        patch_size: ``p``; must equal ``sum(k_i - 1) + 1``.
        kernel_sizes: kernel size of each layer.
        mid_channels: channels between layers (one int, or one per gap).
        conv_layer: convolution class (``GMRConv2d``, ``nn.Conv2d``, ...), called as
            ``conv_layer(c_in, c_out, kernel_size=k, stride=s, bias=b)``.
        act_layer: activation between layers; ``None`` (published) makes the stack linear and
            lets it run as one composed convolution.
        bias: bias of the last layer (inner layers have none, as published).

    Shapes:
        ``(B, C, H, W) -> (B, D, H // p, W // p)``.
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        patch_size: int,
        kernel_sizes: Sequence[int] | None = None,
        mid_channels: int | Sequence[int] = 64,
        conv_layer: Callable[..., nn.Module] = GMRConv2d,
        act_layer: Callable[[], nn.Module] | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        kernel_sizes = tuple(kernel_sizes or default_kernel_sizes(patch_size))
        receptive = sum(k - 1 for k in kernel_sizes) + 1
        if receptive != patch_size or any(k < 1 for k in kernel_sizes):
            raise ValueError(
                f"kernel_sizes {kernel_sizes} cover {receptive} pixels "
                f"(sum(k - 1) + 1 = {receptive}), but patch_size is {patch_size}: each token must "
                f"see exactly one patch"
            )
        n_gaps = len(kernel_sizes) - 1
        mids = [mid_channels] * n_gaps if isinstance(mid_channels, int) else list(mid_channels)
        if len(mids) != n_gaps:
            raise ValueError(
                f"mid_channels {mid_channels} must be one int or {n_gaps} ints for "
                f"kernel_sizes {kernel_sizes}"
            )
        channels = [in_chans, *mids, embed_dim]
        last = len(kernel_sizes) - 1
        self.convs = nn.ModuleList(
            conv_layer(channels[i], channels[i + 1], kernel_size=k,
                       stride=patch_size if i == last else 1, bias=bias and i == last)
            for i, k in enumerate(kernel_sizes)
        )
        self.act = act_layer() if act_layer is not None else None
        self.in_channels = in_chans
        self.out_channels = embed_dim
        self.patch_size = patch_size
        self.kernel_sizes = kernel_sizes
        # Ring layers (anything exposing kernel_factors) compose cheaply and symmetrically.
        self._symmetric = all(hasattr(conv, "kernel_factors") for conv in self.convs)
        self.register_buffer("_orbit_rep", d4_orbit_representative(patch_size), persistent=False)
        self._kernel_cache = DerivedTensorCache()

    @property
    def composed(self) -> bool:
        """True when the stack is linear and runs as one ``p x p`` convolution."""
        return self.act is None

    @property
    def bias(self) -> torch.Tensor | None:
        return self.convs[-1].bias

    def _compose(self) -> torch.Tensor:
        if self._symmetric:
            kernel = compose_factored([conv.kernel_factors() for conv in self.convs])
            return kernel.flatten(2)[..., self._orbit_rep].view_as(kernel)
        kernel = _dense_kernel(self.convs[0])
        for conv in self.convs[1:]:
            kernel = compose_kernels(kernel, _dense_kernel(conv))
        return kernel

    def kernel(self) -> torch.Tensor:
        """Composed kernel ``(D, C, p, p)`` of a linear stack (cached in eval mode)."""
        if not self.composed:
            raise RuntimeError("a stack with an activation between layers has no single kernel")
        params = [p for conv in self.convs for p in conv.parameters() if p is not self.bias]
        return self._kernel_cache.get(self, params, self._compose)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"patch embedding expects a (B, {self.in_channels}, H, W) image batch, "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"patch embedding expects a floating-point image (normalise uint8 tiles first), "
                f"got dtype {x.dtype}"
            )
        if self.composed:
            return F.conv2d(x, self.kernel(), self.bias, stride=self.patch_size)
        for conv in self.convs[:-1]:
            x = self.act(conv(x))
        return self.convs[-1](x)

    def _apply(self, fn, recurse=True):
        self._kernel_cache.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"kernel_sizes={self.kernel_sizes}, composed={self.composed}"


class ProjectedPatchEmbed(PatchEmbed):
    """``timm.layers.PatchEmbed`` around any projection module, with input errors that name the
    offending value.

    Same constructor keywords and output semantics as ``PatchEmbed`` (so subclasses are drop-in
    ``embed_layer`` for ``timm.models.VisionTransformer``), plus ``proj``: a module mapping
    ``(B, C, H, W)`` to ``(B, D, H / p, W / p)``.

    Shapes:
        ``(B, C, H, W) -> (B, N, D)`` when flattening (default), else ``output_fmt``.
    """

    def __init__(
        self,
        proj: nn.Module,
        img_size: int | tuple[int, int] | None = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[..., nn.Module] | None = None,
        flatten: bool = True,
        output_fmt: str | None = None,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=1,
            norm_layer=None, flatten=flatten, output_fmt=output_fmt, bias=False,
            strict_img_size=strict_img_size, dynamic_img_pad=dynamic_img_pad,
        )
        self.proj = proj
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` float image batch to tokens; errors name the offending value."""
        if x.dim() != 4:
            raise ValueError(f"expected a (B, C, H, W) image batch, got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if self.img_size is not None and self.strict_img_size and (height, width) != self.img_size:
            raise ValueError(
                f"input size {height}x{width} does not match the model's img_size "
                f"{self.img_size[0]}x{self.img_size[1]} (strict_img_size=True)"
            )
        if not self.dynamic_img_pad and (height % self.patch_size[0] or width % self.patch_size[1]):
            raise ValueError(
                f"input size {height}x{width} is not divisible by patch_size {self.patch_size[0]}"
            )
        return super().forward(x)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise NotImplementedError(f"changing the patch size of a {type(self).__name__}")
        super().set_input_size(img_size=img_size)


class StackedConvPatchEmbed(ProjectedPatchEmbed):
    """Patch embedding whose projection is a :class:`ConvStackProjection`.

    Same constructor keywords as ``timm.layers.PatchEmbed``, plus the stack's
    ``kernel_sizes``, ``mid_channels``, ``conv_layer`` and ``act_layer``.

    Shapes:
        ``(B, C, H, W) -> (B, N, D)`` when flattening (default), else ``output_fmt``.
    """

    default_conv_layer: Callable[..., nn.Module] = nn.Conv2d

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
        kernel_sizes: Sequence[int] | None = None,
        mid_channels: int | Sequence[int] = 64,
        conv_layer: Callable[..., nn.Module] | None = None,
        act_layer: Callable[[], nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        patch = to_2tuple(patch_size)
        if patch[0] != patch[1]:
            raise ValueError(f"patch_size must be square for a ring stem, got {patch_size}")
        proj = ConvStackProjection(
            in_chans, embed_dim, patch[0], kernel_sizes=kernel_sizes, mid_channels=mid_channels,
            conv_layer=conv_layer or self.default_conv_layer, act_layer=act_layer, bias=bias,
        )
        super().__init__(
            proj, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
            embed_dim=embed_dim, norm_layer=norm_layer, flatten=flatten, output_fmt=output_fmt,
            strict_img_size=strict_img_size, dynamic_img_pad=dynamic_img_pad, device=device,
            dtype=dtype,
        )


class GMRPatchEmbed(StackedConvPatchEmbed):
    """Equi-ViT patch embedding: stacked GMR convolutions, ``kernel_sizes=(6, 11)`` and
    ``mid_channels=64`` for 16x16 patches, no activation (as published).

    Every token is exactly invariant to the 8 rotations/flips of its own patch (the composed
    kernel of D4-symmetric kernels is D4-symmetric).

    Example:
        >>> embed = GMRPatchEmbed(img_size=224, patch_size=16, embed_dim=384)
        >>> embed(torch.randn(2, 3, 224, 224)).shape
        torch.Size([2, 196, 384])
    """

    default_conv_layer = GMRConv2d


class ConvPatchEmbed(StackedConvPatchEmbed):
    """The same two-layer stem with plain ``nn.Conv2d`` (the paper's "Conv2D ViT" baseline)."""

    default_conv_layer = nn.Conv2d
