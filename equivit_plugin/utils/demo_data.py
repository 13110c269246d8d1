"""Demo inputs that ship with the installed packages: no download, no data folder.

- :func:`demo_he_image`: TIAToolbox's packaged real H&E image
  (``tiatoolbox.data.stain_norm_target()``, ``1000 x 1000`` RGB at :data:`DEMO_MPP`), the
  source of the bundle's demo tiles and of the feature pipeline's demo slide;
- :func:`demo_checkpoint`: the MONAI bundle's demo checkpoint, when the package runs from a
  source checkout (``None`` in a wheel install);
- :func:`cache_dir`: where demo files derived from them are cached.

Standard library only at import (the command line imports this module for ``--help``);
numpy and TIAToolbox are imported inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["DEMO_IMAGE_SIZE", "DEMO_MPP", "cache_dir", "demo_checkpoint", "demo_he_image"]

DEMO_MPP = 0.5
"""Resolution of :func:`demo_he_image`, micrometres per pixel (20x)."""

DEMO_IMAGE_SIZE = 1000
"""Side of :func:`demo_he_image` in pixels (it is square)."""

CACHE_ENV = "EQUIVIT_CACHE"
"""Environment variable that overrides :func:`cache_dir`."""

_BUNDLE_CHECKPOINT = Path("monai_bundle") / "models" / "model.pt"


def demo_he_image() -> np.ndarray:
    """TIAToolbox's packaged H&E image: uint8 ``(1000, 1000, 3)`` RGB at :data:`DEMO_MPP`.

    Raises:
        ValueError: the installed TIAToolbox returns another size (the message says which).
    """
    import numpy as np
    from tiatoolbox.data import stain_norm_target

    image = np.ascontiguousarray(np.asarray(stain_norm_target())[..., :3], dtype=np.uint8)
    expected = (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE, 3)
    if image.shape != expected:
        raise ValueError(f"tiatoolbox.data.stain_norm_target() is {image.shape}, expected "
                         f"{expected}")
    return image


def demo_checkpoint(repository_root: str | os.PathLike | None = None) -> Path | None:
    """The MONAI bundle's demo checkpoint ``monai_bundle/models/model.pt``, or ``None``.

    Args:
        repository_root: the folder holding ``monai_bundle/`` (default: the folder above the
            installed ``equivit_plugin`` package, i.e. the source checkout of an editable
            install; a wheel install has no bundle there).
    """
    root = Path(repository_root) if repository_root is not None \
        else Path(__file__).resolve().parents[2]
    path = root / _BUNDLE_CHECKPOINT
    return path if path.is_file() else None


def cache_dir() -> Path:
    """Folder for cached demo files: ``$EQUIVIT_CACHE``, else
    ``$XDG_CACHE_HOME/equivit_plugin``, else ``~/.cache/equivit_plugin`` (not created)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "equivit_plugin"
