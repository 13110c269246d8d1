"""Equivariance and invariance measurements for ViT-style models.

Everything here runs under ``torch.no_grad()`` and puts modules in eval mode for the duration
of a call (restoring their previous mode), so it can be pointed at a model mid-training.
Rotation angles follow :func:`~equivit_plugin.equivariance.transforms.rotate`: degrees,
counter-clockwise as displayed, multiples of 90 exact.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .transforms import D4_TRANSFORMS, rotate

__all__ = [
    "RotationSweep",
    "d4_sweep",
    "d4_token_similarity",
    "feature_invariance",
    "mutual_knn_similarity",
    "prediction_agreement",
    "rotation_sweep",
    "token_grid",
    "token_similarity",
]

ArrayLike = torch.Tensor | np.ndarray


@contextlib.contextmanager
def _eval_mode(module: Any) -> Iterator[None]:
    """Eval mode and no autograd for the block; the module's previous mode is restored."""
    was_training = isinstance(module, nn.Module) and module.training
    if isinstance(module, nn.Module):
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            module.train()


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _format(embed: nn.Module) -> str:
    fmt = getattr(embed, "output_fmt", "NCHW")
    return str(getattr(fmt, "value", fmt))


def _feat_size(embed: nn.Module, height: int, width: int) -> tuple[int, int]:
    if hasattr(embed, "dynamic_feat_size"):
        return tuple(embed.dynamic_feat_size((height, width)))
    patch = getattr(embed, "patch_size", None)
    if patch is None:
        raise ValueError(f"cannot infer the token grid of {type(embed).__name__}: it has no "
                         f"patch_size; pass a module that returns (B, D, h, w)")
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return height // ph, width // pw


def token_grid(model_or_embed: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch-embedding tokens laid out on their grid.

    Args:
        model_or_embed: a timm ``VisionTransformer`` (its ``patch_embed`` is used, so neither
            position embedding nor prefix tokens are involved) or a patch-embedding module
            itself: timm ``PatchEmbed`` API (flattened ``(B, N, D)``, or ``output_fmt``
            ``NCHW``/``NHWC``/``NCL``/``NLC``) or any module returning ``(B, D, h, w)``.
        images: ``(B, C, H, W)`` float images.

    Returns:
        ``(B, D, h, w)`` tokens; token ``(i, j)`` is the patch at row ``i``, column ``j``.
    """
    embed = getattr(model_or_embed, "patch_embed", model_or_embed)
    if images.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) image batch, got shape {tuple(images.shape)}")
    out = embed(images)
    fmt = _format(embed)
    if out.dim() == 4:
        return out.permute(0, 3, 1, 2) if fmt == "NHWC" else out
    if out.dim() != 3:
        raise ValueError(f"patch embedding returned shape {tuple(out.shape)}; expected "
                         f"(B, N, D), (B, D, N) or a 4-D grid")
    h, w = _feat_size(embed, images.shape[-2], images.shape[-1])
    if fmt == "NCL":  # (B, D, N)
        return out.reshape(out.shape[0], out.shape[1], h, w)
    # timm's flatten=True (and NLC) gives (B, N, D) in row-major token order.
    if out.shape[1] != h * w:
        raise ValueError(f"patch embedding returned {out.shape[1]} tokens for a {h}x{w} grid "
                         f"(input {images.shape[-2]}x{images.shape[-1]})")
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)


def _inner_token_mask(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Tokens whose centre lies within the inscribed circle minus one token, ``(h, w)`` bool.

    The whole patch of such a token (half-diagonal ~0.71 token) stays inside the inscribed
    circle, so at any angle neither the rotated image nor the rotated token grid reads padding.
    """
    rows = torch.arange(height, dtype=torch.float64, device=device) - (height - 1) / 2
    cols = torch.arange(width, dtype=torch.float64, device=device) - (width - 1) / 2
    radius = min(height, width) / 2 - 1
    return rows[:, None] ** 2 + cols[None, :] ** 2 <= radius**2 + 1e-9


class _CosineStats:
    """Running mean/min of cosine similarities over batches."""

    def __init__(self) -> None:
        self.total, self.count, self.min = 0.0, 0, math.inf

    def update(self, cos: torch.Tensor) -> None:
        # Rounding can push identical directions a hair above 1; a mean above 1 only confuses.
        cos = cos.clamp(-1.0, 1.0)
        if cos.numel():
            self.total += float(cos.double().sum())
            self.count += cos.numel()
            self.min = min(self.min, float(cos.min()))

    def result(self) -> dict[str, float]:
        if not self.count:
            raise ValueError("no tokens to compare (token grid too small for the circular mask)")
        return {"mean": self.total / self.count, "min": self.min, "num_tokens": self.count}


def token_similarity(model_or_embed: nn.Module, images: torch.Tensor,
                     angles: Iterable[float], batch_size: int = 32,
                     padding_mode: str = "reflect") -> dict[float, dict[str, float]]:
    """Token equivariance vs rotation angle (the paper's Fig. 2).

    For each angle ``a`` the tokens of the rotated image, ``T(rotate(x, a))``, are compared with
    the rotated token grid of the original image, ``rotate(T(x), a)``, by cosine similarity
    over the token dimension. For multiples of 90 degrees both rotations are exact ``rot90``
    and every token is compared (an exactly equivariant stem gives 1.0). For other angles the
    token grid is rotated with the same bilinear :func:`rotate` and only tokens whose centres lie
    inside the grid's inscribed circle minus a one-token margin are compared, so that no
    compared token sees the padded corners of either rotation.

    Args:
        model_or_embed: see :func:`token_grid`.
        images: ``(B, C, H, W)`` float images.
        angles: angles in degrees (counter-clockwise).
        batch_size: images per forward pass.
        padding_mode: border handling of the non-90-degree rotations.

    Returns:
        ``{angle: {"mean": float, "min": float, "num_tokens": int}}``; mean and min are over all
        compared tokens of all images.
    """
    embed = getattr(model_or_embed, "patch_embed", model_or_embed)
    angles = [float(a) for a in angles]
    stats = {a: _CosineStats() for a in angles}
    with _eval_mode(embed):
        for batch in _batches(images.shape[0], batch_size):
            x = images[batch]
            reference = token_grid(embed, x)
            for angle in angles:
                tokens = token_grid(embed, rotate(x, angle, padding_mode))
                expected = rotate(reference, angle, padding_mode)
                cos = F.cosine_similarity(tokens, expected, dim=1)  # (B, h, w)
                if angle % 90.0 != 0.0:
                    cos = cos[:, _inner_token_mask(*cos.shape[-2:], cos.device)]
                stats[angle].update(cos)
    return {angle: s.result() for angle, s in stats.items()}


def d4_token_similarity(model_or_embed: nn.Module, images: torch.Tensor,
                        batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Token equivariance under the 8 exact rotations/flips of the square.

    Compares ``T(g(x))`` with ``g(T(x))`` for every ``g`` in
    :data:`~equivit_plugin.equivariance.transforms.D4_TRANSFORMS`, all tokens included.

    Args:
        model_or_embed: see :func:`token_grid`.
        images: ``(B, C, H, W)`` float images.
        batch_size: images per forward pass.

    Returns:
        ``{name: {"mean": float, "min": float, "num_tokens": int}}`` in D4 order.
    """
    embed = getattr(model_or_embed, "patch_embed", model_or_embed)
    stats = {name: _CosineStats() for name, _ in D4_TRANSFORMS}
    with _eval_mode(embed):
        for batch in _batches(images.shape[0], batch_size):
            x = images[batch]
            reference = token_grid(embed, x)
            for name, transform in D4_TRANSFORMS:
                tokens = token_grid(embed, transform(x))
                stats[name].update(F.cosine_similarity(tokens, transform(reference), dim=1))
    return {name: s.result() for name, s in stats.items()}


@dataclass
class RotationSweep:
    """Predictions of one model over a set of rotations of the same images.

    Attributes:
        angles: ``A`` rotation angles in degrees (for a D4 sweep, the rotation part of each
            transform).
        accuracy: ``(A,)`` accuracy at each angle.
        mean: mean accuracy over angles.
        std: standard deviation of accuracy over angles (population, ``ddof=0``).
        predictions: ``(A, N)`` predicted class indices.
        agreement: ``(A,)`` fraction of predictions equal to those of the first row (0 degrees
            / identity); 1.0 everywhere for an invariant model.
        names: transform names of a D4 sweep (``None`` for an angle sweep).
    """

    angles: list[float]
    accuracy: np.ndarray
    mean: float
    std: float
    predictions: np.ndarray
    agreement: np.ndarray
    names: list[str] | None = field(default=None)

    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        """JSON-serialisable summary (predictions only on request: they are ``A x N``)."""
        out: dict[str, Any] = {
            "angles": list(self.angles),
            "accuracy": self.accuracy.tolist(),
            "mean": self.mean,
            "std": self.std,
            "agreement": self.agreement.tolist(),
        }
        if self.names is not None:
            out["names"] = list(self.names)
        if with_predictions:
            out["predictions"] = self.predictions.tolist()
        return out


def prediction_agreement(predictions: ArrayLike) -> np.ndarray:
    """Fraction of each row's predictions equal to row 0's.

    Args:
        predictions: ``(A, N)`` class indices, row 0 the reference (unrotated) predictions.

    Returns:
        ``(A,)`` float array; entry 0 is 1.0.
    """
    preds = _numpy(predictions)
    if preds.ndim != 2 or preds.shape[1] == 0:
        raise ValueError(f"predictions must be (A, N) with N > 0, got shape {preds.shape}")
    return (preds == preds[:1]).mean(axis=1)


def _numpy(x: ArrayLike | Sequence[Any]) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _to_indices(output: torch.Tensor | np.ndarray) -> np.ndarray:
    out = _numpy(output)
    # (B, K) scores -> argmax; (B,) already class indices.
    return out.argmax(axis=-1) if out.ndim == 2 else out.astype(np.int64).reshape(-1)


def _sweep(predict_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
           labels: ArrayLike | Sequence[int], transforms: Sequence[Callable], angles: list[float],
           names: list[str] | None, batch_size: int) -> RotationSweep:
    labels_np = _numpy(labels).astype(np.int64).reshape(-1)
    if labels_np.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels_np.shape[0]} labels")
    if images.shape[0] == 0:
        raise ValueError("rotation sweep needs at least one image")
    predictions = np.empty((len(transforms), images.shape[0]), dtype=np.int64)
    with _eval_mode(predict_fn):
        for row, transform in enumerate(transforms):
            for batch in _batches(images.shape[0], batch_size):
                preds = _to_indices(predict_fn(transform(images[batch])))
                if preds.shape[0] != batch.stop - batch.start:
                    raise ValueError(f"predict_fn returned {preds.shape[0]} predictions for a "
                                     f"batch of {batch.stop - batch.start} images")
                predictions[row, batch] = preds
    accuracy = (predictions == labels_np[None, :]).mean(axis=1)
    return RotationSweep(
        angles=angles, accuracy=accuracy, mean=float(accuracy.mean()),
        std=float(accuracy.std()), predictions=predictions,
        agreement=prediction_agreement(predictions), names=names,
    )


def rotation_sweep(predict_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                   labels: ArrayLike | Sequence[int], angles: Iterable[float] = range(0, 360, 30),
                   batch_size: int = 32, padding_mode: str = "reflect") -> RotationSweep:
    """Accuracy and prediction stability over rotations of a labelled image set.

    Args:
        predict_fn: maps a float batch ``(B, C, H, W)`` to logits ``(B, K)`` (argmax is taken)
            or class indices ``(B,)``; a model can be passed directly (eval mode is set).
        images: ``(N, C, H, W)`` float images.
        labels: ``(N,)`` integer class labels.
        angles: angles in degrees (counter-clockwise); the first one is the reference of
            ``agreement`` (put 0 first).
        batch_size: images per call of ``predict_fn``.
        padding_mode: border handling of the non-90-degree rotations.

    Returns:
        :class:`RotationSweep` with ``A = len(angles)`` rows.
    """
    angles = [float(a) for a in angles]
    if not angles:
        raise ValueError("angles is empty")
    transforms = [lambda x, a=a: rotate(x, a, padding_mode) for a in angles]
    return _sweep(predict_fn, images, labels, transforms, angles, None, batch_size)


def d4_sweep(predict_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
             labels: ArrayLike | Sequence[int], batch_size: int = 32) -> RotationSweep:
    """:func:`rotation_sweep` over the 8 exact D4 transforms (identity first).

    Returns:
        :class:`RotationSweep` with ``A = 8`` rows, ``names`` set and ``angles`` the rotation
        part of each transform (0, 90, 180, 270, 0, 90, 180, 270).
    """
    names = [name for name, _ in D4_TRANSFORMS]
    angles = [float(name.rsplit("rot", 1)[1]) if "rot" in name else 0.0 for name in names]
    transforms = [fn for _, fn in D4_TRANSFORMS]
    return _sweep(predict_fn, images, labels, transforms, angles, names, batch_size)


def mutual_knn_similarity(features_a: ArrayLike, features_b: ArrayLike, k: int = 10) -> float:
    """Mutual k-nearest-neighbour alignment of two representations of the same samples.

    The metric of Huh et al. 2024 ("The Platonic Representation Hypothesis"), used by
    Elphick et al. (arXiv 2412.11938) to compare features of original and rotated tiles: for
    every sample take its ``k`` nearest neighbours by cosine similarity (itself excluded) in
    space A and in space B; the score is the mean over samples of ``|kNN_A & kNN_B| / k``.
    1.0 means both spaces order every neighbourhood alike; unrelated spaces score about
    ``k / (N - 1)``. Memory is ``O(N^2)``.

    Args:
        features_a: ``(N, D_a)`` features.
        features_b: ``(N, D_b)`` features of the same ``N`` samples, same order.
        k: neighbourhood size, ``1 <= k < N``.

    Returns:
        The score in ``[0, 1]``.
    """
    a = torch.as_tensor(_numpy(features_a), dtype=torch.float64)
    b = torch.as_tensor(_numpy(features_b), dtype=torch.float64)
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"features must be (N, D) matrices, got shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"features_a has {a.shape[0]} samples but features_b has {b.shape[0]}; "
                         f"both must describe the same samples")
    n = a.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must satisfy 1 <= k < N (each sample has N - 1 neighbours), "
                         f"got k={k} with N={n}")

    def knn_mask(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=1)
        sim = x @ x.T
        sim.fill_diagonal_(-math.inf)
        mask = torch.zeros(n, n, dtype=torch.bool)
        return mask.scatter_(1, sim.topk(k, dim=1).indices, True)

    shared = (knn_mask(a) & knn_mask(b)).sum(dim=1).double() / k
    return float(shared.mean())


def _pooled_and_logits(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        features = model.forward_features(x)
        return {
            "pooled": model.forward_head(features, pre_logits=True),
            "logits": model.forward_head(features),
        }
    return {"logits": model(x)}


def feature_invariance(model: nn.Module, images: torch.Tensor,
                       batch_size: int = 32) -> dict[str, dict[str, dict[str, float]]]:
    """How much pooled features and logits change under the 8 D4 transforms.

    Args:
        model: a timm-style model with ``forward_features`` / ``forward_head`` (pooled
            pre-logit features and logits are both measured), or any module (logits only).
        images: ``(B, C, H, W)`` float images (square for the 90/270-degree rotations to keep
            the token grid shape).
        batch_size: images per forward pass.

    Returns:
        ``{output: {name: stats}}`` with ``output`` in ``("pooled", "logits")`` and ``stats``
        ``{"max_abs_diff", "mean_cosine", "min_cosine", "ref_max_abs"}``, comparing the output
        of ``g(x)`` with that of ``x``; ``ref_max_abs`` is the largest ``|output(x)|``, the scale
        ``max_abs_diff`` should be read against. An invariant model gives ``max_abs_diff ~ 0``
        and cosines ~1.
    """
    acc: dict[str, dict[str, dict[str, float]]] = {}
    with _eval_mode(model):
        for batch in _batches(images.shape[0], batch_size):
            x = images[batch]
            reference = _pooled_and_logits(model, x)
            for name, transform in D4_TRANSFORMS:
                outputs = _pooled_and_logits(model, transform(x))
                for key, out in outputs.items():
                    ref = reference[key]
                    cos = F.cosine_similarity(out.double(), ref.double(), dim=-1).clamp(-1, 1)
                    entry = acc.setdefault(key, {}).setdefault(name, {
                        "max_abs_diff": 0.0, "cos_sum": 0.0, "min_cosine": math.inf,
                        "ref_max_abs": 0.0, "count": 0,
                    })
                    entry["max_abs_diff"] = max(entry["max_abs_diff"],
                                                float((out - ref).abs().max()))
                    entry["cos_sum"] += float(cos.sum())
                    entry["count"] += cos.numel()
                    entry["min_cosine"] = min(entry["min_cosine"], float(cos.min()))
                    entry["ref_max_abs"] = max(entry["ref_max_abs"], float(ref.abs().max()))
    return {
        key: {
            name: {
                "max_abs_diff": e["max_abs_diff"],
                "mean_cosine": e["cos_sum"] / e["count"],
                "min_cosine": e["min_cosine"],
                "ref_max_abs": e["ref_max_abs"],
            }
            for name, e in per_name.items()
        }
        for key, per_name in acc.items()
    }
