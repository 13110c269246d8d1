"""What the student minimises: direction (cosine) and size (regression) of the target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DistillationLoss", "feature_cosine"]


def feature_cosine(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(B, D), (B, D) -> (B,)`` cosine similarity of each feature with its target."""
    return F.cosine_similarity(features.float(), targets.float(), dim=-1)


class DistillationLoss(nn.Module):
    """``cosine_weight * mean(1 - cos(s, t)) + regression_weight * mean((s - t)^2) / scale``.

    The cosine term fixes the direction that nearest-neighbour and attention-MIL pipelines
    read; the regression term fixes the size as well, so the student's features can replace
    the teacher's in a model trained on them. ``scale`` (the targets' mean square, computed
    once over the training set) makes the regression term unit-free.

    Args:
        cosine_weight, regression_weight: the two weights (``>= 0``).
        scale: mean square of the targets (``> 0``).

    Shapes:
        ``(B, D), (B, D) -> ()``.
    """

    def __init__(self, cosine_weight: float = 1.0, regression_weight: float = 1.0,
                 scale: float = 1.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.cosine_weight = float(cosine_weight)
        self.regression_weight = float(regression_weight)
        self.scale = float(scale)

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        features, targets = features.float(), targets.float()
        loss = features.new_zeros(())
        if self.cosine_weight:
            loss = loss + self.cosine_weight * (1.0 - feature_cosine(features, targets)).mean()
        if self.regression_weight:
            loss = loss + self.regression_weight * F.mse_loss(features, targets) / self.scale
        return loss
