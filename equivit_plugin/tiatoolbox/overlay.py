"""Predicted classes of a ``PatchPredictor`` WSI run, drawn on the slide's thumbnail.

The drawing is TIAToolbox's (``overlay_prediction_mask``); this module only turns the
engine's patch boxes and class indices into the 2-D label map it expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["NOT_ANALYSED", "prediction_map", "save_prediction_overlay"]

NOT_ANALYSED = 0
"""Label-map value where no patch was predicted (outside the tissue mask); class ``k`` is
``k + 1``."""


def prediction_map(coordinates: np.ndarray, predictions: np.ndarray,
                   shape: tuple[int, int], scale: float | tuple[float, float]) -> np.ndarray:
    """Paint patch predictions into a label map.

    Args:
        coordinates: ``(N, 4)`` patch boxes ``x0, y0, x1, y1`` as the engine writes them (in
            the ioconfig's resolution space).
        predictions: ``(N,)`` class indices.
        shape: ``(H, W)`` of the map (e.g. the thumbnail).
        scale: map pixels per coordinate unit, one number or ``(sx, sy)``.

    Returns:
        ``(H, W)`` int32 map: ``class index + 1`` under each patch, :data:`NOT_ANALYSED`
        elsewhere (later patches overwrite earlier ones where strides overlap).
    """
    coordinates = np.asarray(coordinates, dtype=np.float64)
    predictions = np.asarray(predictions).astype(np.int64).reshape(-1)
    if coordinates.ndim != 2 or coordinates.shape[1] != 4:
        raise ValueError(f"coordinates must be (N, 4) boxes, got shape {coordinates.shape}")
    if len(coordinates) != len(predictions):
        raise ValueError(f"{len(coordinates)} boxes but {len(predictions)} predictions")
    sx, sy = (scale, scale) if np.isscalar(scale) else scale
    height, width = shape
    boxes = np.rint(coordinates * np.array([sx, sy, sx, sy])).astype(np.int64)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    label_map = np.full((height, width), NOT_ANALYSED, dtype=np.int32)
    for (x0, y0, x1, y1), label in zip(boxes, predictions):
        label_map[y0:y1, x0:x1] = label + 1
    return label_map


def save_prediction_overlay(slide: str | Path, coordinates: np.ndarray,
                            predictions: np.ndarray, class_dict: Mapping[int, str],
                            path: str | Path, *, resolution: float = 0.5, units: str = "mpp",
                            thumbnail_resolution: float = 4.0, alpha: float = 0.45,
                            title: str | None = None) -> Path:
    """Write a PNG of the slide thumbnail with each patch coloured by its predicted class.

    Args:
        slide: the slide the engine ran on (anything ``WSIReader.open`` reads).
        coordinates: ``(N, 4)`` boxes from the engine's output, read at ``resolution``
            ``units`` (the ioconfig's; ``make_ioconfig()`` default 0.5 mpp).
        predictions: ``(N,)`` class indices.
        class_dict: ``{index: name}`` (the adapter's ``class_dict``).
        path: output PNG.
        thumbnail_resolution: thumbnail resolution in the same ``units``.
    """
    import matplotlib.pyplot as plt
    from tiatoolbox.utils.visualization import overlay_prediction_mask
    from tiatoolbox.wsicore.wsireader import WSIReader

    reader = WSIReader.open(slide)
    thumbnail = reader.slide_thumbnail(resolution=thumbnail_resolution, units=units)
    # per-axis ratio of the two read sizes: right for every unit (mpp, power, baseline, level)
    width, height = reader.slide_dimensions(resolution=resolution, units=units)
    scale = (thumbnail.shape[1] / width, thumbnail.shape[0] / height)
    label_map = prediction_map(coordinates, predictions, thumbnail.shape[:2], scale)
    palette = (np.asarray(plt.get_cmap("tab10").colors) * 255).astype(int)
    label_info = {NOT_ANALYSED: ("not analysed", (255, 255, 255))}
    label_info.update({int(k) + 1: (str(name), tuple(int(c) for c in palette[int(k) % 10]))
                       for k, name in sorted(class_dict.items())})
    fig, ax = plt.subplots(figsize=(8, 8 * thumbnail.shape[0] / thumbnail.shape[1] + 0.5))
    overlay_prediction_mask(thumbnail, label_map, alpha=alpha, label_info=label_info,
                            min_val=1, ax=ax, return_ax=True)
    ax.set_title(title or f"{Path(str(slide)).name}: predicted class per patch")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
