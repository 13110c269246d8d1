"""Export a model to TorchScript or ONNX, checked against the eager model before the file
appears.

:func:`export_model` takes any :func:`~equivit_plugin.models.load_model` source (a registered
name, a checkpoint such as the bundle's ``models/model.pt`` or a distilled student with its
projection, a foundation model with its weights), makes its output the logits (a classifier)
or the pooled features ``(B, D)`` (an encoder), traces it with the batch as a dynamic axis and
checks the file it wrote, run the way a deployment runs it (``torch.jit.load``; onnxruntime on
the CPU), on real H&E tiles and on noise:

- *parity*: the exported output equals the eager output within ``tolerance``;
- *invariance kept*: under the 8 rotations/flips of the tiles the exported output moves no
  more than the eager one does, plus ``tolerance`` (an exactly invariant model stays exactly
  invariant in the exported graph).

Only then is the file renamed into place. What the file computes travels inside it (the
TorchScript extra file ``equivit.json``, the ONNX metadata entry ``equivit``): the output, the
input size, the normalisation its inputs need, the class names. :func:`load_exported` reads
either back as ``(module, ModelInfo)``, so the bundle's ``configs/inference.json`` runs an
exported file as it runs a checkpoint.

ONNX export uses torch's TorchScript-based exporter (``dynamo=False``): the dynamo exporter
needs ``onnxscript`` and its float64 path is not needed here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .equivariance.transforms import D4_TRANSFORMS
from .models import (
    ModelInfo,
    PooledEncoder,
    file_sha256,
    load_model,
    normalise_batch,
)
from .utils.atomic import atomic_path
from .utils.demo_data import demo_he_image
from .version import __version__

__all__ = ["DEFAULT_OPSET", "DEFAULT_TOLERANCE", "EXPORT_FORMATS", "EXPORT_OUTPUTS",
           "METADATA_KEY", "ExportError", "ExportResult", "OnnxRuntimeModule", "check_tiles",
           "export_format_for",
           "export_model", "is_exported_path", "load_exported"]

EXPORT_FORMATS: dict[str, str] = {"torchscript": ".ts", "onnx": ".onnx"}
"""Export format -> the file suffix it is written with."""

EXPORT_OUTPUTS = ("logits", "features")
"""What an exported file computes: a classifier's logits ``(B, K)`` or the pooled features
``(B, D)`` (:func:`~equivit_plugin.models.pooled_embedding`)."""

DEFAULT_OPSET = 17
"""ONNX opset: the first with ``LayerNormalization``, supported by onnxruntime >= 1.14 and
TensorRT 8.6."""

DEFAULT_TOLERANCE = 1e-4
"""Largest absolute difference allowed between the exported and the eager output (and added
to the eager model's own D4 variation for the invariance check)."""

METADATA_KEY = "equivit"
"""Name of the metadata inside an exported file (TorchScript: ``equivit.json``)."""

METADATA_VERSION = 1
INPUT_NAME = "image"
_TRACE_BATCH, _CHECK_BATCH = 2, 3  # checked at another batch size than traced: dynamic axis
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ExportError(ValueError):
    """A model cannot be exported, or its exported file does not compute what the model does;
    the message names the source (or the file) and says why."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote and measured.

    Attributes:
        path: the exported file.
        format: ``"torchscript"`` or ``"onnx"``.
        output: ``"logits"`` or ``"features"``.
        output_dim: ``K`` or ``D``: the exported output is ``(B, output_dim)``.
        info: the eager model's :class:`~equivit_plugin.models.ModelInfo`.
        parity: max absolute difference exported vs eager on the check tiles (``nan`` when
            not verified).
        eager_invariance: max absolute change of the eager output under the 7 non-trivial
            rotations/flips of the check tiles.
        exported_invariance: the same for the exported file (``nan`` when not verified).
        tolerance: the bound both checks used.
        seconds: time to export and check.
    """

    path: Path
    format: str
    output: str
    output_dim: int
    info: ModelInfo
    parity: float
    eager_invariance: float
    exported_invariance: float
    tolerance: float
    seconds: float

    @property
    def verified(self) -> bool:
        return not math.isnan(self.parity)

    @property
    def invariant(self) -> bool:
        """The exported output is invariant to rotations/flips within ``tolerance``."""
        return self.verified and self.exported_invariance <= self.tolerance

    def summary(self) -> str:
        """What was written and measured, a few lines for people."""
        info = self.info
        weights = "random weights" if info.random_weights else "trained weights"
        size = self.path.stat().st_size / 1e6 if self.path.is_file() else math.nan
        lines = [f"exported {info.name} ({self.output} (B, {self.output_dim}) from (B, 3, "
                 f"{info.img_size}, {info.img_size}), {weights}) to {self.path} "
                 f"({self.format}, {size:.1f} MB) in {self.seconds:.1f} s"]
        if not self.verified:
            lines.append("not checked (verify=False)")
        else:
            invariant = "invariant" if self.invariant else "not invariant (nor is the model)"
            lines += [f"exported vs eager: max |difference| {self.parity:.2e} (tolerance "
                      f"{self.tolerance:g})",
                      f"under the 8 rotations/flips: exported moves "
                      f"{self.exported_invariance:.2e}, eager {self.eager_invariance:.2e}: "
                      f"{invariant}"]
        mean = ", ".join(f"{v:g}" for v in info.mean)
        std = ", ".join(f"{v:g}" for v in info.std)
        lines.append(f"inputs: RGB in [0, 1], normalised with mean ({mean}) and std ({std})")
        return "\n".join(lines)


def is_exported_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an exported file by its suffix (``.ts``, ``.onnx``)."""
    return Path(str(path)).suffix.lower() in EXPORT_FORMATS.values()


def export_format_for(out: str | os.PathLike, format: str | None = None) -> str:
    """The export format of ``out``: ``format`` when given (it must agree with a known
    suffix), else the suffix's (``.onnx`` -> ``"onnx"``, ``.ts`` -> ``"torchscript"``).

    Raises:
        ExportError: unknown format, or one the suffix contradicts, or neither given.
    """
    suffix = Path(str(out)).suffix.lower()
    by_suffix = next((name for name, ext in EXPORT_FORMATS.items() if ext == suffix), None)
    if format is None:
        if by_suffix is None:
            raise ExportError(f"out= {str(out)!r}: give format= ({' or '.join(EXPORT_FORMATS)})"
                              f" or a file ending in {' or '.join(EXPORT_FORMATS.values())}")
        return by_suffix
    if format not in EXPORT_FORMATS:
        raise ExportError(f"format= {format!r}: expected one of {list(EXPORT_FORMATS)}")
    if by_suffix is not None and by_suffix != format:
        raise ExportError(f"out= {str(out)!r} is a {by_suffix} file name, but format= "
                          f"{format!r}; use {EXPORT_FORMATS[format]}")
    return format


class OnnxRuntimeModule(nn.Module):
    """An exported ONNX file run by onnxruntime, as a module: ``(B, 3, S, S)`` float32 ->
    ``(B, K)`` or ``(B, D)`` on the input's device.

    Args:
        path: the ``.onnx`` file.
        providers: onnxruntime execution providers (default: CUDA when torch sees a GPU and
            onnxruntime offers it, else the CPU).
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None) -> None:
        super().__init__()
        onnxruntime = _import("onnxruntime", "run ONNX files")
        if providers is None:
            available = onnxruntime.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider",) if p in available
                         and torch.cuda.is_available()] + ["CPUExecutionProvider"]
        self.path = Path(path)
        self.session = onnxruntime.InferenceSession(str(path), providers=list(providers))
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(out).to(x.device)

    def extra_repr(self) -> str:
        return f"{self.path}, providers={self.session.get_providers()}"


def _import(name: str, what: str) -> Any:
    try:
        return __import__(name)
    except ImportError as error:
        raise ExportError(f"to {what} install {name}: pip install 'equivit-plugin[export]'"
                          ) from error


def _exported_module(net: nn.Module, output: str) -> nn.Module:
    # Features are the pooled embedding every door reads (forward_head(pre_logits=True)), so
    # a classifier checkpoint can be exported as an encoder too.
    return (PooledEncoder(net) if output == "features" else net).eval()


def check_tiles(info: ModelInfo, count: int, offset: int = 0) -> torch.Tensor:
    """``count`` normalised ``(count, 3, S, S)`` tiles: crops of TIAToolbox's packaged real
    H&E image (taken along its diagonal from the ``offset``-th) and, last, one of uniform
    noise; what exports are traced and checked on."""
    import cv2
    import numpy as np

    image = demo_he_image()
    size = int(info.img_size)
    if size > min(image.shape[:2]) // 2:
        image = cv2.resize(image, (2 * size, 2 * size), interpolation=cv2.INTER_CUBIC)
    span = image.shape[0] - size
    starts = [round(span * (offset + i) / (offset + count)) for i in range(count - 1)]
    crops = [image[s:s + size, s:s + size] for s in starts]
    noise = np.random.default_rng(offset).integers(0, 256, (size, size, 3), dtype=np.uint8)
    batch = torch.from_numpy(np.stack([*crops, noise]))
    return normalise_batch(batch, info.mean, info.std)


def _d4_variation(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  reference: torch.Tensor) -> float:
    return max(float((run(transform(x).contiguous()) - reference).abs().max())
               for _, transform in D4_TRANSFORMS[1:])


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    # Tracing warns about Python values it bakes in (shapes, the kernel cache's branch) and
    # the TorchScript-based ONNX exporter about its own deprecation; both are expected here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _metadata(info: ModelInfo, format: str, output: str, output_dim: int,
              opset: int | None) -> dict[str, Any]:
    return {
        "format_version": METADATA_VERSION, "format": format, "output": output,
        "input_name": INPUT_NAME, "output_name": output,
        "input_shape": ["batch", 3, int(info.img_size), int(info.img_size)],
        "output_dim": int(output_dim),
        "model_name": info.name, "source": str(info.source),
        "checkpoint_sha256": info.checkpoint_sha256, "random_weights": bool(info.random_weights),
        "num_classes": int(info.num_classes),
        "class_names": list(info.class_names) if info.class_names is not None else None,
        "img_size": int(info.img_size), "embed_dim": int(info.embed_dim),
        "mean": [float(v) for v in info.mean], "std": [float(v) for v in info.std],
        "embedding": info.embedding, "model_kwargs": dict(info.model_kwargs),
        "opset": opset, "torch": torch.__version__, "equivit_plugin": __version__,
    }


def _write_torchscript(module: nn.Module, example: torch.Tensor, path: Path,
                       metadata: dict[str, Any]) -> None:
    with torch.no_grad(), _quiet_tracing():
        traced = torch.jit.trace(module, example, check_trace=False)
    torch.jit.save(traced, str(path),
                   _extra_files={f"{METADATA_KEY}.json": json.dumps(metadata, default=str)})


def _write_onnx(module: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, Any],
                opset: int) -> None:
    onnx = _import("onnx", "write ONNX files")
    output = metadata["output_name"]
    with torch.no_grad(), _quiet_tracing():
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[output],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, output: {0: "batch"}})
    graph = onnx.load(str(path))
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, default=str)
    onnx.save(graph, str(path))


def _run_file(path: Path, format: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if format == "onnx":
        return OnnxRuntimeModule(path, providers=["CPUExecutionProvider"])
    return torch.jit.load(str(path), map_location="cpu")


def export_model(source: str | os.PathLike, out: str | os.PathLike, format: str | None = None,
                 *, weights: str | os.PathLike | None = None, output: str | None = None,
                 opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE,
                 verify: bool = True, seed: int | None = 0,
                 dtype: str = "float32") -> ExportResult:
    """Export ``source`` to ``out`` and check the written file against the eager model.

    Args:
        source: any :func:`~equivit_plugin.models.load_model` source: a checkpoint (the
            bundle's ``models/model.pt``, a distilled student), a registered name (random
            weights drawn with ``seed``), a foundation model's name with ``weights``.
        out: the file to write (whole or not at all).
        format: ``"torchscript"`` or ``"onnx"``; default from ``out``'s suffix.
        weights: a foundation model's released weights.
        output: ``"logits"`` or ``"features"``; default ``"logits"`` for a model with a
            classifier head, else ``"features"``.
        opset: ONNX opset version.
        tolerance: bound of both checks (absolute).
        verify: run the checks (ONNX: needs onnxruntime). ``False`` writes unchecked.
        seed: seed of a registered name's random weights.
        dtype: ``"float32"``, or ``"float64"`` (TorchScript only): a graph in which exact
            invariance shows as differences of ~1e-15 rather than float32's ~1e-6.

    Shapes:
        the file maps ``(B, 3, S, S)`` ``dtype`` tiles normalised with ``info.mean``/``.std``
        (``S = info.img_size``, ``B`` any) to ``(B, output_dim)``.

    Raises:
        ExportError: a bad argument, a model that cannot be traced, or a file whose output
            differs from the eager model's by more than ``tolerance`` or that lost the
            model's invariance (nothing is written then).
    """
    started = time.perf_counter()
    format = export_format_for(out, format)
    if output is not None and output not in EXPORT_OUTPUTS:
        raise ExportError(f"output= {output!r}: expected one of {list(EXPORT_OUTPUTS)}")
    if not (tolerance > 0):
        raise ExportError(f"tolerance= {tolerance!r}: expected a positive number")
    if dtype not in _DTYPES:
        raise ExportError(f"dtype= {dtype!r}: expected one of {list(_DTYPES)}")
    if dtype == "float64" and format == "onnx":
        # torch's TorchScript-based ONNX exporter refuses a float64 attention mask.
        raise ExportError("dtype= 'float64' is for TorchScript; ONNX files are float32")
    try:
        net, info = load_model(source, weights=weights, seed=seed)
    except ValueError as error:  # ModelLoadError: unknown, missing or foreign source
        raise ExportError(f"source= {str(source)!r}: {error}") from error
    if output is None:
        output = "logits" if info.num_classes else "features"
    if output == "logits" and not info.num_classes:
        raise ExportError(f"output='logits': {info.source} has no classifier head; export its "
                          f"features (output='features')")
    module = _exported_module(net, output).to(_DTYPES[dtype])
    example = check_tiles(info, _TRACE_BATCH).to(_DTYPES[dtype])
    check = check_tiles(info, _CHECK_BATCH, 1).to(_DTYPES[dtype])
    with torch.no_grad():
        expected = module(check)
        eager_invariance = _d4_variation(module, check, expected)
    output_dim = int(expected.shape[1])
    metadata = {**_metadata(info, format, output, output_dim,
                            opset if format == "onnx" else None), "dtype": dtype}
    parity = exported_invariance = math.nan
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        try:
            if format == "onnx":
                _write_onnx(module, example, tmp, metadata, opset)
            else:
                _write_torchscript(module, example, tmp, metadata)
        except ExportError:
            raise
        except Exception as error:  # tracing or the exporter failed: say where, in one line
            first = (str(error).strip().splitlines() or [""])[0]
            raise ExportError(f"{info.source}: cannot export to {format} "
                              f"({type(error).__name__}: {first})") from error
        if verify:
            run = _run_file(tmp, format)
            with torch.no_grad():
                got = run(check)
                parity = float((got - expected).abs().max())
                exported_invariance = _d4_variation(run, check, got)
            if not parity <= tolerance:
                raise ExportError(f"{info.source}: the exported {format} output differs from "
                                  f"the model's by {parity:.3g} (tolerance {tolerance:g}); "
                                  f"nothing written")
            if not exported_invariance <= eager_invariance + tolerance:
                raise ExportError(
                    f"{info.source}: the exported {format} output moves by "
                    f"{exported_invariance:.3g} under rotations/flips, the model's by "
                    f"{eager_invariance:.3g} (tolerance {tolerance:g}); nothing written")
    return ExportResult(path=out, format=format, output=output, output_dim=output_dim,
                        info=info, parity=parity, eager_invariance=eager_invariance,
                        exported_invariance=exported_invariance, tolerance=float(tolerance),
                        seconds=time.perf_counter() - started)


def _read_metadata(path: Path) -> tuple[str, dict[str, Any] | None, Any]:
    """``(format, metadata or None, runnable)`` of an exported file."""
    if path.suffix.lower() == EXPORT_FORMATS["onnx"]:
        onnx = _import("onnx", "read ONNX files")
        graph = onnx.load(str(path), load_external_data=False)
        props = {entry.key: entry.value for entry in graph.metadata_props}
        text = props.get(METADATA_KEY)
        return "onnx", json.loads(text) if text else None, None
    extra = {f"{METADATA_KEY}.json": ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    text = extra[f"{METADATA_KEY}.json"]
    return "torchscript", json.loads(text) if text else None, module


def load_exported(path: str | os.PathLike, *, providers: Sequence[str] | None = None,
                  require_class_names: bool = False) -> tuple[nn.Module, ModelInfo]:
    """Read a file written by :func:`export_model` back as ``(module, ModelInfo)``.

    The module is the TorchScript module, or an :class:`OnnxRuntimeModule` (``providers``);
    ``info`` is what the file says of itself: ``num_classes``/``class_names`` for a logits
    file (``0``/``None`` for a features file, whose ``embed_dim`` is its output width), the
    input size, the normalisation, ``checkpoint`` the file and ``checkpoint_sha256`` its hash,
    ``extra["exported"]`` the whole metadata.

    Raises:
        FileNotFoundError: no such file.
        ExportError: not an exported file of this package (no ``equivit`` metadata: exported
            by something else, e.g. MONAI's ``ckpt_export``), or a logits file without class
            names when ``require_class_names``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    if not is_exported_path(path):
        raise ExportError(f"{path}: expected an exported model ending in "
                          f"{' or '.join(EXPORT_FORMATS.values())}")
    try:
        format, meta, module = _read_metadata(path)
    except ExportError:
        raise
    except Exception as error:
        raise ExportError(f"{path} is not a readable {path.suffix} file: {error}") from error
    if meta is None:
        raise ExportError(f"{path} has no '{METADATA_KEY}' metadata, so its input size, "
                          f"normalisation and classes are unknown; export it with `equivit "
                          f"export` (or the bundle's configs/export.json)")
    if module is None:
        module = OnnxRuntimeModule(path, providers=providers)
    logits = meta["output"] == "logits"
    names = tuple(meta["class_names"]) if logits and meta.get("class_names") else None
    if require_class_names and names is None:
        raise ExportError(f"{path} computes {meta['output']} without class names, so its "
                          f"outputs cannot be labelled; export a classifier checkpoint")
    info = ModelInfo(
        name=str(meta["model_name"]), source=str(path),
        num_classes=int(meta["num_classes"]) if logits else 0, class_names=names,
        img_size=int(meta["img_size"]),
        embed_dim=int(meta["embed_dim"] if logits else meta["output_dim"]),
        random_weights=bool(meta["random_weights"]), checkpoint=str(path),
        checkpoint_sha256=file_sha256(path), model_kwargs=dict(meta.get("model_kwargs") or {}),
        extra={"exported": meta}, mean=tuple(meta["mean"]), std=tuple(meta["std"]),
        embedding=str(meta.get("embedding", "pooled")))
    return module.eval(), info
