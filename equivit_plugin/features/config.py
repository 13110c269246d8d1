"""The settings of a feature-extraction run, checked once (:class:`ExtractionConfig`), and the
pipeline's constants.

Importing this module does not import torch, timm or TIAToolbox: the command line takes its
``choices`` and defaults from here and answers ``--help`` at once.

Errors name the *Python* argument (``patch_size= must be a positive integer, got -3``) and
carry it in :attr:`ExtractionConfigError.argument`; the command line rewrites them with its
own flags (``--patch-size must be ...``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ..utils.arguments import checked_integer, checked_positive_float
from ..utils.precision import canonical_precision
from .slides import resolve_slides

__all__ = [
    "DECODERS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MODEL",
    "DEFAULT_MPP",
    "DEFAULT_PATCH_SIZE",
    "H5_DIR",
    "OUT_DTYPES",
    "PT_DIR",
    "TISSUE_MASKS",
    "ExtractionConfig",
    "ExtractionConfigError",
    "default_workers",
    "resolve_context",
]

DEFAULT_MODEL = "equivit_disc_small_patch16_224"
"""Encoder used when none is given (random weights: a warning says so): the package's default
invariant variant (``equivit_plugin.models.DEFAULT_INVARIANT_VARIANT``) at size small. It sees
the inscribed disc of what it embeds, so each cell is embedded with a context whose disc covers
it (:func:`resolve_context`)."""
DEFAULT_MPP = 0.5
"""Target resolution, micrometres per pixel (20x)."""
DEFAULT_PATCH_SIZE = 224
"""Tile side at the target resolution, pixels, for a registered timm name (a checkpoint or a
foundation model sets its own: ``patch_size=None`` takes the model's input size)."""
DEFAULT_BATCH_SIZE = 64
"""Tiles per forward pass."""
H5_DIR = "h5_files"
"""Sub-folder of the output folder with one ``<slide_stem>.h5`` per slide."""
PT_DIR = "pt_files"
"""Sub-folder with CLAM's ``<slide_stem>.pt`` (``also_pt``)."""
TISSUE_MASKS: tuple[str, ...] = ("morphological", "otsu", "none")
"""``tissue_mask`` choices: TIAToolbox's two maskers, or ``"none"`` (every tile)."""
OUT_DTYPES: tuple[str, ...] = ("float32", "float16")
"""Stored feature dtypes."""
DECODERS: tuple[str, ...] = ("auto", "openslide", "tifffile")
"""``decoder`` choices (:mod:`.reader`): ``"auto"`` decodes a slide's stored tiles with the
library TIAToolbox opens it with (OpenSlide for ``.svs``...); ``"tifffile"`` with tifffile's
codecs, for TIFF-based slides (faster where measured: ``benchmarks/slide_read.py``)."""


class ExtractionConfigError(ValueError):
    """Bad arguments; nothing was processed.

    Attributes:
        argument: the Python argument at fault (``"patch_size"``, ``"model"``...), also named
            in the message as ``patch_size=``; ``""`` when no single argument is.
    """

    def __init__(self, message: str, argument: str = "") -> None:
        super().__init__(message)
        self.argument = argument


# The shared checks (utils.arguments), raising this module's error.
_integer = partial(checked_integer, error=ExtractionConfigError)
_positive_float = partial(checked_positive_float, error=ExtractionConfigError)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a Slurm allocation), shared
    among the ``torchrun`` processes of this node (``LOCAL_WORLD_SIZE``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local))


def default_workers(device: Any = "cpu") -> int:
    """``DataLoader`` workers when none are given, from the cores available
    (:func:`available_cores`). On a GPU the run is bound by reading tiles: every core but the
    one that feeds the GPU reads. On the CPU the model is the work and needs the cores; one
    worker reads ahead (none on a single core)."""
    cores = available_cores()
    if str(device).startswith("cuda"):
        return max(1, cores - 1)
    return 1 if cores > 1 else 0


def resolve_context(context: int | None, cell: int, automatic: int) -> int:
    """The side of the region embedded around each grid cell, pixels at the target resolution.

    Args:
        context: what was asked for: ``None`` (automatic), ``0`` (the cell alone) or a side
            of at least ``cell``.
        cell: the grid cell's side (``patch_size``).
        automatic: the model's own choice (:func:`~.encoder.automatic_context`: the cell, or
            for a model that sees only its inscribed disc a region whose disc covers the cell).

    Raises:
        ExtractionConfigError: ``context`` is smaller than the cell (``.argument ==
            "context"``).
    """
    if context is None:
        return int(automatic)
    if context == 0:
        return int(cell)
    if context < cell:
        raise ExtractionConfigError(
            f"context={context} is smaller than the cell (patch_size={cell}): the region "
            f"embedded around a cell must hold it; give 0 or {cell} for the cell alone, or "
            f"leave it out (automatic)", "context")
    return int(context)


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ExtractionConfigError(f"{name}= must be one of {list(choices)}, got {value!r}",
                                    name)
    return str(value)


@dataclass
class ExtractionConfig:
    """Every setting of :func:`~equivit_plugin.features.extract_features`, validated and
    normalised on construction (see that function for the meaning of each).

    After construction ``workers`` holds its resolved value (``patch_size`` and ``stride``
    once the model is known: :meth:`set_patch_size`; ``context``, the side of the region
    embedded around each cell, too: :meth:`set_context`), ``precision`` is
    canonical (``fp32``/``bf16``/``fp16``), ``out_dir`` is a ``Path`` and
    :attr:`slide_paths` is the sorted slide list (:func:`~.slides.resolve_slides`).

    Raises:
        ExtractionConfigError: the first bad argument (``.argument`` names it).
    """

    slides: str | Path | Sequence[str | Path]
    out_dir: str | Path
    model: str | Path = DEFAULT_MODEL
    weights: str | Path | None = None
    model_kwargs: Mapping[str, Any] | None = None
    mpp: float = DEFAULT_MPP
    slide_mpp: float | None = None
    patch_size: int | None = None
    stride: int | None = None
    context: int | None = None
    tissue_mask: str = "morphological"
    min_tissue: float = 0.0
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int | None = None
    decoder: str = "auto"
    device: Any = "cpu"
    precision: str = "fp32"
    dtype: str = "float32"
    also_pt: bool = False
    overwrite: bool = False
    d4_average: bool = False
    seed: int = 0
    verbose: bool = False
    slide_paths: tuple[Path, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if self.patch_size is not None:
            self.patch_size = _integer("patch_size", self.patch_size, 1)
        self.batch_size = _integer("batch_size", self.batch_size, 1)
        if self.stride is not None:
            self.stride = _integer("stride", self.stride, 1)
        elif self.patch_size is not None:
            self.stride = self.patch_size
        if self.context is not None:
            self.context = _integer("context", self.context, 0)
            if self.patch_size is not None:  # else checked once the model gives the cell
                resolve_context(self.context, self.patch_size, self.patch_size)
        if self.weights is not None and not str(self.weights):
            raise ExtractionConfigError("weights= must be a file or folder path", "weights")
        self.mpp = _positive_float("mpp", self.mpp)
        if self.slide_mpp is not None:
            self.slide_mpp = _positive_float("slide_mpp", self.slide_mpp)
        self.tissue_mask = _choice("tissue_mask", self.tissue_mask, TISSUE_MASKS)
        if not (isinstance(self.min_tissue, (int, float)) and 0.0 <= self.min_tissue < 1.0):
            raise ExtractionConfigError(
                f"min_tissue= must be in [0, 1), got {self.min_tissue!r}", "min_tissue")
        self.min_tissue = float(self.min_tissue)
        try:
            self.precision = canonical_precision(self.precision, "precision")
        except ValueError as error:
            raise ExtractionConfigError(str(error), "precision") from None
        self.dtype = _choice("dtype", self.dtype, OUT_DTYPES)
        self.workers = _integer("workers", default_workers(self.device) if self.workers is None
                                else self.workers, 0)
        self.decoder = _choice("decoder", self.decoder, DECODERS)
        self.model_kwargs = dict(self.model_kwargs or {})
        self.out_dir = Path(self.out_dir)
        try:
            self.slide_paths = tuple(resolve_slides(self.slides))
        except ValueError as error:
            raise ExtractionConfigError(f"slides= {error}", "slides") from error

    def set_patch_size(self, model_input_size: int) -> None:
        """Tiles of the model's input size when ``patch_size`` was not given (and the stride
        that goes with it)."""
        if self.patch_size is None:
            self.patch_size = int(model_input_size)
        if self.stride is None:
            self.stride = self.patch_size

    def set_context(self, automatic: int) -> int:
        """Resolve :attr:`context` (after :meth:`set_patch_size`): ``None`` takes
        ``automatic`` (the encoder's choice, :func:`~.encoder.automatic_context`), ``0`` the
        cell; returns it.

        Raises:
            ExtractionConfigError: the context is smaller than the cell.
        """
        if self.patch_size is None:
            raise RuntimeError("set_context needs the cell: call set_patch_size first")
        self.context = resolve_context(self.context, self.patch_size, automatic)
        return self.context

    @property
    def h5_dir(self) -> Path:
        """``<out_dir>/h5_files``."""
        return Path(self.out_dir) / H5_DIR

    @property
    def pt_dir(self) -> Path:
        """``<out_dir>/pt_files``."""
        return Path(self.out_dir) / PT_DIR

    def prepare_output(self) -> None:
        """Create the output folders and check that files can be written there.

        Raises:
            ExtractionConfigError: ``out_dir`` cannot be created or written to.
        """
        try:
            folders = (self.out_dir, self.h5_dir, *((self.pt_dir,) if self.also_pt else ()))
            for folder in folders:
                folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.h5_dir):
                pass
        except OSError as error:
            raise ExtractionConfigError(
                f"out_dir={str(self.out_dir)!r}: cannot write there ({error})", "out_dir") \
                from error
