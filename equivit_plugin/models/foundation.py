"""Build a registered foundation model (:mod:`.encoders`) from its released weights.

``load_foundation_model("uni_v1", "pytorch_model.bin")`` gives a :class:`FoundationEncoder`:
the backbone exactly as its card builds it, with the card's embedding rule behind timm's
contract (``forward_features`` -> tokens, ``forward_head(..., pre_logits=True)`` -> the
embedding), so every door of this package (feature extraction, the rotation report,
distillation, TIAToolbox) embeds tiles the model's own way. Nothing is downloaded: timm state
dicts load through timm, ``transformers`` folders through ``transformers`` (offline), and a
model with a package of its own through that package.

A file that is not the model's gets one line naming the file and what was expected: keys
that are missing or left over, shapes that differ, a ``config.json`` of another architecture,
a truncated file.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import load_state_dict
from torch import nn

from .checkpoint import file_sha256
from .encoders import EncoderSpec, Ref, get_encoder

__all__ = ["RANDOM_WEIGHTS", "FoundationEncoder", "FoundationLoadError", "embed_tokens",
           "load_foundation_model", "weights_sha256"]

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"
"""``weights=`` value that builds the architecture with random weights (tests, timing)."""


class FoundationLoadError(ValueError):
    """A foundation model cannot be built from what was given; one line says why."""


def embed_tokens(tokens: torch.Tensor, rule: str, num_prefix_tokens: int) -> torch.Tensor:
    """A tile's embedding from the backbone's output.

    Args:
        tokens: ``(B, N, C)`` output tokens (class token first, then ``num_prefix_tokens - 1``
            registers, then the patch tokens), or ``(B, D)`` for ``"encode_image"``.
        rule: a key of :data:`~.encoders.EMBEDDING_RULES`.
        num_prefix_tokens: the class token and the registers.

    Returns:
        ``(B, C)``, or ``(B, 2C)`` for ``"cls+mean"``.
    """
    if rule == "encode_image":
        return tokens
    if rule in ("cls", "pooler_output"):
        return tokens[:, 0]
    if rule == "cls+mean":
        return torch.cat([tokens[:, 0], tokens[:, num_prefix_tokens:].mean(1)], dim=-1)
    raise ValueError(f"unknown embedding rule {rule!r}")


class FoundationEncoder(nn.Module):
    """A foundation model's backbone and its embedding rule, behind timm's contract.

    Args:
        backbone: the model as its card builds it (timm ``VisionTransformer``,
            ``transformers`` model, or the package's model).
        spec: its registry entry.

    Shapes:
        ``forward_features``: ``(B, 3, H, W)`` normalised tiles -> ``(B, N, C)`` output
        tokens (timm: after the final norm; ``transformers``: ``last_hidden_state``);
        ``forward_head(tokens, pre_logits=True)`` and ``forward``: -> ``(B, D)`` embedding,
        ``D = spec.embed_dim``.
    """

    def __init__(self, backbone: nn.Module, spec: EncoderSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.embedding = spec.embedding
        self.num_prefix_tokens = spec.num_prefix_tokens
        self.num_features = self.embed_dim = spec.embed_dim
        self.num_classes = 0

    @property
    def timm_backbone(self) -> nn.Module | None:
        """The backbone when it is a timm model (its blocks can start a student), else
        ``None``."""
        return self.backbone if self.spec.layout == "timm" else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.layout == "timm":
            return self.backbone.forward_features(x)
        if self.spec.layout == "transformers":
            return self.backbone(pixel_values=x).last_hidden_state
        return self.backbone.encode_image(x, proj_contrast=False, normalize=False)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return embed_tokens(x, self.embedding, self.num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), pre_logits=True)


def weights_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a weights file (:func:`~.checkpoint.file_sha256`), or of a folder's
    ``config.json``, weight and code files (their names and hashes, in name order)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in
                       {".json", ".safetensors", ".bin", ".pth", ".pt", ".py"}):
        digest.update(f"{file.name}\n{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _resolved(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, Ref):
            module, _, name = value.path.rpartition(".")
            value = getattr(importlib.import_module(module), name)
        out[key] = value
    return out


def _first_sentence(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text.split(". ")[0].rstrip(".")


def _examples(keys: set[str] | list[str], n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _timm_file(spec: EncoderSpec, weights: Path) -> Path:
    if weights.is_file():
        return weights
    for name in spec.weights_files:
        if (weights / name).is_file():
            return weights / name
    raise FoundationLoadError(
        f"{weights}: no {' or '.join(spec.weights_files)} in this folder; {spec.name} is "
        f"released as a timm state dict ({spec.weights_url})")


def _read_state_dict(file: Path, spec: EncoderSpec) -> dict[str, torch.Tensor]:
    try:
        state = load_state_dict(str(file), weights_only=True)
    except Exception as error:  # torch, pickle, zip and safetensors each raise their own
        first = _first_sentence(error)
        raise FoundationLoadError(
            f"{file}: cannot read it as a state dict (truncated, or not a torch/safetensors "
            f"file: {type(error).__name__}: {first}); {spec.name} expects a timm state dict "
            f"({spec.weights_url})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise FoundationLoadError(f"{file}: not a state dict of tensors; {spec.name} expects a "
                                  f"timm state dict ({spec.weights_url})")
    # One dtype for every door: released half-precision weights run in float32 (autocast
    # gives the speed back where it is asked for).
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _mismatch(missing: set[str], unexpected: set[str], shapes: Mapping[str, Any],
              spec: EncoderSpec) -> str:
    """``"3 missing keys (a, b, c); 2 shapes differ (k: (..) in the file, (..) in NAME)"``, or
    ``""`` when the weights fit."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_examples(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_examples(unexpected)})")
    if shapes:
        first = sorted(shapes)[0]
        detail = shapes[first]
        detail = (f"{first}: {detail[0]} in the file, {detail[1]} in {spec.name}"
                  if detail else first)
        problems.append(f"{len(shapes)} shapes differ ({detail})")
    return "; ".join(problems)


def _check_keys(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor],
                file: Path, spec: EncoderSpec) -> None:
    shapes = {k: (tuple(state[k].shape), tuple(own[k].shape)) for k in set(own) & set(state)
              if tuple(state[k].shape) != tuple(own[k].shape)}
    problems = _mismatch(set(own) - set(state), set(state) - set(own), shapes, spec)
    if problems:
        raise FoundationLoadError(f"{file}: not {spec.name}'s weights ({spec.architecture} "
                                  f"with {_kwargs_text(spec)}): {problems}")


def _kwargs_text(spec: EncoderSpec) -> str:
    return ", ".join(f"{k}={v}" for k, v in spec.kwargs.items())


def _build_timm(spec: EncoderSpec, weights: Path | None) -> nn.Module:
    kwargs = _resolved(spec.kwargs)
    if weights is None:
        return timm.create_model(spec.architecture, **kwargs)
    file = _timm_file(spec, weights)
    state = _read_state_dict(file, spec)
    # Built without initialising (the weights replace it): a giant model loads in seconds and
    # needs one copy of its weights in memory, not two.
    with torch.device("meta"):
        skeleton = timm.create_model(spec.architecture, **kwargs)
    _check_keys(state, skeleton.state_dict(), file, spec)
    skeleton.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*skeleton.parameters(), *skeleton.buffers())):
        # A buffer that is not in the state dict (computed at construction): build it for real.
        net = timm.create_model(spec.architecture, **kwargs)
        net.load_state_dict(state, strict=True)
        return net
    return skeleton


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise FoundationLoadError(
            "this model is a Hugging Face transformers model: pip install "
            "'equivit-plugin[hf]' (or transformers)") from error
    return transformers


def _transformers_folder(spec: EncoderSpec, weights: Path) -> Path:
    folder = weights.parent if weights.is_file() else weights
    if not (folder / "config.json").is_file():
        raise FoundationLoadError(
            f"{folder}: no config.json; {spec.name} loads from a transformers folder "
            f"(config.json + {' or '.join(spec.weights_files)}, as on {spec.weights_url})")
    if not any((folder / name).is_file() for name in spec.weights_files):
        raise FoundationLoadError(
            f"{folder}: config.json but no {' or '.join(spec.weights_files)} beside it "
            f"({spec.weights_url})")
    return folder


def _check_config(config: Any, spec: EncoderSpec, folder: Path) -> None:
    wrong = [f"{key} {getattr(config, key, None)!r} (expected {value!r})"
             for key, value in spec.config.items() if getattr(config, key, None) != value]
    if wrong:
        raise FoundationLoadError(f"{folder}/config.json is not {spec.name}'s: "
                                  f"{', '.join(wrong)}")


def _build_transformers(spec: EncoderSpec, weights: Path | None) -> nn.Module:
    transformers = _transformers()
    if weights is None:
        raise FoundationLoadError(
            f"{spec.name} is a transformers model: its architecture is in its folder's "
            f"config.json, so it needs weights= (the folder; {spec.weights_url})")
    folder = _transformers_folder(spec, weights)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the load report is checked below instead
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=spec.trust_remote_code)
        _check_config(config, spec, folder)
        model, info = transformers.AutoModel.from_pretrained(
            folder, local_files_only=True, trust_remote_code=spec.trust_remote_code,
            output_loading_info=True, **dict(spec.kwargs))
    except FoundationLoadError:
        raise
    except Exception as error:  # OSError, ValueError, safetensors' and torch's own errors
        first = _first_sentence(error)
        raise FoundationLoadError(f"{folder}: transformers cannot load it as {spec.name} "
                                  f"({type(error).__name__}: {first})") from error
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    # transformers reports mismatched keys as (key, shape in the file, shape in the model)
    shapes = {str(entry[0]) if isinstance(entry, tuple) else str(entry):
              tuple(entry[1:3]) if isinstance(entry, tuple) else ()
              for entry in info.get("mismatched_keys") or ()}
    problems = _mismatch(set(info.get("missing_keys") or ()),
                         set(info.get("unexpected_keys") or ()) - _unused_by_design(spec),
                         shapes, spec)
    if problems:
        raise FoundationLoadError(f"{folder}: not {spec.name}'s weights: {problems}")
    return model.float()


def _unused_by_design(spec: EncoderSpec) -> set[str]:
    # The card builds ViTModel without its pooler (add_pooling_layer=False): a released
    # pooler's weights are not used, by design.
    if spec.kwargs.get("add_pooling_layer") is False:
        return {"pooler.dense.weight", "pooler.dense.bias"}
    return set()


def _build_package(spec: EncoderSpec, weights: Path | None) -> nn.Module:
    package = spec.requires.split()[0]
    try:
        module = importlib.import_module(f"{package}.open_clip_custom")
    except ImportError as error:
        raise FoundationLoadError(f"{spec.name} needs the package {spec.requires}") from error
    if weights is None:
        raise FoundationLoadError(f"{spec.name} needs weights= ({spec.weights_url})")
    if not weights.is_file():
        raise FoundationLoadError(f"{weights}: not a file; {spec.name} expects "
                                  f"{spec.weights_url}")
    try:
        model, _ = module.create_model_from_pretrained(spec.architecture,
                                                       checkpoint_path=str(weights))
    except Exception as error:  # the package's own errors
        raise FoundationLoadError(f"{weights}: {package} cannot load it as {spec.name} "
                                  f"({type(error).__name__}: {error})") from error
    return model


_BUILDERS = {"timm": _build_timm, "transformers": _build_transformers,
             "package": _build_package}


def _probe(encoder: FoundationEncoder, spec: EncoderSpec, source: str) -> None:
    """One forward pass at the input size: the token count says how many prefix tokens the
    built model has (registers included), and for ``pooler_output`` that it is the final-norm
    class token this package reads."""
    if spec.layout == "package":
        return
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, spec.input_size, spec.input_size, generator=generator)
    with torch.inference_mode():
        if spec.layout == "transformers":
            output = encoder.backbone(pixel_values=x)
            tokens = output.last_hidden_state
            pooled = getattr(output, "pooler_output", None)
            if spec.embedding == "pooler_output" and (
                    pooled is None or not torch.allclose(pooled, tokens[:, 0], atol=1e-5)):
                raise FoundationLoadError(
                    f"{source}: this model's pooler_output is not its final-norm class "
                    f"token, which {spec.name}'s rule reads; not {spec.name}'s code")
        else:
            tokens = encoder.forward_features(x)
    grid = (spec.input_size // spec.patch_size) ** 2
    prefix = tokens.shape[1] - grid
    if prefix != spec.num_prefix_tokens or tokens.shape[-1] != spec.width:
        raise FoundationLoadError(
            f"{source}: {tokens.shape[1]} tokens of width {tokens.shape[-1]} for a "
            f"{spec.input_size} px tile, but {spec.name} has {spec.num_prefix_tokens} prefix "
            f"tokens + {grid} patches of width {spec.width}")


def load_foundation_model(spec: EncoderSpec | str, weights: str | os.PathLike | None
                          ) -> FoundationEncoder:
    """A registered foundation model, built as its card builds it, in eval mode.

    Args:
        spec: the entry or its registry name (``"uni_v1"``, ``"kaiko-vits16"``...).
        weights: the released weights: a file (timm state dict, or any file of a
            ``transformers`` folder) or a folder; :data:`RANDOM_WEIGHTS` (``"random"``) builds
            a timm architecture with random weights.

    Returns:
        A :class:`FoundationEncoder` (``(B, 3, T, T)`` tiles normalised with
        ``spec.mean``/``spec.std`` -> ``(B, spec.embed_dim)``).

    Raises:
        FoundationLoadError: no such file, a file or folder that is not the model's, a
            missing package (one line naming the file and what was expected).
    """
    if isinstance(spec, str):
        try:
            spec = get_encoder(spec)
        except KeyError as error:
            raise FoundationLoadError(str(error.args[0])) from None
    path: Path | None = None
    if weights is None:
        raise FoundationLoadError(f"{spec.name} needs weights= (the released weights: "
                                  f"{spec.weights_url}; or {RANDOM_WEIGHTS!r} for random "
                                  f"weights)")
    if str(weights) != RANDOM_WEIGHTS:
        path = Path(weights).expanduser()
        if not path.exists():
            raise FoundationLoadError(f"{path}: no such file or folder ({spec.name}'s "
                                      f"weights: {spec.weights_url})")
    backbone = _BUILDERS[spec.layout](spec, path)
    encoder = FoundationEncoder(backbone.eval(), spec).eval()
    _probe(encoder, spec, str(path or spec.name))
    logger.info("%s: loaded from %s", spec.name, path or "random weights")
    return encoder

