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
* in patch mode the engine wraps ``infer_batch``'s return with ``da.from_array``, while
  ``DeepFeatureExtractor`` in WSI mode reads ``batch_output[0]``: the encoder returns a
  :class:`FeatureBatch`, which is the ``(B, D)`` array for the first and a one-output
  sequence for the second (a plain array would silently give ``(D,)`` rows in WSI mode).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig
from tiatoolbox.models.models_abc import ModelABC
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

__all__ = ["EquiViTClassifier", "EquiViTEncoder", "FeatureBatch", "make_ioconfig",
           "preprocess_tile"]

_MEAN = np.asarray(IMAGENET_DEFAULT_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_DEFAULT_STD, dtype=np.float32)
_AUTOCAST = {None: None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}


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


def preprocess_tile(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` 0-255 tile (uint8) -> float32 ``(H, W, 3)``: ``/255`` then ImageNet
    mean/std, as the models were trained (``bundle.data``). Channels stay last: the engine
    collates HWC and ``infer_batch`` transposes."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB tile, got shape {image.shape}")
    return ((image.astype(np.float32) / 255.0 - _MEAN) / _STD).astype(np.float32)


class FeatureBatch:
    """A ``(B, D)`` batch of features that satisfies both of TIAToolbox's reads.

    Patch mode wraps it with ``da.from_array`` (array protocol: ``shape``, ``dtype``, slicing
    with tuples of slices); ``DeepFeatureExtractor.infer_wsi`` takes ``batch_output[0]``
    (integer ``0`` gives the whole array, as for a one-output list). Any other index goes to
    the array.
    """

    def __init__(self, array: np.ndarray) -> None:
        self.array = np.asarray(array)
        self._token = uuid.uuid4().hex

    shape = property(lambda self: self.array.shape)
    dtype = property(lambda self: self.array.dtype)
    ndim = property(lambda self: self.array.ndim)
    nbytes = property(lambda self: self.array.nbytes)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, int) and not isinstance(key, bool) and key == 0:
            return self.array
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
    """Shared construction and ``infer_batch`` for the classifier and the encoder."""

    def __init__(self, net: nn.Module, *, model_name: str | None = None,
                 class_names: Sequence[str] | None = None, img_size: int = 224,
                 autocast: str | torch.dtype | None = None, channels_last: bool = False,
                 non_blocking: bool = True) -> None:
        super().__init__()
        self.net = net.eval()
        self.model_name = model_name
        self.class_names = list(class_names) if class_names is not None else None
        self.class_dict = (dict(enumerate(self.class_names))
                           if self.class_names is not None else None)
        self.img_size = img_size
        self.ioconfig = make_ioconfig(img_size)
        if isinstance(autocast, str) or autocast is None:
            if autocast not in _AUTOCAST:
                raise ValueError(f"autocast must be one of {sorted(k for k in _AUTOCAST if k)} "
                                 f"or None, got {autocast!r}")
            autocast = _AUTOCAST[autocast]
        self.autocast_dtype = autocast
        self.channels_last = channels_last
        self.non_blocking = non_blocking
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_name(cls, model_name: str, num_classes: int = 0, *, img_size: int = 224,
                  class_names: Sequence[str] | None = None, adapter_kwargs: Mapping | None = None,
                  **model_kwargs: Any) -> _EquiViTAdapter:
        """A registered timm model (``equivit_ri_*``, ``vit_*``...) with random weights."""
        from equivit_plugin.networks.equivit import create_network

        if class_names is not None and num_classes and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for {num_classes} classes")
        net = create_network(model_name, num_classes, img_size=img_size, **model_kwargs)
        return cls(net, model_name=model_name, class_names=class_names, img_size=img_size,
                   **dict(adapter_kwargs or {}))

    @classmethod
    def from_checkpoint(cls, path: str | Path, num_classes: int | None = None, *,
                        adapter_kwargs: Mapping | None = None) -> _EquiViTAdapter:
        """Rebuild and load a checkpoint written by ``equivit_plugin.models.save_checkpoint``.

        Raises:
            ValueError: ``num_classes`` does not match the checkpoint's head, or the file is
                not such a checkpoint. FileNotFoundError: no file.
        """
        from equivit_plugin.models.checkpoint import model_from_checkpoint

        net, info = model_from_checkpoint(path, num_classes=num_classes)
        names = info.get("class_names")
        head = info.get("model_kwargs", {}).get("num_classes")
        if names is not None and head is not None and len(names) != head:
            raise ValueError(f"{path}: {len(names)} class names {names} for a {head}-class head")
        img_size = int(info.get("model_kwargs", {}).get("img_size", 224))
        return cls(net, model_name=info.get("model_name"), class_names=names,
                   img_size=img_size, **dict(adapter_kwargs or {}))

    @classmethod
    def create(cls, source: str | Path, num_classes: int | None = None,
               **kwargs: Any) -> _EquiViTAdapter:
        """``from_checkpoint`` for a path (``.pt``/``.pth`` or an existing file), else
        ``from_name``."""
        from equivit_plugin.models.checkpoint import is_checkpoint_path

        if is_checkpoint_path(source):
            return cls.from_checkpoint(source, num_classes, **kwargs)
        return cls.from_name(str(source), num_classes or 0, **kwargs)

    # -- TIAToolbox contract -------------------------------------------------------------
    @staticmethod
    def preproc(image: np.ndarray) -> np.ndarray:
        """uint8 ``(H, W, 3)`` -> ImageNet-normalised float32 ``(H, W, 3)``."""
        return preprocess_tile(image)

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

    Build with :meth:`from_name` (random weights) or :meth:`from_checkpoint`
    (``class_dict`` from the checkpoint's class names).
    """

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
        return self.net.forward_head(self.net.forward_features(imgs), pre_logits=True)

    @staticmethod
    def infer_batch(model: nn.Module, batch_data: np.ndarray | torch.Tensor, *,
                    device: str = "cpu") -> FeatureBatch:
        """NHWC float batch -> ``(B, D)`` float32 features as a :class:`FeatureBatch`."""
        return FeatureBatch(_EquiViTAdapter._run(model, batch_data, device).numpy())

    @property
    def embed_dim(self) -> int:
        return int(getattr(self.net, "num_features", getattr(self.net, "embed_dim", 0)))
