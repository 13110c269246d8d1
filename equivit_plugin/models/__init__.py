"""The Equi-ViT model family (registered in timm on import), weights, checkpoints, and the
one place that builds and loads models (:func:`load_model`)."""

from .checkpoint import (
    check_class_names,
    file_sha256,
    is_checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from .embedding import PooledEncoder, pooled_embedding
from .equivit import MODEL_SIZES, STEMS, EquiVisionTransformer, model_config, model_name
from .factory import ModelInfo, ModelLoadError, create_model, load_model
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, normalise_batch, normalise_tile
from .weights import LoadReport, load_vit_weights

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_SIZES",
    "STEMS",
    "EquiVisionTransformer",
    "LoadReport",
    "ModelInfo",
    "ModelLoadError",
    "PooledEncoder",
    "check_class_names",
    "create_model",
    "file_sha256",
    "is_checkpoint_path",
    "load_checkpoint",
    "load_model",
    "load_vit_weights",
    "model_config",
    "model_name",
    "normalise_batch",
    "normalise_tile",
    "pooled_embedding",
    "save_checkpoint",
]
