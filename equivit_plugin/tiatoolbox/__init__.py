"""TIAToolbox adapter: Equi-ViT models for ``PatchPredictor`` and ``DeepFeatureExtractor``.

Importing this door also applies :func:`~equivit_plugin.tiatoolbox.compat.patch_sqlite_store`
(only on Pythons without loadable SQLite extensions), so ``output_type="annotationstore"``
works there.
"""

from .adapter import (
    EquiViTClassifier,
    EquiViTEncoder,
    FeatureBatch,
    make_ioconfig,
)
from .compat import patch_sqlite_store

patch_sqlite_store()

__all__ = ["EquiViTClassifier", "EquiViTEncoder", "FeatureBatch", "make_ioconfig"]
