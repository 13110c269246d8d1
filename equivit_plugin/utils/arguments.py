"""Checks of numeric arguments, torch-free, for the settings of every pipeline.

Each check names the *Python* argument in its message (``k= must be ...``) and raises the
caller's error class, constructed as ``error(message, name)``, so a command line can map the
name to its flag and a library user sees which argument was wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral, Real
from typing import Any

__all__ = ["ArgumentError", "checked_integer", "checked_positive_float"]

ArgumentError = Callable[[str, str], Exception]
"""An error class called as ``error(message, argument_name)``."""


def checked_integer(name: str, value: Any, minimum: int, error: ArgumentError) -> int:
    """``value`` as an int ``>= minimum`` (integral floats and numpy integers accepted)."""
    is_number = isinstance(value, (int, float, Integral)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or int(value) != value or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise error(f"{name}= must be {what}, got {value!r}", name)
    return int(value)


def checked_positive_float(name: str, value: Any, error: ArgumentError) -> float:
    """``value`` as a finite float ``> 0`` (booleans refused)."""
    if isinstance(value, bool) or not isinstance(value, Real) \
            or not (value > 0 and math.isfinite(value)):
        raise error(f"{name}= must be a positive number, got {value!r}", name)
    return float(value)
