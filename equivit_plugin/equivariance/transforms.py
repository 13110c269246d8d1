"""Image rotations: the 8 exact symmetries of the square (D4) and the arbitrary-angle protocol.

Direction convention (used everywhere in this subpackage): a positive angle rotates the image
**counter-clockwise as displayed** (row 0 at the top), exactly like
``torch.rot90(x, k, dims=(-2, -1))``. ``rotate(x, 90)`` is bitwise ``torch.rot90(x, 1, (-2, -1))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["D4_NAMES", "D4_TRANSFORMS", "batched_region_views", "d4_transform", "region_views",
           "rotate"]

Transform = Callable[[torch.Tensor], torch.Tensor]


def _rot(k: int) -> Transform:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.rot90(x, k, dims=(-2, -1)) if k % 4 else x
    return fn


def _flip_rot(k: int) -> Transform:
    # Flip first (mirror left-right), then rotate: "flip_rot90" = rot90(flip(x)).
    def fn(x: torch.Tensor) -> torch.Tensor:
        flipped = torch.flip(x, dims=(-1,))
        return torch.rot90(flipped, k, dims=(-2, -1)) if k % 4 else flipped
    return fn


D4_TRANSFORMS: list[tuple[str, Transform]] = [
    *((f"rot{90 * k}", _rot(k)) for k in range(4)),
    ("flip", _flip_rot(0)),
    *((f"flip_rot{90 * k}", _flip_rot(k)) for k in range(1, 4)),
]
"""The dihedral group D4 acting on the last two dims of a ``(..., H, W)`` tensor, as
``(name, fn)`` pairs: ``rot0`` (identity), ``rot90``, ``rot180``, ``rot270`` (counter-clockwise),
``flip`` (mirror left-right, i.e. reverse the last dim), and ``flip_rotK = rotK(flip(x))``.
Every transform is an exact permutation of pixels (no interpolation)."""

D4_NAMES: list[str] = [name for name, _ in D4_TRANSFORMS]


def d4_transform(name: str) -> Transform:
    """The D4 transform called ``name`` (one of :data:`D4_NAMES`)."""
    for candidate, fn in D4_TRANSFORMS:
        if candidate == name:
            return fn
    raise ValueError(f"unknown D4 transform {name!r}; expected one of {D4_NAMES}")


def _pad(x: torch.Tensor, pad_h: int, pad_w: int, mode: str) -> torch.Tensor:
    """Pad the last two dims of a 4-D tensor symmetrically by ``pad_h`` rows, ``pad_w`` cols."""
    if mode == "zeros":
        mode = "constant"
    if mode != "reflect":
        return F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode=mode)
    # F.pad's reflect needs pad < size; reflecting repeatedly covers larger pads.
    while pad_h > 0 or pad_w > 0:
        height, width = x.shape[-2:]
        step_h, step_w = min(pad_h, height - 1), min(pad_w, width - 1)
        if (pad_h and step_h == 0) or (pad_w and step_w == 0):
            # A single row/column cannot be reflected: repeat it instead.
            return F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="replicate")
        x = F.pad(x, (step_w, step_w, step_h, step_h), mode="reflect")
        pad_h, pad_w = pad_h - step_h, pad_w - step_w
    return x


def rotate(images: torch.Tensor, angle_deg: float, padding_mode: str = "reflect") -> torch.Tensor:
    """Rotate images counter-clockwise by ``angle_deg`` about their true centre.

    Multiples of 90 degrees (any sign, any number of turns) use ``torch.rot90`` and are exact:
    ``rotate(x, 90)`` is bitwise ``torch.rot90(x, 1, dims=(-2, -1))`` (for non-square images
    90/270 therefore swap ``H`` and ``W``, as ``rot90`` does). Other angles follow the published
    evaluation protocol: pad the image (``padding_mode``: ``"reflect"``, ``"replicate"``,
    ``"circular"`` or ``"zeros"``) by enough that the rotated corners stay inside, rotate about
    the centre ``((H - 1) / 2, (W - 1) / 2)`` with bilinear interpolation, and centre-crop back
    to ``H x W``.

    Args:
        images: ``(..., H, W)``; floating point unless the angle is a multiple of 90.
        angle_deg: rotation angle in degrees, counter-clockwise as displayed.
        padding_mode: how the border is extended before rotating.

    Returns:
        ``(..., H, W)`` tensor of the same dtype and device.
    """
    if images.dim() < 2:
        raise ValueError(f"expected a (..., H, W) tensor, got shape {tuple(images.shape)}")
    angle = float(angle_deg)
    if not math.isfinite(angle):
        raise ValueError(f"angle_deg must be finite, got {angle_deg}")
    turns, remainder = divmod(angle, 90.0)
    if remainder == 0.0:
        return _rot(int(turns) % 4)(images)
    if not images.is_floating_point():
        raise TypeError(f"rotating by {angle} degrees interpolates: images must be floating point, "
                        f"got dtype {images.dtype}")

    *lead, height, width = images.shape
    # One single-channel plane per batch entry: grid_sample on CPU parallelises over the batch
    # dim, not over channels (about 10x faster than one (1, B*C, H, W) image).
    x = images.reshape(-1, 1, height, width)
    radians = math.radians(angle)
    cos, sin = math.cos(radians), math.sin(radians)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    # Output pixels at most (cx, cy) from the centre read source points up to these
    # offsets; one extra pixel keeps the bilinear neighbours inside the padded image too.
    pad_w = max(0, math.ceil(abs(cos) * cx + abs(sin) * cy - cx)) + 1
    pad_h = max(0, math.ceil(abs(sin) * cx + abs(cos) * cy - cy)) + 1
    padded = _pad(x, pad_h, pad_w, padding_mode)
    padded_h, padded_w = padded.shape[-2:]

    # Sampling only the central H x W window of the rotated padded image is the same as
    # rotating all of it and centre-cropping, without computing pixels that are thrown away.
    # Each output offset (u, v) from the centre (u right, v down) reads the source offset it
    # came from, (cos u - sin v, sin u + cos v); at 90 degrees that is (-v, u), which is what
    # rot90 reads, so both paths turn the same way. In affine_grid's normalised coordinates
    # (align_corners=False: u pixels from the centre is 2 u / size) the output and the padded
    # input have different sizes, hence the W / Wp and H / Hp factors.
    theta = torch.tensor(
        [[cos * width / padded_w, -sin * height / padded_w, 0.0],
         [sin * width / padded_h, cos * height / padded_h, 0.0]],
        dtype=images.dtype, device=images.device,
    )
    grid = F.affine_grid(theta.unsqueeze(0), [1, 1, height, width], align_corners=False)
    grid = grid.expand(x.shape[0], -1, -1, -1)
    out = F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(*lead, height, width)


def region_views(regions: torch.Tensor, angle: float, tile_size: int,
                 shift: int | tuple[int, int] = 0) -> torch.Tensor:
    """Rotate regions about their centre and crop ``T x T`` from the middle.

    The view of the rotation report (Elphick et al.: ``2T`` regions, central ``T`` crop) and of
    distillation's training samples (any angle, a shift that moves the patch grid).

    Args:
        regions: ``(N, C, S, S)`` float regions (``S = 2T`` in the report); any dtype for
            multiples of 90 degrees.
        angle: degrees, counter-clockwise as displayed (:func:`rotate`: multiples of 90 are
            ``torch.rot90``, exact; other angles bilinear).
        tile_size: crop side ``T``; ``S - T`` must be even so that the crop is centred.
        shift: the crop's offset from the centre after the rotation: ``s`` (``s`` px right and
            ``s`` px down) or ``(dx, dy)`` (``dx`` px right, ``dy`` px down).

    Returns:
        ``(N, C, T, T)``: ``rotate(regions, angle)[..., y0:y0 + T, x0:x0 + T]`` with
        ``x0 = (S - T) / 2 + dx`` and ``y0 = (S - T) / 2 + dy``.

    Raises:
        ValueError: the crop leaves the region, or (off the 90-degree grid) reaches pixels
            whose bilinear sources lie outside it, i.e. it would read padding.
    """
    if regions.dim() != 4 or regions.shape[-1] != regions.shape[-2]:
        raise ValueError(f"expected (N, C, S, S) regions, got shape {tuple(regions.shape)}")
    side = regions.shape[-1]
    if (side - tile_size) % 2:
        raise ValueError(f"a {tile_size} px crop cannot be centred in a {side} px region "
                         f"(S - T must be even)")
    dx, dy = (shift, shift) if isinstance(shift, int) else (int(shift[0]), int(shift[1]))
    x0, y0 = (side - tile_size) // 2 + dx, (side - tile_size) // 2 + dy
    if min(x0, y0) < 0 or max(x0, y0) + tile_size > side:
        raise ValueError(f"a {tile_size} px crop shifted by {shift} px leaves the {side} px "
                         f"region")
    if not float(angle) % 90.0:  # exact: a permutation of the pixels
        return rotate(regions, angle)[..., y0:y0 + tile_size, x0:x0 + tile_size]
    # Off the 90-degree grid a crop pixel at distance r from the centre reads source points at
    # distance r: the crop's farthest corner must stay within (S - 1) / 2 of the centre for its
    # bilinear sources to lie inside the region.
    centre = (side - 1) / 2
    corner = math.hypot(max(abs(x0 - centre), abs(x0 + tile_size - 1 - centre)),
                        max(abs(y0 - centre), abs(y0 + tile_size - 1 - centre)))
    if corner > centre + 1e-9:
        raise ValueError(f"rotating a {side} px region by {angle} degrees would bring "
                         f"padding into a {tile_size} px crop shifted by {shift} px")
    # Sample only the T x T crop (a quarter of a 2T region), at the points rotate() would
    # read: crop offset (u, v) from the centre (u right, v down) reads source offset
    # (cos u - sin v, sin u + cos v). The grid is made in float64, then cast.
    radians = math.radians(float(angle))
    cos, sin = math.cos(radians), math.sin(radians)
    steps = torch.arange(tile_size, dtype=torch.float64)
    u, v = (x0 - centre + steps)[None, :], (y0 - centre + steps)[:, None]
    source_x, source_y = centre + cos * u - sin * v, centre + sin * u + cos * v
    # grid_sample's normalised coordinates (align_corners=False): pixel x -> (2 x + 1) / S - 1
    grid = torch.stack(((2 * source_x + 1) / side - 1, (2 * source_y + 1) / side - 1), dim=-1)
    grid = grid.to(dtype=regions.dtype, device=regions.device)
    # One single-channel plane per batch entry, as in rotate(): CPU grid_sample parallelises
    # over the batch dim.
    planes = regions.reshape(-1, 1, side, side)
    out = F.grid_sample(planes, grid.expand(planes.shape[0], -1, -1, -1), mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out.reshape(*regions.shape[:2], tile_size, tile_size)


def _host_values(values: torch.Tensor | Sequence | np.ndarray, dtype: np.dtype,
                 shape: tuple[int, ...], name: str) -> np.ndarray:
    """``values`` as a host numpy array of ``shape`` (a device tensor is copied back: pass the
    parameters as the DataLoader delivers them, on the CPU, to keep the device stream free)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values).astype(dtype, copy=False)
    if array.shape != shape:
        raise ValueError(f"expected {name} of shape {shape}, got {array.shape}")
    return array


def batched_region_views(regions: torch.Tensor, angles: torch.Tensor | Sequence[float],
                         shifts: torch.Tensor | Sequence[tuple[int, int]],
                         mirror: torch.Tensor | Sequence[bool], tile_size: int, *,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """One view per region, each with its own angle, shift and mirror, all in one pass on
    ``regions``' device: the batched form of :func:`region_views`.

    View ``n`` is ``region_views(regions[n:n + 1], angles[n], tile_size, shifts[n])[0]``,
    mirrored left-right (``.flip(-1)``) where ``mirror[n]``: turned counter-clockwise about the
    region's centre, then its ``T x T`` crop moved by ``(dx, dy)``, then mirrored. Off the
    90-degree grid every such view is sampled in one ``F.grid_sample`` whose per-view grid
    holds only the ``T x T`` output pixels (the points :func:`region_views` samples, in the
    same float64 arithmetic), so the results agree with it to the rounding of the sampling
    (float32: about ``1e-5`` on ``[0, 1]`` images; float64: ``1e-12``). Views at multiples of
    90 degrees are pixel permutations and are gathered (integer indices, no interpolation), so
    they are bitwise ``region_views``'s ``torch.rot90`` crops.

    Args:
        regions: ``(N, C, S, S)`` regions, floating point or integer (uint8 contexts: they are
            sampled as their values, 0-255; sampling is linear, so dividing the views by 255
            afterwards gives the views of the scaled regions).
        angles: ``(N,)`` degrees, counter-clockwise as displayed (float64 keeps the angles of
            :func:`region_views`' Python floats exactly).
        shifts: ``(N, 2)`` integer ``(dx, dy)``: each crop's offset from the centre after the
            rotation, ``dx`` px right and ``dy`` px down.
        mirror: ``(N,)`` bool: mirror that view left-right (after the rotation and shift).
        tile_size: crop side ``T``; ``S - T`` must be even so that the crop is centred.
        dtype: floating dtype of the views; default: ``regions``' dtype if floating point,
            else float32.

    The view parameters are read on the host (they decide which views are exact and whether
    a crop stays inside its region): pass them as CPU tensors or sequences.

    Returns:
        ``(N, C, T, T)`` views of ``dtype``, on ``regions``' device.

    Raises:
        ValueError: bad shapes, a non-finite angle, a crop that leaves its region, or (off the
            90-degree grid) a crop that reaches pixels whose bilinear sources lie outside it,
            i.e. that would read padding.
    """
    if regions.dim() != 4 or regions.shape[-1] != regions.shape[-2]:
        raise ValueError(f"expected (N, C, S, S) regions, got shape {tuple(regions.shape)}")
    count, channels, side = regions.shape[0], regions.shape[1], regions.shape[-1]
    if (side - tile_size) % 2:
        raise ValueError(f"a {tile_size} px crop cannot be centred in a {side} px region "
                         f"(S - T must be even)")
    if dtype is None:
        dtype = regions.dtype if regions.is_floating_point() else torch.float32
    if not dtype.is_floating_point:
        raise TypeError(f"views are interpolated: dtype must be floating point, got {dtype}")
    angle = _host_values(angles, np.float64, (count,), "angles")
    shift = _host_values(shifts, np.int64, (count, 2), "shifts")
    flip = _host_values(mirror, np.bool_, (count,), "mirror")
    if not np.isfinite(angle).all():
        raise ValueError(f"angles must be finite, got {angle[~np.isfinite(angle)][0]}")
    # The crops' top-left corners in the turned region, as region_views places them.
    x0 = (side - tile_size) // 2 + shift[:, 0]
    y0 = (side - tile_size) // 2 + shift[:, 1]
    outside = (np.minimum(x0, y0) < 0) | (np.maximum(x0, y0) + tile_size > side)
    if outside.any():
        n = int(np.flatnonzero(outside)[0])
        raise ValueError(f"a {tile_size} px crop shifted by ({shift[n, 0]}, {shift[n, 1]}) px "
                         f"leaves the {side} px region (view {n})")
    exact = np.fmod(angle, 90.0) == 0.0  # a permutation of the pixels, as in region_views
    centre = (side - 1) / 2
    # Off the grid, the crop's farthest corner must stay within (S - 1) / 2 of the centre
    # for its bilinear sources to lie inside the region (region_views' rule).
    corner = np.hypot(np.maximum(np.abs(x0 - centre), np.abs(x0 + tile_size - 1 - centre)),
                      np.maximum(np.abs(y0 - centre), np.abs(y0 + tile_size - 1 - centre)))
    padding = ~exact & (corner > centre + 1e-9)
    if padding.any():
        n = int(np.flatnonzero(padding)[0])
        raise ValueError(f"rotating a {side} px region by {angle[n]} degrees would bring "
                         f"padding into a {tile_size} px crop shifted by ({shift[n, 0]}, "
                         f"{shift[n, 1]}) px (view {n})")

    # Per view, an affine map from output pixel (row i, column j) to the source point it
    # reads (no full-region rotation: only the T x T output pixels are sampled). As in
    # rotate() and region_views(), output offset (u right, v down) from the centre reads the
    # source offset (cos u - sin v, sin u + cos v), with u = x0 - c + j, v = y0 - c + i; the
    # mirror reads column T - 1 - j instead of j, i.e. u = (x0 - c + T - 1) - j.
    # math.cos/sin of the same Python floats as region_views; multiples of 90 degrees get
    # exact 0 / +-1, so that their sources are whole pixels.
    cos, sin = np.empty(count), np.empty(count)
    for n, value in enumerate(angle):
        if exact[n]:
            cos[n], sin[n] = ((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))[
                int(value // 90.0) % 4]
        else:
            radians = math.radians(float(value))
            cos[n], sin[n] = math.cos(radians), math.sin(radians)
    step = np.where(flip, -1.0, 1.0)
    u0 = x0 - centre + np.where(flip, tile_size - 1, 0)
    v0 = y0 - centre
    # theta[n] maps (1, j, i) to the source pixel (x, y): rows are the constant, the column
    # and the row coefficients. All whole or half-whole numbers on the 90-degree grid.
    theta = np.empty((count, 3, 2))
    theta[:, 0, 0] = centre + cos * u0 - sin * v0
    theta[:, 0, 1] = centre + sin * u0 + cos * v0
    theta[:, 1, 0], theta[:, 1, 1] = cos * step, sin * step
    theta[:, 2, 0], theta[:, 2, 1] = -sin, cos
    device = regions.device
    # float64 for the grid, as region_views (float32 would add about 2e-5 px of rounding at
    # S = 448); MPS has no float64.
    grid_dtype = torch.float32 if device.type == "mps" else torch.float64
    steps = torch.arange(tile_size, device=device, dtype=grid_dtype)

    def on_device(values: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        # non_blocking: a blocking copy from host memory would wait for every kernel already
        # queued (the previous training step); the driver stages these few bytes at once.
        return torch.from_numpy(values).to(device=device, dtype=dtype, non_blocking=True)

    def sources_of(views: np.ndarray, out_dtype: torch.dtype, scale: float = 1.0,
                   offset: float = 0.0) -> torch.Tensor:
        """``(len(views), T, T, 2)`` source points (x, y) of ``views``, ``* scale + offset``,
        summed in ``grid_dtype`` and stored as ``out_dtype``: per coordinate, a row term plus
        a column term (one broadcast add per output pixel: several times faster on the CPU
        than a (1, j, i) @ theta matmul, and the same values)."""
        affine = on_device(theta[views] * scale, grid_dtype)
        out = torch.empty((len(views), tile_size, tile_size, 2), dtype=out_dtype,
                          device=device)
        for k in range(2):
            constant = affine[:, 0, k].view(-1, 1, 1) + offset
            by_row = affine[:, 2, k].view(-1, 1, 1) * steps.view(1, -1, 1)  # (n, T, 1)
            by_column = affine[:, 1, k].view(-1, 1, 1) * steps.view(1, 1, -1)  # (n, 1, T)
            out[..., k] = (constant + by_row) + by_column
        return out

    exact_rows, sampled_rows = np.flatnonzero(exact), np.flatnonzero(~exact)
    views = None
    if len(sampled_rows):
        # grid_sample's normalised coordinates (align_corners=False): x -> (2 x + 1) / S - 1
        grid = sources_of(sampled_rows, dtype, 2 / side, 1 / side - 1)
        sources = regions
        if len(exact_rows):
            sources = regions.index_select(0, on_device(sampled_rows))
        views = F.grid_sample(sources.to(dtype), grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)
        if not len(exact_rows):  # the usual training batch: nothing to merge
            return views
    # Whole-pixel sources: copy them (any dtype, e.g. uint8), then convert; bitwise what
    # rot90 + crop + flip gives, since the conversion commutes with moving pixels.
    rows = on_device(exact_rows)
    source = sources_of(exact_rows, grid_dtype).round().long()  # (n, T, T, 2): (x, y)
    flat = (source[..., 1] * side + source[..., 0]).view(len(exact_rows), 1, -1)
    flat = flat.expand(-1, channels, -1)
    picked = regions.index_select(0, rows).flatten(2).gather(2, flat)
    picked = picked.view(-1, channels, tile_size, tile_size).to(dtype)
    if views is None:
        return picked
    out = torch.empty((count, channels, tile_size, tile_size), dtype=dtype, device=device)
    out.index_copy_(0, rows, picked)
    out.index_copy_(0, on_device(sampled_rows), views)
    return out
