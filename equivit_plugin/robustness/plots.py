"""The rotation report's figure: both metrics against the angle, one line per model, and the
sub-patch shifts beside them (matplotlib ``Figure`` on an Agg canvas, no pyplot state)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..equivariance.plots import save_figure

__all__ = ["plot_rotation_report", "rotation_report_figure"]

_METRICS = (("mutual_knn", "mutual-kNN similarity"), ("mean_cosine", "mean cosine to 0 deg"))


def _angle_curve(per_angle: Mapping[str, Mapping[str, float]],
                 metric: str) -> tuple[list[float], list[float]]:
    """``(angles, values)`` sorted by angle (keys may be numeric strings, as in the JSON)."""
    points = sorted((float(angle), values[metric]) for angle, values in per_angle.items())
    return [a for a, _ in points], [v for _, v in points]


def rotation_report_figure(report: Mapping[str, Any]) -> Figure:
    """Draw a report (:func:`~.report.rotation_report`'s dict, or its JSON read back).

    Panels: mutual-kNN similarity against the angle (y in ``[0, 1.02]``, with the chance level
    ``k / (N - 1)``), mean cosine against the angle (y zoomed to the values: cosines of
    related features crowd below 1), when the report has shifts one bar (mutual-kNN)
    and one diamond (mean cosine) per model and shift view, and when it has several sources
    per source two bars per model: mutual-kNN off the grid (solid) and under the largest
    shift (hatched). One colour per model; exact 90-degree turns are marked by dotted
    verticals.

    Returns:
        The figure. In the angle panels each model's line is labelled with its ``label`` and
        holds exactly the report's values (angles sorted); in the shift panel each model's
        bars are a container labelled ``label`` over ``report`` shift keys in order.
    """
    models = report.get("models") or []
    if not models:
        raise ValueError("the report has no models to plot")
    shift_keys = list(models[0].get("shifts", {}))
    sources = list(models[0].get("sources") or {})
    ratios = [3, 3] + ([2] if shift_keys else []) + ([2] if sources else [])
    panels = len(ratios)
    fig = Figure(figsize=(5.2 * panels, 4.4), layout="constrained")
    axes = fig.subplots(1, panels, gridspec_kw={"width_ratios": ratios})
    n, k = int(report["n_regions"]), int(report["k"])

    for ax, (metric, title) in zip(axes, _METRICS):
        lowest = 1.0
        for index, model in enumerate(models):
            angles, values = _angle_curve(model["angles"], metric)
            lowest = min(lowest, *values)
            ax.plot(angles, values, color=f"C{index % 10}", marker="o", ms=3,
                    label=model["label"])
        for turn in (90, 180, 270):
            ax.axvline(turn, color="0.6", linestyle=":", linewidth=1)
        if metric == "mutual_knn" and n > 1:
            # Unrelated features share about k / (N - 1) of their neighbours.
            ax.axhline(k / (n - 1), color="0.4", linestyle="--", linewidth=1,
                       label=f"chance k/(N-1) = {k / (n - 1):.2f}")
        ax.set_xlim(0, 360)
        ax.set_xticks(np.arange(0, 361, 45))
        if metric == "mutual_knn":
            ax.set_ylim(0.0, 1.02)
        else:
            # Cosines of related features crowd just below 1: zoom in (to a multiple of 0.05
            # below the lowest value) so models can be told apart.
            bottom = max(-1.0, np.floor((lowest - 0.25 * (1 - lowest) - 0.005) * 20) / 20)
            ax.set_ylim(bottom, 1 + 0.04 * (1 - bottom))
        ax.set_xlabel("rotation angle (degrees, counter-clockwise)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} (k={k})" if metric == "mutual_knn" else title)
        ax.grid(True, alpha=0.3)

    if shift_keys:
        ax = axes[2]
        positions = np.arange(len(shift_keys), dtype=float)
        width = 0.8 / len(models)
        for index, model in enumerate(models):
            x = positions - 0.4 + width * (index + 0.5)
            color = f"C{index % 10}"
            shifts = model["shifts"]
            ax.bar(x, [shifts[key]["mutual_knn"] for key in shift_keys], width=width,
                   color=color, alpha=0.75, label=model["label"])
            ax.plot(x, [shifts[key]["mean_cosine"] for key in shift_keys], linestyle="none",
                    marker="D", ms=5, color=color, markeredgecolor="black",
                    label=f"_{model['label']} mean cosine")
        names = [key.replace("+rot90", " px\n+ 90 deg turn") if "+" in key else f"{key} px"
                 for key in shift_keys]
        ax.set_xticks(positions, names)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("crop shifted right and down by")
        ax.set_title("shifts: bars mutual-kNN, diamonds cosine")
        ax.grid(True, axis="y", alpha=0.3)

    if sources:
        _source_panel(axes[-1], models, sources, shift_keys)

    handles, labels = axes[0].get_legend_handles_labels()
    # Outside the axes: the curves can sit anywhere in [0, 1], a legend inside hides some.
    axes[-1].legend(handles, labels, fontsize="small", loc="upper left",
                    bbox_to_anchor=(1.02, 1.0))
    slides = ", ".join(s.get("name") or Path(s["path"]).stem
                       for s in report.get("sources") or report.get("slides", [])
                       if s["regions"])
    extra = ", D4-averaged features" if report.get("d4_average") else ""
    fig.suptitle(f"Rotation report: {n} regions of {slides} at {report['target_mpp']} um/px"
                 f"{extra}")
    return fig


def _source_panel(ax: Any, models: list[Mapping[str, Any]], sources: list[str],
                  shift_keys: list[str]) -> None:
    """Per source: off-grid mutual-kNN (solid) and under the largest plain shift (hatched)."""
    plain = [key for key in shift_keys if "+" not in key]
    shift = max(plain, key=int) if plain else None
    positions = np.arange(len(sources), dtype=float)
    bars = 2 if shift else 1
    width = 0.8 / (len(models) * bars)
    for index, model in enumerate(models):
        records = [model["sources"][name] for name in sources]
        x = positions - 0.4 + width * bars * index + width / 2
        ax.bar(x, [r["summary"]["off_grid_mutual_knn"] or 0.0 for r in records], width=width,
               color=f"C{index % 10}", alpha=0.75, label=f"_{model['label']} off-grid")
        if shift:
            ax.bar(x + width, [r["shifts"][shift]["mutual_knn"] for r in records], width=width,
                   color=f"C{index % 10}", alpha=0.45, hatch="//", edgecolor="black",
                   linewidth=0.3, label=f"_{model['label']} {shift} px")
    ax.set_xticks(positions, [name if len(name) <= 14 else name[:13] + "..." for name in sources],
                  rotation=20, ha="right")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("mutual-kNN similarity")
    ax.set_title("per source: off-grid" + (f" (solid), {shift} px (hatched)" if shift else ""))
    ax.grid(True, axis="y", alpha=0.3)


def plot_rotation_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write :func:`rotation_report_figure` to the PNG ``path`` (atomically); returns it."""
    return save_figure(rotation_report_figure(report), path)
