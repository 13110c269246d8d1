"""Distillation: any timm ViT's features, made exactly rotation-invariant at the cost of one
forward pass.

A frozen teacher (a foundation model, or any timm ViT or checkpoint) gives each tile a target,
the mean of its pooled embedding over the 8 rotations/flips (exactly invariant, 8x the cost);
an exactly invariant Equi-ViT student learns to give that target for the tile turned by any
angle and shifted under the patch grid. The student checkpoint is self-describing and its
pooled features live in the teacher's space, so ``equivit extract-features --model
student.pt``, the TIAToolbox adapter and the rotation report use it as they use any model.

- :mod:`.config`: :class:`DistillSettings` (every argument checked once), :class:`DistillError`;
- :mod:`.tiles`: :func:`collect_tiles` from folders and slides (:class:`DistillTiles`);
- :mod:`.targets`: :func:`teacher_targets`, the cached D4-mean targets;
- :mod:`.views`: :class:`DistillationViews`, the any-angle, shifted training views (contexts
  read in the workers, views made on the device, batched, by :class:`PrepareViews`);
- :mod:`.student`: :func:`build_student`; :mod:`.loss`: :class:`DistillationLoss`;
- :mod:`.run`: :func:`distill`, the run (``equivit distill`` and ``configs/distill.json``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_attributes

_LAZY_NAMES = {
    "DEFAULT_STUDENT": "config", "DistillError": "config", "DistillSettings": "config",
    "work_dir_for": "config",
    "DistillTiles": "tiles", "collect_tiles": "tiles",
    "Targets": "targets", "teacher_targets": "targets", "targets_fingerprint": "targets",
    "DistillationViews": "views", "PrepareViews": "views", "largest_shift": "views",
    "build_student": "student",
    "DistillationLoss": "loss", "feature_cosine": "loss",
    "DistillResult": "run", "distill": "run",
}

__all__ = [
    "DEFAULT_STUDENT",
    "DistillError",
    "DistillResult",
    "DistillSettings",
    "DistillTiles",
    "DistillationLoss",
    "DistillationViews",
    "PrepareViews",
    "Targets",
    "build_student",
    "collect_tiles",
    "distill",
    "feature_cosine",
    "largest_shift",
    "targets_fingerprint",
    "teacher_targets",
    "work_dir_for",
]

if TYPE_CHECKING:
    from .config import DEFAULT_STUDENT, DistillError, DistillSettings, work_dir_for
    from .loss import DistillationLoss, feature_cosine
    from .run import DistillResult, distill
    from .student import build_student
    from .targets import Targets, targets_fingerprint, teacher_targets
    from .tiles import DistillTiles, collect_tiles
    from .views import DistillationViews, PrepareViews, largest_shift


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_NAMES, globals())
