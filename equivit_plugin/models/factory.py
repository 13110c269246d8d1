"""The one place that builds and loads models, for every door.

A *source* is a registered timm name (``equivit_ri_small_patch16_224``, ``vit_small_patch16_224``
...: random weights), a foundation model of :mod:`.encoders` by name with its released weights
(``load_model("uni_v1", weights="pytorch_model.bin")``), a Hugging Face Hub name
(``hf-hub:owner/model``: timm downloads the pretrained weights, so it needs internet) or a
self-describing checkpoint (:func:`~.checkpoint.save_checkpoint`). In goes a source, out come
the model and a :class:`ModelInfo` that describes it: class names checked against the head,
input size, the normalisation its inputs need, how a tile's embedding is made, whether the
weights are random, the weights' hash.
The MONAI door (``create_network``), the TIAToolbox door (``EquiViT*.create``), the bundle
configs and the feature pipeline all call :func:`load_model` or :func:`create_model`::

    net, info = load_model("monai_bundle/models/model.pt")
    info.class_names, info.img_size, info.random_weights   # ['lung_aca', ...], 224, False
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch
from torch import nn

from . import registry  # noqa: F401  (the Equi-ViT family in timm's registry)
from .checkpoint import (
    check_class_names,
    checkpoint_weights,
    file_sha256,
    is_checkpoint_path,
    load_checkpoint,
)
from .embedding import PooledEncoder
from .encoders import Ref, get_encoder, is_encoder
from .foundation import RANDOM_WEIGHTS, FoundationLoadError, load_foundation_model, weights_sha256
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["HUB_PREFIXES", "ModelInfo", "ModelLoadError", "create_model", "is_hub_name",
           "load_encoder", "load_model", "unknown_source_reason"]

HUB_PREFIXES = ("hf-hub:", "hf_hub:")
"""timm's prefixes of a Hugging Face Hub model (``hf-hub:MahmoodLab/UNI``...)."""


def is_hub_name(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a model on the Hugging Face Hub (``hf-hub:owner/name``)."""
    return not isinstance(source, os.PathLike) and str(source).startswith(HUB_PREFIXES)


def unknown_source_reason(source: str | os.PathLike) -> str | None:
    """Why ``source`` cannot be a model source (``None`` when it can): for the one-line error
    of a ``--model`` argument, before anything is built."""
    if is_checkpoint_path(source) or is_hub_name(source) or is_encoder(source) \
            or timm.is_model(str(source)):
        return None
    return (f"{str(source)!r} is neither a foundation model (uni_v1, kaiko-vits16...: "
            f"`equivit encoders` lists them), a registered timm model (e.g. "
            f"equivit_disc_small_patch16_224, vit_small_patch16_224), a Hugging Face Hub name "
            f"(hf-hub:owner/model) nor an existing checkpoint file")


class ModelLoadError(ValueError):
    """A model source cannot be built or loaded; the message names the source and says why."""


@dataclass(frozen=True)
class ModelInfo:
    """What describes a model built by :func:`load_model`.

    Attributes:
        name: timm registry name of the architecture.
        source: what was asked for (the registered name, or the checkpoint path as given).
        num_classes: size ``K`` of the classifier head (``0``: the model returns features).
        class_names: ``K`` label names in logit order, or ``None`` when unknown.
        img_size: the input side the model was built for, in pixels.
        embed_dim: size ``D`` of the pooled embedding (:func:`~.embedding.pooled_embedding`).
        random_weights: built from a name, so the weights are random (seeded when asked).
        checkpoint: the checkpoint path (a foundation model's weights file or folder), ``""``
            for a registered name.
        checkpoint_sha256: SHA-256 of the checkpoint (:func:`~.foundation.weights_sha256` for a
            foundation model's weights), ``""`` for a registered name.
        model_kwargs: the ``timm.create_model`` arguments that rebuild the architecture.
        extra: the checkpoint's other entries (epoch, metrics...), without the weights; for a
            foundation model ``{"encoder": EncoderSpec.describe()}``.
        mean, std: the normalisation of ``[0, 1]`` RGB inputs the model was trained with
            (what every door applies): a checkpoint's own (ImageNet's for this package's
            training), a foundation model's card, timm's config for a name.
        embedding: how a tile's features are made: ``"pooled"`` (timm's
            ``forward_head(..., pre_logits=True)``) or a foundation model's rule
            (:data:`~.encoders.EMBEDDING_RULES`).
    """

    name: str
    source: str
    num_classes: int
    class_names: tuple[str, ...] | None
    img_size: int
    embed_dim: int
    random_weights: bool
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    embedding: str = "pooled"

    @property
    def class_dict(self) -> dict[int, str] | None:
        """``{index: name}`` (TIAToolbox's ``class_dict``), or ``None``."""
        return dict(enumerate(self.class_names)) if self.class_names is not None else None


def create_model(name: str, num_classes: int = 0, *, img_size: int = 224, in_chans: int = 3,
                 **kwargs: Any) -> nn.Module:
    """``timm.create_model`` for any registered name, with the Equi-ViT family registered.

    Args:
        name: timm registry name (``equivit_*``, ``equivit_ri_*``, ``convvit_*``, ``vit_*``...).
        num_classes: head size ``K`` (``0``: ``forward`` returns the pooled features).
        img_size: input side in pixels.
        in_chans: input channels ``C``.
        **kwargs: any other ``timm.create_model`` argument (``depth``, ``drop_path_rate``...).

    Shapes:
        ``(B, in_chans, img_size, img_size) -> (B, num_classes)`` (``(B, D)`` for ``K = 0``).

    A Hub name (``hf-hub:owner/model``) is created with ``pretrained=True``: its weights are the
    point of naming it.

    Raises:
        ModelLoadError: ``name`` is not registered, or a Hub model cannot be downloaded.
    """
    if is_hub_name(name):
        try:
            return timm.create_model(name, pretrained=True, num_classes=num_classes,
                                     img_size=img_size, in_chans=in_chans, **kwargs)
        except (OSError, RuntimeError, ValueError) as error:
            raise ModelLoadError(
                f"{name}: cannot load it from the Hugging Face Hub ({type(error).__name__}: "
                f"{error}); without internet, save the model where it is reachable and pass "
                f"the file (save_checkpoint) instead") from error
    if not timm.is_model(name):
        raise ModelLoadError(f"{name!r} is not a registered timm model (e.g. "
                             f"equivit_ri_small_patch16_224, vit_small_patch16_224)")
    return timm.create_model(name, num_classes=num_classes, img_size=img_size,
                             in_chans=in_chans, **kwargs)


def _embed_dim(net: nn.Module) -> int:
    return int(getattr(net, "num_features", getattr(net, "embed_dim", 0)))


def _from_checkpoint(path: Path, *, num_classes: int | None, class_names: Sequence[str] | None,
                     img_size: int | None, map_location: str | torch.device,
                     overrides: Mapping[str, Any]) -> tuple[nn.Module, ModelInfo]:
    try:
        payload = load_checkpoint(path, map_location)
    except FileNotFoundError as error:
        raise ModelLoadError(str(error)) from error
    kwargs = {**(payload.get("model_kwargs") or {}), **overrides}
    head = int(kwargs.get("num_classes", 0))
    saved_names = check_class_names(payload.get("class_names"), head, f"checkpoint {path}")
    if num_classes is not None and int(num_classes) != head:
        raise ModelLoadError(f"checkpoint {path} has a {head}-class head ({saved_names}), but "
                             f"num_classes={num_classes} was asked for")
    if class_names is not None and saved_names is not None \
            and [str(n) for n in class_names] != saved_names:
        raise ModelLoadError(f"checkpoint {path} predicts classes {saved_names}, but "
                             f"class_names={list(class_names)} was given")
    saved_size = int(kwargs.get("img_size", 224))
    if img_size is not None and int(img_size) != saved_size:
        raise ModelLoadError(f"checkpoint {path} takes {saved_size} px inputs, but "
                             f"img_size={img_size} was asked for")
    try:
        net = timm.create_model(payload["model_name"], **kwargs)
        net.load_state_dict(checkpoint_weights(payload))
    except (RuntimeError, TypeError, ValueError) as error:
        raise ModelLoadError(f"checkpoint {path}: cannot rebuild {payload['model_name']} with "
                             f"{kwargs}: {error}") from error
    names = saved_names if saved_names is not None else (
        check_class_names(class_names, head, f"checkpoint {path}"))
    extra = {k: v for k, v in payload.items()
             if k not in ("model", "model_name", "model_kwargs", "class_names")}
    # Checkpoints of this package were trained on ImageNet-normalised inputs unless they
    # record their own statistics.
    info = ModelInfo(name=str(payload["model_name"]), source=str(path), num_classes=head,
                     class_names=tuple(names) if names is not None else None,
                     img_size=saved_size, embed_dim=_embed_dim(net), random_weights=False,
                     checkpoint=str(path), checkpoint_sha256=file_sha256(path),
                     model_kwargs=kwargs, extra=extra,
                     mean=_floats(extra.get("mean", IMAGENET_MEAN)),
                     std=_floats(extra.get("std", IMAGENET_STD)))
    return net.eval(), info


def _from_name(name: str, *, num_classes: int | None, class_names: Sequence[str] | None,
               img_size: int | None, seed: int | None,
               overrides: Mapping[str, Any]) -> tuple[nn.Module, ModelInfo]:
    head = int(num_classes) if num_classes is not None else (
        len(class_names) if class_names is not None else 0)
    names = check_class_names(class_names, head, name)
    size = 224 if img_size is None else int(img_size)
    kwargs = {"num_classes": head, "img_size": size, **overrides}
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            net = create_model(name, **kwargs)
    except ModelLoadError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError) as error:
        raise ModelLoadError(f"{name} cannot be built with {kwargs}: {error}") from error
    config = timm.data.resolve_data_config({}, model=net)
    info = ModelInfo(name=name, source=name, num_classes=head,
                     class_names=tuple(names) if names is not None else None, img_size=size,
                     embed_dim=_embed_dim(net), random_weights=not is_hub_name(name),
                     model_kwargs=kwargs, mean=_floats(config["mean"]),
                     std=_floats(config["std"]))
    return net.eval(), info


def _floats(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _from_encoder(name: str, weights: str | os.PathLike | None, *, num_classes: int | None,
                  class_names: Sequence[str] | None, img_size: int | None,
                  seed: int | None) -> tuple[nn.Module, ModelInfo]:
    spec = get_encoder(name)
    if num_classes or class_names:
        raise ModelLoadError(f"{name} is a feature encoder (no classifier head): it takes no "
                             f"num_classes or class_names")
    if img_size is not None and int(img_size) != spec.input_size:
        raise ModelLoadError(f"{name} embeds {spec.input_size} px tiles, but img_size="
                             f"{img_size} was asked for")
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            net = load_foundation_model(spec, weights)
    except FoundationLoadError as error:
        raise ModelLoadError(str(error)) from error
    random = str(weights) == RANDOM_WEIGHTS
    path = "" if random else str(weights)
    info = ModelInfo(name=spec.name, source=path or spec.name, num_classes=0,
                     class_names=None, img_size=spec.input_size, embed_dim=spec.embed_dim,
                     random_weights=random, checkpoint=path,
                     checkpoint_sha256="" if random else weights_sha256(weights),
                     model_kwargs={k: str(v) if isinstance(v, Ref) else v
                                   for k, v in spec.kwargs.items()},
                     extra={"encoder": spec.describe()}, mean=spec.mean, std=spec.std,
                     embedding=spec.embedding)
    return net, info


def load_model(source: str | os.PathLike, *, weights: str | os.PathLike | None = None,
               num_classes: int | None = None,
               class_names: Sequence[str] | None = None, img_size: int | None = None,
               require_class_names: bool = False, seed: int | None = None,
               map_location: str | torch.device = "cpu",
               **model_kwargs: Any) -> tuple[nn.Module, ModelInfo]:
    """Build a registered model or load a self-describing checkpoint, in eval mode.

    Args:
        source: a foundation model's name (:mod:`.encoders`: ``uni_v1``, ``kaiko-vits16``...;
            give ``weights``), a timm registry name (random weights) or a checkpoint path
            (``.pt``/``.pth`` or any existing file; see :func:`~.checkpoint.is_checkpoint_path`).
        weights: a foundation model's released weights (a file or a folder; ``"random"``:
            random weights of its architecture). Only with a foundation model's name.
        num_classes: head size. For a checkpoint it must match the saved head; for a name it
            sets the head (default ``len(class_names)``, else ``0``: pooled features).
        class_names: label names in logit order. For a checkpoint they must equal the saved
            ones (when it has some); for a name their number must match ``num_classes``.
        img_size: input side. For a checkpoint it must match; for a name default 224.
        require_class_names: fail when the model ends up without class names (a classifier
            whose predictions must be labelled).
        seed: for a name, draw the random weights under ``torch.manual_seed(seed)`` in a forked
            RNG (the caller's RNG is untouched); ``None``: the global RNG.
        map_location: where checkpoint tensors are loaded.
        **model_kwargs: more ``timm.create_model`` arguments (not architecture-changing ones
            for a checkpoint).

    Returns:
        ``(model in eval mode, ModelInfo)``.

    Raises:
        ModelLoadError: unknown name, missing or foreign checkpoint, or a mismatch between
            what was asked for and what the checkpoint holds (the message names both).
    """
    if weights is not None and not is_encoder(str(source)):
        raise ModelLoadError(f"weights= {str(weights)!r} is for the foundation models of "
                             f"`equivit encoders` (uni_v1, kaiko-vits16...), not for "
                             f"{str(source)!r}")
    if is_encoder(str(source)) and not isinstance(source, os.PathLike):
        if model_kwargs:
            raise ModelLoadError(f"{source} is built as its card builds it: it takes no "
                                 f"model arguments ({sorted(model_kwargs)})")
        net, info = _from_encoder(str(source), weights, num_classes=num_classes,
                                  class_names=class_names, img_size=img_size, seed=seed)
    elif is_checkpoint_path(source):
        net, info = _from_checkpoint(Path(source), num_classes=num_classes,
                                     class_names=class_names, img_size=img_size,
                                     map_location=map_location, overrides=model_kwargs)
    else:
        net, info = _from_name(str(source), num_classes=num_classes, class_names=class_names,
                               img_size=img_size, seed=seed, overrides=model_kwargs)
    if require_class_names and info.class_names is None:
        raise ModelLoadError(
            f"{info.source} has no class names, so its predictions cannot be labelled; give "
            f"class_names=[...] or re-save it with save_checkpoint(..., class_names=[...])")
    return net, info


def load_encoder(source: str | os.PathLike, *, weights: str | os.PathLike | None = None,
                 d4_average: bool = False, seed: int | None = None,
                 map_location: str | torch.device = "cpu") -> tuple[PooledEncoder, ModelInfo]:
    """A tile encoder for the frameworks that take a module returning ``(B, D)``: any
    :func:`load_model` source (a registered name is built without a head) wrapped in
    :class:`~.embedding.PooledEncoder`, in eval mode, whose output is float32 (not bf16/fp16)
    under any autocast (what frameworks that store ``output.cpu().numpy()`` need).

    Shapes:
        ``(B, 3, S, S)`` tiles normalised with ``info.mean``/``info.std``
        (:func:`~.preprocessing.tile_transform` makes them) -> float32
        ``(B, info.embed_dim)``.

    Raises:
        ModelLoadError: as :func:`load_model`.
    """
    named = not is_encoder(str(source)) and not is_checkpoint_path(source) \
        and not is_hub_name(source)
    net, info = load_model(source, weights=weights, seed=seed, map_location=map_location,
                           **({"num_classes": 0} if named else {}))
    return PooledEncoder(net, d4_average=d4_average, upcast=True).eval(), info
