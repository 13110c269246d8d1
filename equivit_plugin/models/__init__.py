"""The Equi-ViT model family (registered in timm on import) and weight loading."""

from .checkpoint import (
    atomic_save,
    is_checkpoint_path,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from .equivit import MODEL_SIZES, STEMS, EquiVisionTransformer, model_config, model_name
from .weights import LoadReport, load_vit_weights

__all__ = [
    "EquiVisionTransformer",
    "atomic_save",
    "is_checkpoint_path",
    "load_checkpoint",
    "model_from_checkpoint",
    "save_checkpoint",
    "LoadReport",
    "MODEL_SIZES",
    "STEMS",
    "load_vit_weights",
    "model_config",
    "model_name",
]
