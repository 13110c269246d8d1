"""Load weights from local files: a standard timm ViT state dict into an Equi-ViT."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import load_state_dict
from torch import nn

__all__ = ["LoadReport", "load_vit_weights"]

_logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What :func:`load_vit_weights` did with each key."""

    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> reason
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # model keys left at their initialisation

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        lines += [f"resized {k}: {a} -> {b}" for k, (a, b) in self.resized.items()]
        lines += [f"skipped {k}: {why}" for k, why in self.skipped.items()]
        if self.missing:
            lines.append(f"kept initialisation of {len(self.missing)}: {', '.join(self.missing)}")
        return "\n".join(lines)


def _final_norm_renamed(state: dict[str, torch.Tensor],
                        own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``norm.*`` <-> ``fc_norm.*`` when the source has the final norm under the other name."""
    renamed = dict(state)
    for source, target in (("norm.", "fc_norm."), ("fc_norm.", "norm.")):
        keys = [k for k in state if k.startswith(source)]
        if keys and not any(k.startswith(source) for k in own) \
                and not any(k.startswith(target) for k in state) \
                and all(target + k[len(source):] in own for k in keys):
            for key in keys:
                renamed[target + key[len(source):]] = renamed.pop(key)
    return renamed


def load_vit_weights(model: nn.Module, source: str | Path | dict[str, torch.Tensor],
                     skip_prefixes: tuple[str, ...] = ("patch_embed.",)) -> LoadReport:
    """Copy a standard timm ViT's weights into an Equi-ViT, all but the patch embedding.

    The learned absolute position embedding is resampled to the model's grid when the sizes
    differ; a model with a radial position embedding skips it; a classifier head of another
    class count is skipped (the model keeps its freshly initialised head). The final norm goes
    where the model applies it: a class-token ViT's ``norm`` becomes a mean-pooling model's
    ``fc_norm`` (timm puts the final norm after pooling when ``global_pool="avg"``) and back.

    Args:
        model: an ``EquiVisionTransformer`` (or any timm ViT).
        source: a state dict, or a local checkpoint file (``.pth``, ``.bin``, ``.safetensors``;
            timm's ``load_state_dict`` unwraps ``state_dict``/``model`` entries).
        skip_prefixes: key prefixes never copied.

    Returns:
        A :class:`LoadReport` listing loaded, resized, skipped and missing keys.
    """
    if isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {source}")
        state = load_state_dict(str(source))
    else:
        state = dict(source)
    own = model.state_dict()
    state = _final_norm_renamed(state, own)
    report = LoadReport()
    accepted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(skip_prefixes):
            report.skipped[key] = "patch embedding is replaced by the equivariant stem"
        elif key == "pos_embed" and key not in own:
            report.skipped[key] = "model has no absolute position embedding (radial or none)"
        elif key not in own:
            report.skipped[key] = "no such parameter in this model"
        elif key == "pos_embed" and value.shape != own[key].shape:
            prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
            accepted[key] = resample_abs_pos_embed(
                value, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix
            )
            report.resized[key] = (tuple(value.shape), tuple(own[key].shape))
        elif value.shape != own[key].shape:
            report.skipped[key] = f"shape {tuple(value.shape)} != model's {tuple(own[key].shape)}"
        else:
            accepted[key] = value
    model.load_state_dict(accepted, strict=False)
    report.loaded = sorted(accepted)
    report.missing = sorted(k for k in own if k not in accepted)
    _logger.info("load_vit_weights:\n%s", report)
    return report
