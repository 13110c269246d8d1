"""Figures for rotation sweeps and token equivariance (PNG via matplotlib's Agg canvas).

The figures are drawn on ``matplotlib.figure.Figure`` with an Agg canvas rather than through
``pyplot``, so no display is needed and the caller's global backend is left alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..utils.atomic import atomic_path
from .metrics import RotationSweep

__all__ = ["accuracy_polar_figure", "plot_accuracy_polar", "plot_similarity_vs_angle",
           "save_figure", "similarity_vs_angle_figure"]


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` (Agg, no pyplot state) to ``path`` atomically; parent folders created."""
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    return Path(path)


def plot_accuracy_polar(sweeps: Mapping[str, RotationSweep], path: str | Path,
                        title: str = "Accuracy vs rotation angle") -> Path:
    """Write :func:`accuracy_polar_figure` to the PNG ``path``; returns ``path``."""
    return save_figure(accuracy_polar_figure(sweeps, title), path)


def plot_similarity_vs_angle(results: Mapping[str, Mapping[Any, Mapping[str, float]]],
                             path: str | Path,
                             title: str = "Token equivariance vs rotation angle") -> Path:
    """Write :func:`similarity_vs_angle_figure` to the PNG ``path``; returns ``path``."""
    return save_figure(similarity_vs_angle_figure(results, title), path)


def accuracy_polar_figure(sweeps: Mapping[str, RotationSweep],
                          title: str = "Accuracy vs rotation angle") -> Figure:
    """Polar plot of accuracy (radius) against rotation angle, one closed line per model.

    Args:
        sweeps: ``{model name: RotationSweep}`` (angle sweeps; angles in degrees).
        title: figure title.

    Returns:
        The figure: one line per model, labelled ``"<name> (<mean> +- <std>)"``, its points
        at the sorted angles (radians) and the first point repeated one turn later.
    """
    if not sweeps:
        raise ValueError("no sweeps to plot")
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot(projection="polar")
    for name, sweep in sweeps.items():
        order = np.argsort(sweep.angles)
        theta = np.radians(np.asarray(sweep.angles, dtype=float)[order])
        acc = np.asarray(sweep.accuracy, dtype=float)[order]
        # Repeat the first point one turn later so the line closes the loop.
        ax.plot(np.append(theta, theta[0] + 2 * math.pi), np.append(acc, acc[0]), marker="o",
                label=f"{name} ({sweep.mean:.3f} +- {sweep.std:.3f})")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="lower left", bbox_to_anchor=(-0.1, -0.25), fontsize="small")
    return fig


def similarity_vs_angle_figure(results: Mapping[str, Mapping[Any, Mapping[str, float]]],
                               title: str = "Token equivariance vs rotation angle") -> Figure:
    """Token cosine similarity against angle: mean solid, min dashed, one colour per model.

    Args:
        results: ``{model name: token_similarity(...) output}``, i.e.
            ``{model: {angle: {"mean": float, "min": float, ...}}}``; angle keys may be numbers
            or numeric strings (as read back from JSON).
        title: figure title.

    Returns:
        The figure: per model a ``"<name> mean"`` and a ``"<name> min"`` line over the sorted
        angles.
    """
    if not results:
        raise ValueError("no results to plot")
    fig = Figure(figsize=(9, 4.5))
    ax = fig.add_subplot()
    for index, (name, per_angle) in enumerate(results.items()):
        points = sorted((float(angle), stats) for angle, stats in per_angle.items())
        angles = [angle for angle, _ in points]
        color = f"C{index % 10}"
        ax.plot(angles, [s["mean"] for _, s in points], color=color, marker="o", ms=3,
                label=f"{name} mean")
        ax.plot(angles, [s["min"] for _, s in points], color=color, linestyle="--",
                label=f"{name} min")
    ax.set_xlabel("rotation angle (degrees, counter-clockwise)")
    ax.set_ylabel("token cosine similarity")
    ax.set_xticks(np.arange(0, 361, 45))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    # Outside the axes: the min curves dip anywhere, a legend inside would hide some of them.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig
