"""Settings of a distillation run, checked once, and its error.

Torch-free, so the command line can check its arguments before anything heavy is imported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ..utils.arguments import checked_integer, checked_positive_float

__all__ = ["DEFAULT_MAX_SHIFT", "DEFAULT_STRIDE", "DEFAULT_STUDENT", "DistillError",
           "DistillSettings", "TISSUE_MASKS", "work_dir_for"]

DEFAULT_STUDENT = "equivit_disc_small_patch16_224"
"""The student when none is named: ``models.DEFAULT_STUDENT_VARIANT`` at size small (the
measured choice, ``docs/distillation.md``)."""
DEFAULT_MPP = 0.5
"""Resolution slide tiles are read at, micrometres per pixel (20x)."""
DEFAULT_STRIDE = 112
"""Step between slide tiles at the target resolution, pixels (half a 224 px tile)."""
DEFAULT_MAX_SHIFT = 8
"""Largest translation of a training view, pixels (half a 16 px patch: every grid offset)."""
TISSUE_MASKS = ("morphological", "otsu", "none")


class DistillError(ValueError):
    """Bad arguments or inputs; nothing was trained.

    Attributes:
        argument: the Python argument at fault (``"teacher"``, ``"tiles"``...), also named in the
            message as ``teacher=``; ``""`` when no single argument is.
    """

    def __init__(self, message: str, argument: str = "") -> None:
        super().__init__(message)
        self.argument = argument


_integer = partial(checked_integer, error=DistillError)
_positive_float = partial(checked_positive_float, error=DistillError)


def work_dir_for(out: str | os.PathLike) -> Path:
    """Where a run keeps its targets, training state and logs: ``student.pt`` ->
    ``student.distill/`` beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".distill")


def _paths(name: str, values: Any) -> tuple[Path, ...]:
    if values is None:
        return ()
    if isinstance(values, (str, os.PathLike)):
        values = [values]
    if not isinstance(values, Sequence):
        raise DistillError(f"{name}= must be a path or a list of paths, got {values!r}", name)
    return tuple(Path(v) for v in values)


@dataclass(frozen=True)
class DistillSettings:
    """Everything a distillation run needs, checked and normalised on construction.

    Attributes:
        teacher: the frozen teacher: a foundation model's name (``equivit encoders``; give
            ``teacher_weights``), a registered timm name, ``hf-hub:`` name or checkpoint file.
        teacher_weights: the foundation model's released weights (file or folder).
        out: the student checkpoint to write (self-describing, teacher-space features).
        student: registered name of the student (an exactly invariant Equi-ViT).
        tiles: folders of tile images (searched recursively; labels, if any, are ignored).
        slides: slide files, folders, globs or lists; tiles are sampled from their tissue.
        work_dir: targets cache, training state and logs (default ``<out stem>.distill/``).
        targets_cache: the teacher-target file (default: in ``work_dir``, named by a hash of
            the teacher and the tiles, so it is shared by students of the same teacher).
        epochs, batch_size, lr, weight_decay, warmup_epochs: the optimisation (AdamW, warm-up
            then cosine decay).
        cosine_weight, regression_weight: the loss, ``cosine_weight * (1 - cos) +
            regression_weight * |s - t|^2 / mean |t|^2``.
        max_shift: largest translation of a view, pixels (views turn by any angle).
        init_from_teacher: start the student's blocks from the teacher's where shapes match.
        val_fraction: tiles held out to measure fidelity (cosine to the target) each epoch.
        target_mpp, stride, min_tissue, tissue_mask, slide_mpp: slide tiling (the feature
            pipeline's, TIAToolbox masks); a slide tile is the centre of a ``2T`` region, so
            every rotated view shows real tissue in its corners.
        max_tiles: use at most this many tiles (a random subset; ``None``: all).
        num_workers: DataLoader workers; batch_size_targets: teacher batch size.
        device: ``"cuda"``, ``"cpu"``... (``None``: CUDA when available); under ``torchrun``
            every rank uses ``cuda:LOCAL_RANK``.
        amp: mixed precision on CUDA (``None``: on when the device is CUDA).
        resume: continue from ``work_dir``'s training state when there is one.
        seed: tile split, views and initialisation.
        progress: progress bars.
    """

    teacher: str
    out: Path
    teacher_weights: Path | None = None
    student: str = DEFAULT_STUDENT
    tiles: tuple[Path, ...] = ()
    slides: tuple[Path, ...] = ()
    work_dir: Path | None = None
    targets_cache: Path | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    cosine_weight: float = 1.0
    regression_weight: float = 1.0
    max_shift: int = DEFAULT_MAX_SHIFT
    init_from_teacher: bool = True
    val_fraction: float = 0.05
    target_mpp: float = DEFAULT_MPP
    stride: int = DEFAULT_STRIDE
    min_tissue: float = 0.5
    tissue_mask: str = "morphological"
    slide_mpp: float | None = None
    max_tiles: int | None = None
    num_workers: int = 4
    batch_size_targets: int = 64
    device: str | None = None
    amp: bool | None = None
    resume: bool = True
    seed: int = 0
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if not isinstance(self.teacher, (str, os.PathLike)) or not str(self.teacher):
            raise DistillError(f"teacher= must name a model or a checkpoint, got "
                               f"{self.teacher!r}", "teacher")
        put("teacher", str(self.teacher))
        if self.teacher_weights is not None:
            if not isinstance(self.teacher_weights, (str, os.PathLike)) \
                    or not str(self.teacher_weights):
                raise DistillError(f"teacher_weights= must be a file or folder path, got "
                                   f"{self.teacher_weights!r}", "teacher_weights")
            put("teacher_weights", Path(self.teacher_weights))
        if not isinstance(self.student, str) or not self.student:
            raise DistillError(f"student= must be a registered model name, got "
                               f"{self.student!r}", "student")
        if not isinstance(self.out, (str, os.PathLike)) or not str(self.out):
            raise DistillError(f"out= must be a file path, got {self.out!r}", "out")
        put("out", Path(self.out))
        put("tiles", _paths("tiles", self.tiles))
        put("slides", _paths("slides", self.slides))
        if not self.tiles and not self.slides:
            raise DistillError("tiles= or slides= must give at least one folder of tiles or "
                               "one slide", "tiles")
        put("work_dir", Path(self.work_dir) if self.work_dir else work_dir_for(self.out))
        if self.targets_cache is not None:
            put("targets_cache", Path(self.targets_cache))
        for name in ("epochs", "batch_size", "stride", "batch_size_targets"):
            put(name, _integer(name, getattr(self, name), 1))
        for name in ("warmup_epochs", "max_shift", "num_workers", "seed"):
            put(name, _integer(name, getattr(self, name), 0))
        if self.max_tiles is not None:
            put("max_tiles", _integer("max_tiles", self.max_tiles, 2))
        for name in ("lr", "target_mpp"):
            put(name, _positive_float(name, getattr(self, name)))
        if self.slide_mpp is not None:
            put("slide_mpp", _positive_float("slide_mpp", self.slide_mpp))
        for name in ("weight_decay", "cosine_weight", "regression_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise DistillError(f"{name}= must be a number >= 0, got {value!r}", name)
            put(name, float(value))
        if not self.cosine_weight and not self.regression_weight:
            raise DistillError("cosine_weight= and regression_weight= cannot both be 0",
                               "cosine_weight")
        if not isinstance(self.val_fraction, (int, float)) or not 0 <= self.val_fraction < 1:
            raise DistillError(f"val_fraction= must be in [0, 1), got {self.val_fraction!r}",
                               "val_fraction")
        if not isinstance(self.min_tissue, (int, float)) or not 0 <= self.min_tissue < 1:
            raise DistillError(f"min_tissue= must be in [0, 1), got {self.min_tissue!r}",
                               "min_tissue")
        if self.tissue_mask not in TISSUE_MASKS:
            raise DistillError(f"tissue_mask= must be one of {list(TISSUE_MASKS)}, got "
                               f"{self.tissue_mask!r}", "tissue_mask")
