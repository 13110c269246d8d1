"""TIAToolbox adapter: Equi-ViT models for ``PatchPredictor`` and ``DeepFeatureExtractor``."""

from equivit_plugin.tiatoolbox.adapter import (
    EquiViTClassifier,
    EquiViTEncoder,
    FeatureBatch,
    make_ioconfig,
    preprocess_tile,
)

__all__ = ["EquiViTClassifier", "EquiViTEncoder", "FeatureBatch", "make_ioconfig",
           "preprocess_tile"]
