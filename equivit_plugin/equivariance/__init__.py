"""Tools to measure rotation equivariance: exact D4 transforms, the arbitrary-angle rotation
protocol, token/feature equivariance metrics, rotation sweeps and their plots."""

from .metrics import (
    RotationSweep,
    d4_sweep,
    d4_token_similarity,
    feature_invariance,
    mutual_knn_similarity,
    prediction_agreement,
    rotation_sweep,
    token_grid,
    token_similarity,
)
from .plots import (
    accuracy_polar_figure,
    plot_accuracy_polar,
    plot_similarity_vs_angle,
    save_figure,
    similarity_vs_angle_figure,
)
from .transforms import (
    D4_NAMES,
    D4_TRANSFORMS,
    batched_region_views,
    d4_transform,
    region_views,
    rotate,
)

__all__ = [
    "D4_NAMES",
    "D4_TRANSFORMS",
    "RotationSweep",
    "accuracy_polar_figure",
    "batched_region_views",
    "d4_sweep",
    "d4_token_similarity",
    "d4_transform",
    "feature_invariance",
    "mutual_knn_similarity",
    "plot_accuracy_polar",
    "plot_similarity_vs_angle",
    "prediction_agreement",
    "region_views",
    "rotate",
    "rotation_sweep",
    "save_figure",
    "similarity_vs_angle_figure",
    "token_grid",
    "token_similarity",
]
