"""The rotation report's settings and their checks, torch-free.

The command line takes its defaults and choices from here and answers ``--help`` at once;
:class:`ReportSettings` checks every argument of
:func:`~equivit_plugin.robustness.report.rotation_report` once, before anything is read or
built. Errors name the *Python* argument (``k= must be ...``) and carry it in
:attr:`RotationReportError.argument`; the command line rewrites them with its own flags.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from numbers import Real
from typing import Any

from ..features.config import DEFAULT_MODEL, DEFAULT_MPP, TISSUE_MASKS
from ..utils.arguments import checked_integer, checked_positive_float

__all__ = [
    "DEFAULT_ANGLE_STEP",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_K",
    "DEFAULT_MIN_TISSUE",
    "DEFAULT_MODEL",
    "DEFAULT_MPP",
    "DEFAULT_REGIONS",
    "DEFAULT_REGION_STRIDE",
    "DEFAULT_SHIFTS",
    "REPORT_JSON",
    "REPORT_PNG",
    "TISSUE_MASKS",
    "ReportSettings",
    "RotationReportError",
    "angle_key",
    "angles_from_step",
]

DEFAULT_ANGLE_STEP = 15
"""Degrees between measured angles: 0, 15, ..., 345 (Elphick et al.)."""
DEFAULT_SHIFTS: tuple[int, ...] = (4, 8)
"""Sub-patch translations, pixels at the target resolution (a quarter and half a 16-px
patch)."""
DEFAULT_K = 10
"""Neighbourhood size of the mutual-kNN similarity (Huh et al. 2024; Elphick et al.)."""
DEFAULT_REGIONS = 150
"""Regions sampled from tissue, spread over the slides."""
DEFAULT_REGION_STRIDE = 0.5
"""Step between candidate regions, as a fraction of the tile size ``T``: regions are ``2T``
wide, so at ``0.5`` neighbouring candidates overlap by three quarters and a small slide still
gives enough regions (the shared CMU-1-Small-Region holds 12 disjoint 448-px tissue regions,
about 190 at this step)."""
DEFAULT_MIN_TISSUE = 0.5
"""Tissue fraction a region needs (TIAToolbox mask): mostly-background regions would all be
each other's neighbours whatever the model does."""
DEFAULT_BATCH_SIZE = 32
"""Views per forward pass."""
REPORT_JSON = "rotation_report.json"
"""File name of the report in ``out_dir``."""
REPORT_PNG = "rotation_report.png"
"""File name of the plot in ``out_dir``."""


class RotationReportError(ValueError):
    """Bad arguments or inputs; nothing was measured.

    Attributes:
        argument: the Python argument at fault (``"k"``, ``"models"``, ``"slides"``...), also
            named in the message as ``k=``; ``""`` when no single argument is.
    """

    def __init__(self, message: str, argument: str = "") -> None:
        super().__init__(message)
        self.argument = argument


# The shared checks (utils.arguments), raising this module's error.
_integer = partial(checked_integer, error=RotationReportError)
_positive_float = partial(checked_positive_float, error=RotationReportError)


def angle_key(angle: float) -> str:
    """The JSON key of an angle: ``15.0`` -> ``"15"``, ``7.5`` -> ``"7.5"``."""
    return f"{float(angle):g}"


def angles_from_step(angle_step: Any) -> tuple[float, ...]:
    """``0, step, 2 step, ...`` below 360 degrees.

    Raises:
        RotationReportError: ``angle_step`` is not a positive number that divides 360.
    """
    is_number = isinstance(angle_step, Real) and not isinstance(angle_step, bool)
    if not is_number or not (0 < angle_step < 360) or not math.isfinite(angle_step):
        raise RotationReportError(f"angle_step= must be a number of degrees in (0, 360), got "
                                  f"{angle_step!r}", "angle_step")
    count = 360 / angle_step
    if abs(count - round(count)) > 1e-9:
        raise RotationReportError(f"angle_step= must divide 360 (e.g. 5, 10, 15, 30, 45, 90), "
                                  f"got {angle_step!r}", "angle_step")
    return tuple(float(i * angle_step) for i in range(int(round(count))))


def _angles(angles: Sequence[Any] | None) -> tuple[float, ...]:
    """Sorted distinct angles in ``[0, 360)`` with 0 (the reference) first."""
    if angles is None:
        return angles_from_step(DEFAULT_ANGLE_STEP)
    if isinstance(angles, (str, bytes)) or not isinstance(angles, Sequence):
        raise RotationReportError(f"angles= must be a list of degrees, got {angles!r}",
                                  "angles")
    values = set()
    for angle in angles:
        if isinstance(angle, bool) or not isinstance(angle, Real) or not math.isfinite(angle):
            raise RotationReportError(f"angles= must hold finite numbers of degrees, got "
                                      f"{angle!r}", "angles")
        values.add(float(angle) % 360.0)
    if not values - {0.0}:
        raise RotationReportError(f"angles= needs at least one angle that is not a multiple "
                                  f"of 360, got {list(angles)!r}", "angles")
    return tuple(sorted(values | {0.0}))


@dataclass(frozen=True)
class ReportSettings:
    """The protocol settings of a rotation report, checked and normalised on construction.

    ``angles`` becomes the sorted distinct angles in ``[0, 360)``, 0 (the reference view)
    included; ``shifts`` the sorted distinct non-negative shifts. That a shift fits the tile
    (``shift < T / 2``) and ``k`` the number of regions *found* is checked once the models and
    the regions are known.

    Raises:
        RotationReportError: the first bad argument (``.argument`` names it).
    """

    angles: tuple[float, ...]
    shifts: tuple[int, ...]
    k: int
    n_regions: int
    region_stride: float
    target_mpp: float
    slide_mpp: float | None
    tissue_mask: str
    min_tissue: float
    batch_size: int
    seed: int
    d4_average: bool

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("angles", _angles(self.angles))
        if isinstance(self.shifts, (str, bytes)) or not isinstance(self.shifts, Sequence):
            raise RotationReportError(f"shifts= must be a list of pixel shifts, got "
                                      f"{self.shifts!r}", "shifts")
        put("shifts", tuple(sorted({_integer("shifts", s, 0) for s in self.shifts})))
        put("k", _integer("k", self.k, 1))
        put("n_regions", _integer("n_regions", self.n_regions, 1))
        if self.k >= self.n_regions:
            raise RotationReportError(
                f"k={self.k} must be smaller than the number of regions (n_regions="
                f"{self.n_regions}): every region needs k neighbours besides itself", "k")
        put("region_stride", _positive_float("region_stride", self.region_stride))
        if self.region_stride > 2.0:
            raise RotationReportError(f"region_stride= must be at most 2 (tile sizes; regions "
                                      f"are 2 tiles wide), got {self.region_stride!r}",
                                      "region_stride")
        put("target_mpp", _positive_float("target_mpp", self.target_mpp))
        if self.slide_mpp is not None:
            put("slide_mpp", _positive_float("slide_mpp", self.slide_mpp))
        if self.tissue_mask not in TISSUE_MASKS:
            raise RotationReportError(f"tissue_mask= must be one of {list(TISSUE_MASKS)}, got "
                                      f"{self.tissue_mask!r}", "tissue_mask")
        if isinstance(self.min_tissue, bool) or not isinstance(self.min_tissue, Real) \
                or not 0.0 <= self.min_tissue < 1.0:
            raise RotationReportError(f"min_tissue= must be in [0, 1), got "
                                      f"{self.min_tissue!r}", "min_tissue")
        put("min_tissue", float(self.min_tissue))
        put("batch_size", _integer("batch_size", self.batch_size, 1))
        put("seed", _integer("seed", self.seed, 0))
        put("d4_average", bool(self.d4_average))
