"""What the student minimises: direction (cosine) and size (regression) of the target, both in
standardised target coordinates."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DistillationLoss", "feature_cosine"]


def feature_cosine(features: torch.Tensor, targets: torch.Tensor,
                   centre: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, D), (B, D) -> (B,)`` cosine similarity of each feature with its target, after
    subtracting ``centre`` (``(D,)``, e.g. the targets' mean) from both when given."""
    features, targets = features.float(), targets.float()
    if centre is not None:
        features, targets = features - centre, targets - centre
    return F.cosine_similarity(features, targets, dim=-1)


class DistillationLoss(nn.Module):
    """``cosine_weight * mean(1 - cos(z_s, z_t)) + regression_weight * mean((z_s - z_t)^2)``
    with ``z = (x - mean) / std`` per feature.

    Pooled ViT features share a large common component (every tile's cosine to every other is
    near 1), so a loss on the raw vectors is spent on what all tiles have in common.
    Standardising with the targets' mean and standard deviation (computed once over the
    training tiles) makes every feature count as much as its spread across tiles; the student
    still outputs the teacher's raw features. The cosine term fixes the direction that
    nearest-neighbour and attention-MIL pipelines read, the regression term the size as well,
    so the student's features can replace the teacher's in a model trained on them.

    Args:
        cosine_weight, regression_weight: the two weights (``>= 0``).
        mean, std: ``(D,)`` per-feature mean and standard deviation of the targets
            (``None``: 0 and 1, the raw vectors).

    Shapes:
        ``(B, D), (B, D) -> ()``.
    """

    def __init__(self, cosine_weight: float = 1.0, regression_weight: float = 1.0,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cosine_weight = float(cosine_weight)
        self.regression_weight = float(regression_weight)
        if std is not None and bool((torch.as_tensor(std) <= 0).any()):
            raise ValueError("std must be > 0 for every feature")
        self.register_buffer("mean", None if mean is None else torch.as_tensor(mean).float())
        self.register_buffer("std", None if std is None else torch.as_tensor(std).float())

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.mean is not None:
            x = x - self.mean
        return x if self.std is None else x / self.std

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        student, teacher = self.standardise(features), self.standardise(targets)
        loss = student.new_zeros(())
        if self.cosine_weight:
            loss = loss + self.cosine_weight * (1.0 - feature_cosine(student, teacher)).mean()
        if self.regression_weight:
            loss = loss + self.regression_weight * F.mse_loss(student, teacher)
        return loss
