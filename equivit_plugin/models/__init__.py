"""The Equi-ViT model family, the pathology foundation models by name (:mod:`.encoders`,
:mod:`.foundation`), weights, checkpoints, and the one place that builds and loads models
(:func:`load_model`).

Importing this package registers the family in timm (:mod:`.registry`, cheap); the names below
load their modules on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_attributes
from . import registry  # noqa: F401  (the Equi-ViT family in timm's registry)

_LAZY_NAMES = {
    "CHECKPOINT_FORMAT_VERSION": "checkpoint", "check_class_names": "checkpoint",
    "checkpoint_weights": "checkpoint",
    "file_sha256": "checkpoint", "is_checkpoint_path": "checkpoint",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "PooledEncoder": "embedding", "pooled_embedding": "embedding",
    "EMBEDDING_RULES": "encoders", "EncoderSpec": "encoders", "encoder_names": "encoders",
    "get_encoder": "encoders", "is_encoder": "encoders", "register_encoder": "encoders",
    "RANDOM_WEIGHTS": "foundation", "FoundationEncoder": "foundation",
    "FoundationLoadError": "foundation", "embed_tokens": "foundation",
    "load_foundation_model": "foundation", "weights_sha256": "foundation",
    "DEFAULT_INVARIANT_VARIANT": "equivit", "DEFAULT_STUDENT_VARIANT": "equivit",
    "DEPTH_CHANGE": "equivit",
    "EMBED_LAYERS": "equivit", "MODEL_SIZES": "equivit",
    "VARIANTS": "equivit", "EquiVisionTransformer": "equivit",
    "model_config": "equivit", "model_name": "equivit",
    "HUB_PREFIXES": "factory", "ModelInfo": "factory", "ModelLoadError": "factory",
    "create_model": "factory", "is_hub_name": "factory", "unknown_source_reason": "factory",
    "load_encoder": "factory", "load_model": "factory",
    "IMAGENET_MEAN": "preprocessing", "IMAGENET_STD": "preprocessing",
    "input_normalisation": "preprocessing", "normalise_batch": "preprocessing",
    "normalise_tile": "preprocessing", "TileTransform": "preprocessing",
    "tile_transform": "preprocessing",
    "LoadReport": "weights", "load_vit_weights": "weights",
}

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "EMBEDDING_RULES",
    "RANDOM_WEIGHTS",
    "EncoderSpec",
    "FoundationEncoder",
    "FoundationLoadError",
    "embed_tokens",
    "encoder_names",
    "get_encoder",
    "is_encoder",
    "load_foundation_model",
    "register_encoder",
    "weights_sha256",
    "DEFAULT_INVARIANT_VARIANT",
    "DEFAULT_STUDENT_VARIANT",
    "DEPTH_CHANGE",
    "EMBED_LAYERS",
    "HUB_PREFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_SIZES",
    "VARIANTS",
    "EquiVisionTransformer",
    "LoadReport",
    "ModelInfo",
    "ModelLoadError",
    "PooledEncoder",
    "check_class_names",
    "checkpoint_weights",
    "create_model",
    "file_sha256",
    "input_normalisation",
    "is_checkpoint_path",
    "is_hub_name",
    "load_checkpoint",
    "load_encoder",
    "load_model",
    "load_vit_weights",
    "model_config",
    "model_name",
    "normalise_batch",
    "normalise_tile",
    "pooled_embedding",
    "save_checkpoint",
    "tile_transform",
    "TileTransform",
    "unknown_source_reason",
]

if TYPE_CHECKING:
    from .checkpoint import (
        CHECKPOINT_FORMAT_VERSION,
        check_class_names,
        checkpoint_weights,
        file_sha256,
        is_checkpoint_path,
        load_checkpoint,
        save_checkpoint,
    )
    from .embedding import PooledEncoder, pooled_embedding
    from .encoders import (
        EMBEDDING_RULES,
        EncoderSpec,
        encoder_names,
        get_encoder,
        is_encoder,
        register_encoder,
    )
    from .equivit import (
        DEFAULT_INVARIANT_VARIANT,
        DEFAULT_STUDENT_VARIANT,
        DEPTH_CHANGE,
        EMBED_LAYERS,
        MODEL_SIZES,
        VARIANTS,
        EquiVisionTransformer,
        model_config,
        model_name,
    )
    from .factory import (
        HUB_PREFIXES,
        ModelInfo,
        ModelLoadError,
        create_model,
        is_hub_name,
        load_encoder,
        load_model,
        unknown_source_reason,
    )
    from .foundation import (
        RANDOM_WEIGHTS,
        FoundationEncoder,
        FoundationLoadError,
        embed_tokens,
        load_foundation_model,
        weights_sha256,
    )
    from .preprocessing import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        TileTransform,
        input_normalisation,
        normalise_batch,
        normalise_tile,
        tile_transform,
    )
    from .weights import LoadReport, load_vit_weights


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_NAMES, globals())
