"""A slide's features drawn on its thumbnail: each tile coloured by the first principal
component of the feature vectors (one number per tile, so similar tiles get similar colours
whatever the model and whether or not it has a classifier head)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..utils.atomic import atomic_path
from .h5 import read_features
from .slides import reopen

__all__ = ["first_principal_component", "save_feature_overlay"]


def first_principal_component(features: np.ndarray) -> np.ndarray:
    """``(N, D)`` features -> ``(N,)`` scores on their first principal component (the sign
    chosen so that the largest loading is positive; zeros for fewer than 2 rows)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    if len(x) < 2:
        return np.zeros(len(x))
    x = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    axis = vt[0] * np.sign(vt[0][np.argmax(np.abs(vt[0]))])
    return x @ axis


def _value_map(coords: np.ndarray, values: np.ndarray, size_level0: int,
               shape: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """``(H, W)`` float map: each tile's value under its footprint, NaN elsewhere."""
    height, width = shape
    value_map = np.full((height, width), np.nan)
    for (x, y), value in zip(coords, values):
        x0, y0 = int(round(x * scale[0])), int(round(y * scale[1]))
        x1 = int(round((x + size_level0) * scale[0]))
        y1 = int(round((y + size_level0) * scale[1]))
        value_map[max(0, y0):min(height, y1), max(0, x0):min(width, x1)] = value
    return value_map


def save_feature_overlay(slide: str | Path, h5_path: str | Path, png_path: str | Path, *,
                         slide_mpp: float | None = None, max_side: int = 1000,
                         title: str | None = None) -> Path:
    """Write a PNG of ``slide``'s thumbnail with each tile of ``h5_path`` coloured by the
    first principal component of its features (:func:`first_principal_component`).

    Args:
        slide: the slide the feature file was made from.
        h5_path: its feature file (``coords`` level-0 top-left, ``patch_size_level0``).
        png_path: output PNG (written atomically).
        slide_mpp: resolution of a slide without resolution metadata (as for extraction).
        max_side: longer side of the thumbnail, pixels (at most the slide's).
        title: figure title (default: the slide name and tile count).

    Returns:
        ``png_path``.
    """
    from matplotlib.figure import Figure

    features, coords, attrs = read_features(h5_path)
    reader = reopen(slide, None if slide_mpp is None else (slide_mpp, slide_mpp))
    width, height = int(attrs["level0_width"]), int(attrs["level0_height"])
    level0_mpp = float(attrs["level0_mpp"])
    thumbnail_mpp = level0_mpp * max(1.0, max(width, height) / max_side)
    thumbnail = np.asarray(reader.slide_thumbnail(resolution=thumbnail_mpp, units="mpp"))
    scale = (thumbnail.shape[1] / width, thumbnail.shape[0] / height)
    values = first_principal_component(features)
    value_map = _value_map(coords, values, int(attrs["patch_size_level0"]),
                           thumbnail.shape[:2], scale)
    figure = Figure(figsize=(8, 8 * thumbnail.shape[0] / thumbnail.shape[1] + 0.6))
    ax = figure.add_subplot()
    ax.imshow(thumbnail[..., :3])
    shown = ax.imshow(np.ma.masked_invalid(value_map), cmap="viridis", alpha=0.55,
                      interpolation="nearest")
    figure.colorbar(shown, ax=ax, shrink=0.8, label="first principal component of the features")
    ax.set_axis_off()
    ax.set_title(title or f"{Path(str(slide)).name}: {len(coords)} tiles\n"
                          f"features of {attrs.get('encoder', '?')}", fontsize=11)
    with atomic_path(png_path) as tmp:
        figure.savefig(tmp, dpi=100, bbox_inches="tight")
    return Path(png_path)
