"""How stable an encoder's features are when tissue is rotated: the rotation report.

::

    from equivit_plugin.robustness import rotation_report
    report = rotation_report(["vit_tiny_patch16_224", "equivit_ri_tiny_patch16_224"],
                             "slides/", n_regions=150, out_dir="report")
    report["models"][0]["summary"]["off_grid_mutual_knn"]

The same from the shell: ``equivit rotation-report --model NAME SLIDES... --out DIR``. The
protocol (Elphick et al., arXiv 2412.11938), the JSON keys and how to read the plot are in
``docs/rotation_report.md``.

Modules (the names below load on first use: importing :mod:`.config` costs no torch):

- :mod:`.config`: defaults, :class:`ReportSettings` (every argument checked once) and
  :class:`RotationReportError`;
- :mod:`.regions`: :func:`sample_regions`, tissue regions as level-0 centres, read through
  the feature pipeline at each model's tile size (:class:`Regions`); :func:`tile_regions`,
  a folder of tile images as a source (:class:`TileRegions`);
- :mod:`.report`: :func:`rotation_report`, the run (its views are
  :func:`~equivit_plugin.equivariance.region_views`: rotate, then crop the centre);
- :mod:`.plots`: :func:`rotation_report_figure`, :func:`plot_rotation_report`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_attributes

_LAZY_NAMES = {
    "DEFAULT_ANGLE_STEP": "config", "DEFAULT_K": "config", "DEFAULT_REGIONS": "config",
    "DEFAULT_SHIFTS": "config", "REPORT_JSON": "config", "REPORT_PNG": "config",
    "ReportSettings": "config", "RotationReportError": "config",
    "angles_from_step": "config",
    "RegionSet": "regions", "Regions": "regions", "TileRegions": "regions",
    "sample_regions": "regions", "spread_quota": "regions", "tile_regions": "regions",
    "rotation_report": "report", "summarise": "report",
    "plot_rotation_report": "plots", "rotation_report_figure": "plots",
}

__all__ = [
    "DEFAULT_ANGLE_STEP",
    "DEFAULT_K",
    "DEFAULT_REGIONS",
    "DEFAULT_SHIFTS",
    "REPORT_JSON",
    "REPORT_PNG",
    "RegionSet",
    "Regions",
    "ReportSettings",
    "RotationReportError",
    "TileRegions",
    "angles_from_step",
    "plot_rotation_report",
    "rotation_report",
    "rotation_report_figure",
    "sample_regions",
    "spread_quota",
    "summarise",
    "tile_regions",
]

if TYPE_CHECKING:
    from .config import (
        DEFAULT_ANGLE_STEP,
        DEFAULT_K,
        DEFAULT_REGIONS,
        DEFAULT_SHIFTS,
        REPORT_JSON,
        REPORT_PNG,
        ReportSettings,
        RotationReportError,
        angles_from_step,
    )
    from .plots import plot_rotation_report, rotation_report_figure
    from .regions import Regions, RegionSet, TileRegions, sample_regions, spread_quota, tile_regions
    from .report import rotation_report, summarise


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_NAMES, globals())
