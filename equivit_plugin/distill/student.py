"""The student: an exactly invariant Equi-ViT that outputs the teacher's feature space."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..models import EquiVisionTransformer, LoadReport, create_model, load_vit_weights
from .config import DistillError

__all__ = ["build_student"]


def build_student(name: str, teacher_dim: int, img_size: int, *,
                  teacher: nn.Module | None = None
                  ) -> tuple[nn.Module, dict[str, Any], LoadReport | None]:
    """Build the student whose pooled features are ``teacher_dim``-dimensional.

    When the student's width ``D_s`` differs from ``teacher_dim`` it gets a linear projection
    after pooling (``EquiVisionTransformer(feature_dim=teacher_dim)``), which is part of the
    model, so :func:`~equivit_plugin.models.pooled_embedding` - what extract-features, the
    TIAToolbox adapter and the rotation report read - gives teacher-space features.

    Args:
        name: registered student name (``equivit_disc_small_patch16_224``...).
        teacher_dim: width ``D`` of the teacher's pooled embedding.
        img_size: the student's input side (the teacher's).
        teacher: start the student's transformer blocks (and norms, class token) from this
            model's where the shapes match (:func:`~equivit_plugin.models.load_vit_weights`);
            ``None``: random initialisation.

    Returns:
        ``(student, model_kwargs, load report or None)``; ``create_model(name,
        **model_kwargs)`` rebuilds the architecture.

    Raises:
        DistillError: ``name`` is not registered, or needs a projection but is not an Equi-ViT.
    """
    kwargs: dict[str, Any] = {"num_classes": 0, "img_size": int(img_size)}
    try:
        student = create_model(name, **kwargs)
    except (ValueError, TypeError, RuntimeError) as error:
        raise DistillError(f"student= {name!r}: {error}", "student") from error
    if int(student.num_features) != int(teacher_dim):
        if not isinstance(student, EquiVisionTransformer):
            raise DistillError(
                f"student= {name!r} has {student.num_features} features and the teacher "
                f"{teacher_dim}; only an Equi-ViT student (equivit_*) can project to the "
                f"teacher's width", "student")
        kwargs["feature_dim"] = int(teacher_dim)
        student = create_model(name, **kwargs)
    report = load_vit_weights(student, teacher.state_dict()) if teacher is not None else None
    return student, kwargs, report
