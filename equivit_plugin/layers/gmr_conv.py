"""Gaussian Mixture Ring convolutions (GMR-Conv, arXiv 2504.02819) in N dimensions.

A GMR kernel is a weighted sum of concentric Gaussian rings::

    K[o, i, p] = mask(p) * sum_r W[o, i, r] * exp(-(d(p) - mu_r)^2 / (2 sigma_r^2))

where ``d(p)`` is the distance of kernel tap ``p`` from the kernel centre. The centre is
``(k - 1) / 2`` along every axis, for odd *and* even ``k`` (the published code puts it at
``k // 2``, half a pixel off for even kernels, which breaks exact equivariance). Because
``d`` is computed from exactly representable half-integers, ``K`` is exactly invariant under
the symmetries of the square (2-D) or cube (3-D), so the convolution is exactly equivariant
to 90-degree rotations and flips.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_cache import DerivedTensorCache

__all__ = ["GMRConvNd", "GMRConv1d", "GMRConv2d", "GMRConv3d", "ring_basis", "ring_distances"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_SIGMA_MIN = 1e-2
# Full width at half maximum of a Gaussian is 2.355 sigma: rings start as wide as their spacing.
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _ntuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value}")
    return value


def ring_distances(kernel_size: Sequence[int], dtype: torch.dtype = torch.float64,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Distance of every kernel tap from the true centre ``(k - 1) / 2``.

    Returns:
        Tensor of shape ``kernel_size``.
    """
    axes = [torch.arange(k, dtype=dtype, device=device) - (k - 1) / 2 for k in kernel_size]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.sqrt(sum(g * g for g in grids))


def ring_basis(distances: torch.Tensor, radii: torch.Tensor, sigmas: torch.Tensor,
               support_radius: float | None = None) -> torch.Tensor:
    """Gaussian ring profiles ``exp(-(d - mu_r)^2 / (2 sigma_r^2))`` at given distances.

    Args:
        distances: tap distances from the kernel centre, any shape ``S``.
        radii: ring radii ``mu_r``, shape ``(R,)``.
        sigmas: ring widths ``sigma_r``, shape ``(R,)``.
        support_radius: taps farther than this are zero (a disc-shaped support, as the
            published ``force_circular``); ``None`` keeps the full square.

    Returns:
        Tensor of shape ``(R, *S)``.
    """
    shape = (-1,) + (1,) * distances.dim()
    d = distances.to(sigmas.dtype)
    basis = torch.exp(-0.5 * ((d - radii.view(shape)) / sigmas.view(shape)) ** 2)
    if support_radius is not None:
        basis = basis * (d <= support_radius).to(basis.dtype)
    return basis


class GMRConvNd(nn.Module):
    """N-dimensional GMR convolution with the arguments of ``nn.ConvNd``.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out``.
        kernel_size: kernel size; must be the same along every axis (rings are isotropic).
        stride, padding, dilation, groups, bias, padding_mode: as in ``nn.ConvNd``;
            ``padding`` also accepts ``"same"`` and ``"valid"``.
        num_rings: number of Gaussian rings ``R``; default ``k // 2 + 1``.
        learn_sigma: learn the per-ring widths (log-parameterised, clamped to
            ``[0.01, 2R]``); otherwise they are a fixed buffer.
        disc_support: zero the taps outside the inscribed disc (the published
            ``force_circular``; see :func:`ring_basis`). Not to be confused with
            ``padding_mode="circular"``.

    Shapes:
        input ``(B, C_in, *spatial)``, output ``(B, C_out, *spatial_out)`` as ``nn.ConvNd``.
        ``weight``: ``(C_out, C_in / groups, R)``; :meth:`kernel` gives the dense
        ``(C_out, C_in / groups, k, ..., k)`` kernel.
    """

    spatial_dims: int = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        num_rings: int | None = None,
        learn_sigma: bool = True,
        disc_support: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n = self.spatial_dims
        factory = {"device": device, "dtype": dtype}
        self.kernel_size = _ntuple(kernel_size, n, "kernel_size")
        if len(set(self.kernel_size)) != 1 or self.kernel_size[0] < 1:
            raise ValueError(
                f"kernel_size must be one positive size for every axis (rings are isotropic), "
                f"got {self.kernel_size}"
            )
        self.stride = _ntuple(stride, n, "stride")
        self.dilation = _ntuple(dilation, n, "dilation")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid' or ints, got {padding!r}")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError(f"padding='same' needs stride 1, got stride={self.stride}")
            self.padding: str | tuple[int, ...] = padding
        else:
            self.padding = _ntuple(padding, n, "padding")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                f"divisible by groups ({groups})"
            )
        k = self.kernel_size[0]
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.padding_mode = padding_mode
        self.disc_support = disc_support
        self.num_rings = k // 2 + 1 if num_rings is None else int(num_rings)
        if self.num_rings < 1:
            raise ValueError(f"num_rings must be >= 1, got {num_rings}")

        max_radius = (k - 1) / 2
        # Taps at equal distance share one value, gathered from the unique distances: this
        # makes the kernel bitwise symmetric (a matmul per tap could round symmetric taps apart).
        unique, tap_index = torch.unique(ring_distances(self.kernel_size), return_inverse=True)
        self.register_buffer("unique_distances", unique.to(dtype or torch.get_default_dtype()),
                             persistent=False)
        self.register_buffer("tap_index", tap_index.flatten(), persistent=False)
        self.register_buffer(
            "radii", torch.linspace(0.0, max_radius, self.num_rings, **factory), persistent=False
        )
        spacing = max_radius / (self.num_rings - 1) if self.num_rings > 1 else max(max_radius, 0.5)
        log_sigma = torch.full((self.num_rings,), math.log(spacing / _FWHM_PER_SIGMA), **factory)
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, self.num_rings, **factory)
        )
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self._kernel_cache = DerivedTensorCache()
        self.reset_parameters()

    @property
    def sigma(self) -> torch.Tensor:
        """Ring widths, shape ``(R,)``, clamped to ``[0.01, 2R]``."""
        return self.log_sigma.exp().clamp(_SIGMA_MIN, 2.0 * self.num_rings)

    def reset_parameters(self) -> None:
        """Initialise so the dense kernel has ``nn.ConvNd``'s fan-in scale.

        ``nn.ConvNd`` draws taps from ``U(-b, b)``, ``b = 1 / sqrt(fan_in)``. A tap of the GMR
        kernel is ``sum_r W_r B_r(p)``; drawing ``W_r`` from ``U(-b', b')`` with
        ``b' = b / sqrt(mean_p sum_r B_r(p)^2)`` gives the taps the same mean variance.
        """
        fan_in = self.weight.shape[1] * math.prod(self.kernel_size)
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            basis = self._basis().double()[:, self.tap_index]
            energy = basis.pow(2).sum(0).mean().item()
            nn.init.uniform_(self.weight, -bound / math.sqrt(energy), bound / math.sqrt(energy))
            if self.bias is not None:
                nn.init.uniform_(self.bias, -bound, bound)
        self._kernel_cache.clear()

    def _basis(self) -> torch.Tensor:
        """Ring profiles at the unique tap distances, ``(R, U)``."""
        support = (self.kernel_size[0] - 1) / 2 + 0.5 if self.disc_support else None
        return ring_basis(self.unique_distances, self.radii.to(self.log_sigma.dtype),
                          self.sigma, support)

    def kernel_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel as coefficients times ring images: ``kernel = einsum(W, B)``.

        Returns:
            ``W``: ``(C_out, C_in / groups, R)`` and ``B``: ``(R, k, ..., k)``. Stacks of GMR
            layers compose through these small factors instead of the dense kernels.
        """
        basis = self._basis().to(self.weight.dtype)[:, self.tap_index]
        return self.weight, basis.view(self.num_rings, *self.kernel_size)

    def _build_kernel(self) -> torch.Tensor:
        profile = self.weight @ self._basis().to(self.weight.dtype)  # (C_out, C_in/g, U)
        kernel = profile[..., self.tap_index]
        return kernel.view(*self.weight.shape[:2], *self.kernel_size)

    def kernel(self) -> torch.Tensor:
        """Dense kernel, shape ``(C_out, C_in / groups, k, ..., k)``.

        Cached in eval mode and rebuilt only when a parameter changed (see
        :class:`~equivit_plugin.layers.kernel_cache.DerivedTensorCache`).
        """
        return self._kernel_cache.get(self, (self.weight, self.log_sigma), self._build_kernel)

    def _check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if x.dim() not in (self.spatial_dims + 1, self.spatial_dims + 2):
            raise ValueError(
                f"{name} expects a ({self.spatial_dims + 2})-D input (B, C, *spatial), "
                f"got shape {tuple(x.shape)}"
            )
        channels = x.shape[-self.spatial_dims - 1]
        if channels != self.in_channels:
            raise ValueError(
                f"{name} expects {self.in_channels} input channels, got {channels} "
                f"(input shape {tuple(x.shape)})"
            )
        if not x.is_floating_point():
            raise TypeError(f"{name} expects a floating-point input, got dtype {x.dtype}")

    def conv(self, x: torch.Tensor, kernel: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
        """Run the convolution of this layer's geometry with a given dense kernel."""
        conv_fn = (F.conv1d, F.conv2d, F.conv3d)[self.spatial_dims - 1]
        if self.padding_mode != "zeros" and self.padding != "valid":
            pad = _pad_amounts(self.padding, self.kernel_size, self.dilation)
            x = F.pad(x, pad, mode=self.padding_mode)
            padding: str | tuple[int, ...] = 0
        else:
            padding = self.padding
        return conv_fn(x, kernel, bias, self.stride, padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *spatial) -> (B, C_out, *spatial_out)``."""
        self._check_input(x)
        return self.conv(x, self.kernel(), self.bias)

    def _apply(self, fn, recurse=True):
        self._kernel_cache.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, num_rings={self.num_rings}")
        if self.padding not in ("valid",) and self.padding != (0,) * self.spatial_dims:
            s += f", padding={self.padding}"
        if self.dilation != (1,) * self.spatial_dims:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s


def _pad_amounts(padding: str | tuple[int, ...], kernel_size: tuple[int, ...],
                 dilation: tuple[int, ...]) -> list[int]:
    """``F.pad`` amounts (last axis first) for a padding spec; 'same' pads the extra tap at the
    end, as ``nn.ConvNd`` does."""
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        pairs = [(t // 2, t - t // 2) for t in total]
    else:
        pairs = [(p, p) for p in padding]  # type: ignore[union-attr]
    return [amount for pair in reversed(pairs) for amount in pair]


class GMRConv1d(GMRConvNd):
    """1-D GMR convolution (a symmetric kernel: equivariant to reversal)."""

    spatial_dims = 1


class GMRConv2d(GMRConvNd):
    """2-D GMR convolution, exactly equivariant to the 8 rotations/flips of the square.

    Example:
        >>> conv = GMRConv2d(3, 16, kernel_size=5, padding="same")
        >>> conv(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 16, 32, 32])
    """

    spatial_dims = 2


class GMRConv3d(GMRConvNd):
    """3-D GMR convolution, exactly equivariant to the 48 rotations/reflections of the cube."""

    spatial_dims = 3
