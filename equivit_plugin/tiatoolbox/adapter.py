"""Equi-ViT models as TIAToolbox ``ModelABC`` engines' models (tiatoolbox 2.1.x).

``EquiViTClassifier`` gives softmax probabilities (``class_dict`` from the checkpoint's class
names) to ``PatchPredictor``; ``EquiViTEncoder`` gives the pooled embedding
(``forward_head(forward_features(x), pre_logits=True)``) to ``DeepFeatureExtractor``. Both
are built from a registered model name (random weights) or a self-describing checkpoint
(``equivit_plugin.models.save_checkpoint``, e.g. the bundle's ``models/model.pt``)::

    from tiatoolbox.models.engine.patch_predictor import PatchPredictor
    model = EquiViTClassifier.from_checkpoint("monai_bundle/models/model.pt")
    PatchPredictor(model=model, batch_size=32).run(
        images=[slide], patch_mode=False, ioconfig=make_ioconfig(), save_dir="out",
        output_type="zarr")

Engine quirks handled here (tiatoolbox 2.1.3):

* a custom model gets no default ioconfig: pass ``ioconfig=make_ioconfig()`` (also kept on
  the adapter as ``.ioconfig``) or ``patch_input_shape`` + ``input_resolutions`` to ``run``;
* the two engines read ``infer_batch``'s return differently (see :class:`FeatureBatch`):
  the encoder returns one object that satisfies both.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig
from tiatoolbox.models.models_abc import ModelABC
from torch import nn

from ..models import (
    ModelInfo,
    is_checkpoint_path,
    is_encoder,
    load_model,
    normalise_tile,
    pooled_embedding,
)
from ..utils.precision import autocast_dtype, canonical_precision

__all__ = ["EquiViTClassifier", "EquiViTEncoder", "FeatureBatch", "make_ioconfig"]


def make_ioconfig(patch_size: int = 224, resolution: float = 0.5, units: str = "mpp",
                  stride: int | None = None) -> IOPatchPredictorConfig:
    """``IOPatchPredictorConfig`` for a square ``patch_size`` input read at ``resolution``
    ``units`` (default 224x224 at 0.5 um/px), stride ``stride`` (default: ``patch_size``,
    non-overlapping)."""
    if patch_size <= 0 or (stride is not None and stride <= 0):
        raise ValueError(f"patch_size and stride must be positive, got {patch_size}, {stride}")
    stride = patch_size if stride is None else stride
    return IOPatchPredictorConfig(
        input_resolutions=[{"units": units, "resolution": resolution}],
        patch_input_shape=(patch_size, patch_size), stride_shape=(stride, stride))


class FeatureBatch:
    """A ``(B, D)`` batch of features that satisfies both of TIAToolbox's reads of
    ``infer_batch``'s return (tiatoolbox 2.1.x):

    * patch mode (``EngineABC.infer_patches``) wraps it with ``da.from_array``: it is an
      array (``shape``, ``dtype``, ``__array__``, slicing with slices or tuples of slices);
    * WSI mode (``DeepFeatureExtractor.infer_wsi``) treats it as the list of a model's outputs
      and takes output ``[0]``: integer index ``0`` is the one output, the whole ``(B, D)``
      batch.

    So an integer index means "output number", never "row": ``[0]`` is the batch and any other
    integer raises ``IndexError`` (a plain array would silently give ``(D,)`` rows in WSI
    mode). Use ``.array[i]`` or slices for rows.
    """

    def __init__(self, array: np.ndarray) -> None:
        self.array = np.asarray(array)
        self._token = uuid.uuid4().hex

    shape = property(lambda self: self.array.shape)
    dtype = property(lambda self: self.array.dtype)
    ndim = property(lambda self: self.array.ndim)
    nbytes = property(lambda self: self.array.nbytes)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if key == 0:
                return self.array
            raise IndexError(f"FeatureBatch has one output (index 0, the whole {self.shape} "
                             f"batch), got index {key}; use .array[{key}] for a row")
        return self.array[key]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.array if dtype is None else self.array.astype(dtype)

    def __dask_tokenize__(self) -> str:
        return self._token

    def __repr__(self) -> str:
        return f"FeatureBatch(shape={self.shape}, dtype={self.dtype})"


def _unwrap(model: nn.Module) -> nn.Module:
    """The adapter under ``DataParallel``/DDP (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers."""
    for _ in range(4):
        model = getattr(model, "module", model)
        model = getattr(model, "_orig_mod", model)
    return model


class _EquiViTAdapter(ModelABC):
    """Shared construction and ``infer_batch`` for the classifier and the encoder.

    Args:
        net: a timm model (``forward_features``/``forward_head``).
        info: what describes it (:func:`equivit_plugin.models.load_model`).
        autocast: ``None``/``"fp32"``, ``"bf16"`` or ``"fp16"`` (or a ``torch.dtype``): the
            forward pass runs under ``torch.autocast`` with that dtype.
        channels_last: run in channels-last memory format.
        non_blocking: pinned, asynchronous host-to-device copies on CUDA.
    """

    def __init__(self, net: nn.Module, info: ModelInfo, *,
                 autocast: str | torch.dtype | None = None, channels_last: bool = False,
                 non_blocking: bool = True) -> None:
        super().__init__()
        self.net = net.eval()
        self.info = info
        self.model_name = info.name
        self.class_names = list(info.class_names) if info.class_names is not None else None
        self.class_dict = info.class_dict
        self.img_size = info.img_size
        self.ioconfig = make_ioconfig(info.img_size)
        self.autocast_dtype = autocast_dtype(canonical_precision(autocast, "autocast"))
        self.channels_last = channels_last
        self.non_blocking = non_blocking
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def _check_head(cls, info: ModelInfo) -> None:
        """Hook: the classifier needs a head; the encoder takes any model."""

    @classmethod
    def from_encoder(cls, name: str, weights: str | os.PathLike, *,
                     adapter_kwargs: Mapping[str, Any] | None = None) -> _EquiViTAdapter:
        """A foundation model by name (``uni_v1``, ``kaiko-vits16``...: ``equivit encoders``)
        with its released weights, normalised and pooled as its card says.

        Raises:
            equivit_plugin.models.ModelLoadError: a file or folder that is not the model's.
        """
        net, info = load_model(name, weights=weights)
        cls._check_head(info)
        return cls(net, info, **dict(adapter_kwargs or {}))

    @classmethod
    def from_name(cls, model_name: str, num_classes: int | None = None, *,
                  class_names: Sequence[str] | None = None, img_size: int = 224,
                  seed: int | None = None, adapter_kwargs: Mapping[str, Any] | None = None,
                  **model_kwargs: Any) -> _EquiViTAdapter:
        """A registered timm model (``equivit_ri_*``, ``vit_*``...) with random weights.

        Args:
            model_name: timm registry name.
            num_classes: head size (default ``len(class_names)``; the encoder ignores the head).
            class_names: label names in logit order.
            img_size: input side in pixels.
            seed: seed of the random weights (``None``: the global RNG).
            adapter_kwargs: ``autocast``, ``channels_last``, ``non_blocking``.
            **model_kwargs: more ``timm.create_model`` arguments (``depth``...).
        """
        net, info = load_model(model_name, num_classes=num_classes, class_names=class_names,
                               img_size=img_size, seed=seed, **model_kwargs)
        cls._check_head(info)
        return cls(net, info, **dict(adapter_kwargs or {}))

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, num_classes: int | None = None, *,
                        class_names: Sequence[str] | None = None,
                        adapter_kwargs: Mapping[str, Any] | None = None) -> _EquiViTAdapter:
        """Rebuild and load a checkpoint written by ``equivit_plugin.models.save_checkpoint``
        (e.g. the bundle's ``models/model.pt``).

        Raises:
            equivit_plugin.models.ModelLoadError: missing or foreign file, or ``num_classes``
                / ``class_names`` that differ from the checkpoint's (both named).
        """
        net, info = load_model(path, num_classes=num_classes, class_names=class_names)
        cls._check_head(info)
        return cls(net, info, **dict(adapter_kwargs or {}))

    @classmethod
    def create(cls, source: str | os.PathLike, num_classes: int | None = None, *,
               weights: str | os.PathLike | None = None, **kwargs: Any) -> _EquiViTAdapter:
        """:meth:`from_encoder` for a foundation model's name with ``weights``,
        :meth:`from_checkpoint` for a path (``.pt``/``.pth`` or an existing file), else
        :meth:`from_name`."""
        if weights is not None or is_encoder(str(source)):
            if num_classes is not None:
                raise ValueError(f"{source} is a feature encoder: it takes no num_classes")
            return cls.from_encoder(str(source), weights, **kwargs)
        if is_checkpoint_path(source):
            return cls.from_checkpoint(source, num_classes, **kwargs)
        return cls.from_name(str(source), num_classes, **kwargs)

    # -- TIAToolbox contract -------------------------------------------------------------
    def preproc(self, image: np.ndarray) -> np.ndarray:
        """uint8 ``(H, W, 3)`` -> float32 ``(H, W, 3)`` normalised as the model was trained
        (``info.mean``/``info.std``: ImageNet's for this package's checkpoints, a foundation
        model's card), channels last: the engine collates HWC tiles and ``infer_batch``
        transposes (:func:`equivit_plugin.models.normalise_tile`)."""
        return normalise_tile(image, self.info.mean, self.info.std)

    @staticmethod
    def _run(model: nn.Module, batch_data: np.ndarray | torch.Tensor, device: str) -> torch.Tensor:
        """NHWC batch from the engine -> model output (float32 tensor on the CPU)."""
        adapter = _unwrap(model)
        batch = torch.as_tensor(batch_data)
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected an NHWC batch with 3 channels, got {tuple(batch.shape)}")
        non_blocking = getattr(adapter, "non_blocking", False) and \
            torch.device(device).type == "cuda"
        if non_blocking and batch.device.type == "cpu":
            batch = batch.pin_memory()
        batch = batch.to(device=device, dtype=torch.float32, non_blocking=non_blocking)
        batch = batch.permute(0, 3, 1, 2)
        batch = batch.contiguous(memory_format=torch.channels_last
                                 if getattr(adapter, "channels_last", False)
                                 else torch.contiguous_format)
        dtype = getattr(adapter, "autocast_dtype", None)
        model.eval()
        with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=dtype,
                                                    enabled=dtype is not None):
            output = model(batch)
        return output.float().cpu()


class EquiViTClassifier(_EquiViTAdapter):
    """Softmax probabilities ``(B, K)`` for ``PatchPredictor``; ``postproc`` is argmax.

    Build with :meth:`from_name` (random weights; ``num_classes`` or ``class_names`` required)
    or :meth:`from_checkpoint` (``class_dict`` from the checkpoint's class names).
    """

    @classmethod
    def _check_head(cls, info: ModelInfo) -> None:
        if info.num_classes < 1:
            raise ValueError(
                f"EquiViTClassifier needs a classifier head, but {info.source} has none "
                f"(num_classes=0); give num_classes= or class_names=, or use EquiViTEncoder "
                f"for features")

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised -> ``(B, K)`` probabilities."""
        return torch.softmax(self.net(imgs), dim=-1)

    @staticmethod
    def infer_batch(model: nn.Module, batch_data: np.ndarray | torch.Tensor, *,
                    device: str = "cpu") -> np.ndarray:
        """NHWC float batch -> ``(B, K)`` float32 probabilities (numpy)."""
        return _EquiViTAdapter._run(model, batch_data, device).numpy()

    @staticmethod
    def postproc(image: np.ndarray) -> np.ndarray:
        """Probabilities ``(..., K)`` -> class index ``(...)`` (numpy or dask)."""
        return image.argmax(axis=-1)


class EquiViTEncoder(_EquiViTAdapter):
    """Pooled embedding ``(B, D)`` (``forward_head(..., pre_logits=True)``) for
    ``DeepFeatureExtractor``, in patch and WSI mode."""

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised -> ``(B, D)`` embedding."""
        return pooled_embedding(self.net, imgs)

    @staticmethod
    def infer_batch(model: nn.Module, batch_data: np.ndarray | torch.Tensor, *,
                    device: str = "cpu") -> FeatureBatch:
        """NHWC float batch -> ``(B, D)`` float32 features as a :class:`FeatureBatch`."""
        return FeatureBatch(_EquiViTAdapter._run(model, batch_data, device).numpy())

    @property
    def embed_dim(self) -> int:
        """``D``, the size of the pooled embedding."""
        return self.info.embed_dim
