"""Slides in, one feature file per slide out: the encoder, the per-slide loop, the
``torchrun`` sharding and the run summary.

One slide at a time: TIAToolbox lays the tissue tiles (:mod:`.tiles`), a ``DataLoader`` reads
them in worker processes, the encoder embeds each batch on ``device`` and the batch goes
straight to disk (:mod:`.h5`), so memory does not grow with the slide. Under ``torchrun`` each
rank takes ``slides[rank::world_size]`` of the sorted list and writes only its own files;
rank 0 prints the combined summary.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from equivit_plugin import __version__
from equivit_plugin.equivariance.transforms import D4_TRANSFORMS

from .h5 import FeatureWriter, is_complete, partial_path, read_attrs
from .slides import SlideError, open_slide, resolve_slides
from .tiles import TISSUE_MASKS, TileDataset, normalise_batch, tile_grid

__all__ = [
    "DEFAULT_MODEL",
    "H5_DIR",
    "PRECISIONS",
    "PT_DIR",
    "EncoderInfo",
    "ExtractionConfigError",
    "ExtractionSummary",
    "FeatureEncoder",
    "NoTissueWarning",
    "RandomWeightsWarning",
    "SlideRecord",
    "build_encoder",
    "extract_features",
]

DEFAULT_MODEL = "equivit_ri_small_patch16_224"
H5_DIR = "h5_files"
PT_DIR = "pt_files"
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}
_PRECISION_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
OUT_DTYPES = ("float32", "float16")


class ExtractionConfigError(ValueError):
    """Bad arguments (the message names the argument); nothing was processed."""


class RandomWeightsWarning(UserWarning):
    """The encoder is a registered architecture with random weights (no checkpoint)."""


class NoTissueWarning(UserWarning):
    """A slide has no tissue tiles; an empty (but valid) feature file was written."""


# -- encoder ---------------------------------------------------------------------------------
class FeatureEncoder(nn.Module):
    """``(B, 3, H, W)`` normalised tiles -> ``(B, D)`` pooled embeddings,
    ``net.forward_head(net.forward_features(x), pre_logits=True)``.

    With ``d4_average`` the embedding is the mean over the 8 rotations/flips of each tile
    (:data:`equivit_plugin.equivariance.D4_TRANSFORMS`), which makes any model exactly
    invariant to them, at 8x the cost.
    """

    def __init__(self, net: nn.Module, d4_average: bool = False) -> None:
        super().__init__()
        self.net = net
        self.d4_average = d4_average

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.d4_average:
            return self.embed(x)
        # One (8B, ...) forward pass rather than 8 small ones keeps the device busy.
        stacked = torch.cat([fn(x) for _, fn in D4_TRANSFORMS])
        return self.embed(stacked).unflatten(0, (len(D4_TRANSFORMS), x.shape[0])).mean(0)


@dataclass
class EncoderInfo:
    """What the feature files record about the encoder.

    Attributes:
        name: timm model name (from the checkpoint for a checkpoint).
        checkpoint: checkpoint path, ``""`` for a registered name.
        checkpoint_sha256: SHA-256 of the checkpoint file, ``""`` for a registered name.
        model_kwargs: extra ``timm.create_model`` arguments (JSON-able).
        random_weights: built from a name, so the weights are random (seeded).
        embed_dim: ``D``.
        img_size: the input side the model takes.
    """

    name: str
    checkpoint: str
    checkpoint_sha256: str
    model_kwargs: dict[str, Any]
    random_weights: bool
    embed_dim: int
    img_size: int


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_encoder(model: str | Path = DEFAULT_MODEL, *, patch_size: int = 224,
                  model_kwargs: Mapping[str, Any] | None = None, d4_average: bool = False,
                  seed: int = 0) -> tuple[FeatureEncoder, EncoderInfo]:
    """The encoder for ``model``: a self-describing checkpoint
    (``equivit_plugin.models.save_checkpoint``) or a registered timm name with random weights.

    Random weights are drawn under ``torch.manual_seed(seed)`` (inside a forked RNG, the
    caller's RNG is untouched), so every ``torchrun`` rank and every resumed run embeds with
    the same weights.

    Raises:
        ExtractionConfigError: unknown name, unreadable checkpoint, or a checkpoint whose input
            size is not ``patch_size``; the message names ``--model``/``--patch-size``.
    """
    import timm

    from equivit_plugin.models.checkpoint import is_checkpoint_path, model_from_checkpoint
    from equivit_plugin.networks.equivit import create_network

    kwargs = dict(model_kwargs or {})
    if is_checkpoint_path(model):
        path = Path(model)
        try:
            net, info = model_from_checkpoint(path, **kwargs)
        except (FileNotFoundError, ValueError, RuntimeError) as error:
            raise ExtractionConfigError(f"--model {model}: {error}") from error
        name = str(info["model_name"])
        img_size = int(info.get("model_kwargs", {}).get("img_size", 224))
        if img_size != patch_size:
            raise ExtractionConfigError(
                f"--patch-size {patch_size} does not match the input size {img_size} of the "
                f"checkpoint --model {model} ({name}); use --patch-size {img_size}")
        record = EncoderInfo(name=name, checkpoint=str(path), checkpoint_sha256=_sha256(path),
                             model_kwargs=kwargs, random_weights=False, embed_dim=0,
                             img_size=img_size)
    else:
        name = str(model)
        if not timm.is_model(name):
            raise ExtractionConfigError(
                f"--model {name!r} is neither a registered timm model (e.g. {DEFAULT_MODEL}, "
                f"vit_small_patch16_224) nor an existing checkpoint file")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                net = create_network(name, 0, img_size=patch_size, **kwargs)
            except (TypeError, ValueError, AssertionError, RuntimeError) as error:
                raise ExtractionConfigError(
                    f"--model {name} cannot be built for --patch-size {patch_size} with "
                    f"{kwargs or 'default arguments'}: {error}") from error
        record = EncoderInfo(name=name, checkpoint="", checkpoint_sha256="", model_kwargs=kwargs,
                             random_weights=True, embed_dim=0, img_size=patch_size)
    encoder = FeatureEncoder(net.eval(), d4_average=d4_average).eval()
    with torch.inference_mode():
        probe = encoder.embed(torch.zeros(1, 3, patch_size, patch_size))
    if probe.ndim != 2:
        raise ExtractionConfigError(f"--model {model}: expected (B, D) pooled features from "
                                    f"forward_head(pre_logits=True), got {tuple(probe.shape)}")
    record.embed_dim = int(probe.shape[1])
    return encoder, record


# -- summary ---------------------------------------------------------------------------------
@dataclass
class SlideRecord:
    """What happened to one slide (``status``: ``"done"``, ``"skipped"`` or ``"failed"``)."""

    slide: str
    status: str
    reason: str = ""
    n_patches: int = 0
    seconds: float = 0.0
    rank: int = 0
    output: str = ""


@dataclass
class ExtractionSummary:
    """The run summary (combined over ``torchrun`` ranks).

    Attributes:
        done: slides embedded in this run.
        skipped: ``(slide, reason)`` for slides whose output was already complete.
        failed: ``(slide, reason)`` for slides that could not be processed.
        warnings: ``(slide, message)``, e.g. slides without tissue (empty files).
        n_patches: tiles embedded in this run.
        seconds: wall-clock time of the run (the slowest rank).
        world_size: number of ranks.
        records: one :class:`SlideRecord` per slide (rank, patches, output file...).
        out_dir: the output folder.
    """

    done: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    n_patches: int = 0
    seconds: float = 0.0
    world_size: int = 1
    records: list[SlideRecord] = field(default_factory=list)
    out_dir: str = ""

    @property
    def ok(self) -> bool:
        """No slide failed."""
        return not self.failed

    @property
    def patches_per_second(self) -> float:
        return self.n_patches / self.seconds if self.seconds > 0 else 0.0

    def add(self, record: SlideRecord) -> None:
        self.records.append(record)
        if record.status == "done":
            self.done.append(record.slide)
            self.n_patches += record.n_patches
        elif record.status == "skipped":
            self.skipped.append((record.slide, record.reason))
        else:
            self.failed.append((record.slide, record.reason))

    @classmethod
    def merge(cls, parts: Sequence[ExtractionSummary]) -> ExtractionSummary:
        """Combine per-rank summaries (records sorted by slide)."""
        merged = cls(world_size=max((p.world_size for p in parts), default=1),
                     out_dir=parts[0].out_dir if parts else "",
                     seconds=max((p.seconds for p in parts), default=0.0))
        for record in sorted((r for p in parts for r in p.records), key=lambda r: r.slide):
            merged.add(record)
        merged.warnings = sorted(w for p in parts for w in p.warnings)
        return merged

    def format(self) -> str:
        """Human-readable summary: totals, then one line per slide."""
        total = len(self.records)
        lines = [f"feature extraction: {total} slide(s): {len(self.done)} done, "
                 f"{len(self.skipped)} skipped, {len(self.failed)} failed; {self.n_patches} "
                 f"patches in {self.seconds:.1f} s ({self.patches_per_second:.1f} patches/s)"
                 + (f" on {self.world_size} ranks" if self.world_size > 1 else "")]
        for r in self.records:
            detail = (f"{r.n_patches} patches, {r.seconds:.1f} s" if r.status == "done"
                      else r.reason)
            lines.append(f"  {r.status.upper() if r.status == 'failed' else r.status:8s} "
                         f"[rank {r.rank}] {r.slide}: {detail}")
        for slide, message in self.warnings:
            lines.append(f"  warning  {slide}: {message}")
        if self.out_dir:
            lines.append(f"output: {Path(self.out_dir) / H5_DIR}")
        return "\n".join(lines)


# -- distributed -----------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False


def _dist_from_env() -> _Dist:
    """Rank layout from ``torchrun``'s environment (single process without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as error:
        raise ExtractionConfigError(f"bad RANK/WORLD_SIZE/LOCAL_RANK environment: {error}") \
            from error
    return _Dist(rank=rank, world_size=max(1, world), local_rank=local)


def _init_group(dist_info: _Dist, device: torch.device) -> None:
    import torch.distributed as dist

    if dist_info.world_size <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Ranks meet only at the end, after their share of slides: a share can take hours.
    dist.init_process_group(backend=backend, timeout=timedelta(hours=72))
    dist_info.created_group = True


# -- the run ---------------------------------------------------------------------------------
@dataclass
class _Run:
    encoder: FeatureEncoder
    info: EncoderInfo
    device: torch.device
    h5_dir: Path
    pt_dir: Path
    target_mpp: float
    slide_mpp: float | None
    patch_size: int
    stride: int
    tissue_mask: str
    min_tissue: float
    batch_size: int
    workers: int
    precision: str
    dtype: str
    also_pt: bool
    overwrite: bool
    rank: int
    progress: bool
    verbose: bool


def _canonical_precision(precision: str) -> str:
    value = _PRECISION_ALIASES.get(str(precision).lower(), str(precision).lower())
    if value not in PRECISIONS:
        raise ExtractionConfigError(f"--precision must be one of {sorted(PRECISIONS)}, "
                                    f"got {precision!r}")
    return value


def _resolve_device(device: str | torch.device, dist_info: _Dist) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ExtractionConfigError(f"--device {device!r} is not a device (cpu, cuda, "
                                    f"cuda:N): {error}") from error
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ExtractionConfigError(f"--device {device}: CUDA is not available")
        if dist_info.world_size > 1:
            dev = torch.device("cuda", dist_info.local_rank)  # one GPU per torchrun process
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ExtractionConfigError(f"--device {dev}: only {torch.cuda.device_count()} "
                                        f"CUDA device(s) visible")
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    return dev


def _check_out_dir(out_dir: Path) -> None:
    try:
        for folder in (out_dir, out_dir / H5_DIR):
            folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir / H5_DIR):
            pass
    except OSError as error:
        raise ExtractionConfigError(f"--out {out_dir}: cannot write there ({error})") from error


def _mag(mpp: float) -> int | float:
    """Objective magnification TRIDENT-style, ``10 / mpp`` (0.5 um/px -> 20); an int when
    it is one."""
    value = 10.0 / mpp
    return int(round(value)) if abs(value - round(value)) < 1e-6 else round(value, 6)


_COMPARED = ("encoder", "checkpoint_sha256", "model_kwargs", "d4_average", "patch_size",
             "stride", "target_mpp", "tissue_mask", "min_tissue")


def _mismatch(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    """Settings in which an existing output differs from this run (``""``: none)."""
    diffs = []
    for key in _COMPARED:
        if key not in existing:
            continue  # a foreign-but-valid file: nothing to compare
        old, new = existing[key], wanted[key]
        if isinstance(new, float) or isinstance(old, float):
            same = math.isclose(float(old), float(new), rel_tol=1e-9, abs_tol=1e-12)
        else:
            same = old == new or str(old) == str(new)
        if not same:
            diffs.append(f"{key} {old!r} != {new!r}")
    return "; ".join(diffs)


def _write_pt(h5_file: Path, pt_path: Path) -> None:
    """CLAM's ``pt_files/<stem>.pt``: the ``(N, D)`` features tensor, written atomically."""
    import h5py

    from equivit_plugin.models.checkpoint import atomic_save

    with h5py.File(h5_file, "r") as handle:
        features = torch.from_numpy(handle["features"][()])
    atomic_save(features, pt_path)


def _remove_leftovers(h5_path: Path, pt_dir: Path, stem: str) -> None:
    """Temporary files a killed run left for this slide (only this rank writes them)."""
    partial_path(h5_path).unlink(missing_ok=True)
    if pt_dir.is_dir():
        prefix = f".{stem}.pt."
        for tmp in pt_dir.glob(f"{prefix}*.tmp"):
            # atomic_save's mkstemp infix has no dots: never another slide's temporary file.
            if "." not in tmp.name[len(prefix):-len(".tmp")]:
                tmp.unlink(missing_ok=True)


def _reason(error: BaseException) -> str:
    """One line: the exception type and message (a DataLoader worker's original error)."""
    text = str(error).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker
        last = [line for line in text.splitlines() if line.strip()][-1]
        return last.strip()
    first = text.splitlines()[0] if text else ""
    return first if isinstance(error, SlideError) else f"{type(error).__name__}: {first}"


def _extract_slide(slide: Path, run: _Run, summary: ExtractionSummary) -> SlideRecord:
    start = time.perf_counter()
    stem = slide.stem
    h5_path = run.h5_dir / f"{stem}.h5"
    pt_path = run.pt_dir / f"{stem}.pt"
    record = SlideRecord(slide=str(slide), status="done", rank=run.rank, output=str(h5_path))
    _remove_leftovers(h5_path, run.pt_dir, stem)
    wanted = {"encoder": run.info.name, "checkpoint_sha256": run.info.checkpoint_sha256,
              "model_kwargs": json.dumps(run.info.model_kwargs, sort_keys=True),
              "d4_average": run.encoder.d4_average, "patch_size": run.patch_size,
              "stride": run.stride, "target_mpp": run.target_mpp,
              "tissue_mask": run.tissue_mask, "min_tissue": run.min_tissue}

    if not run.overwrite and is_complete(h5_path):
        diff = _mismatch(read_attrs(h5_path), wanted)
        if diff:
            record.status = "failed"
            record.reason = (f"{h5_path} exists but was made with other settings ({diff}); "
                             f"pass --overwrite or choose another --out")
            return record
        record.status, record.reason = "skipped", "already complete"
        if run.also_pt and not pt_path.is_file():
            _write_pt(h5_path, pt_path)
            record.reason = "already complete (wrote the missing .pt)"
        return record

    opened = open_slide(slide, run.slide_mpp)
    grid = tile_grid(opened, target_mpp=run.target_mpp, patch_size=run.patch_size,
                     stride=run.stride, tissue_mask=run.tissue_mask,
                     min_tissue=run.min_tissue)
    coords_attrs = {
        "patch_size": run.patch_size, "patch_size_level0": grid.patch_size_level0,
        "level0_width": opened.dimensions[0], "level0_height": opened.dimensions[1],
        "target_mpp": run.target_mpp, "target_magnification": _mag(run.target_mpp),
        "level0_mpp": opened.level0_mpp[0], "level0_magnification": _mag(opened.level0_mpp[0]),
        "overlap": run.patch_size - run.stride, "stride": run.stride, "name": stem,
        "tissue_mask": run.tissue_mask, "min_tissue": run.min_tissue,
    }
    features_attrs = {
        "encoder": run.info.name, "checkpoint_sha256": run.info.checkpoint_sha256,
        "model_kwargs": wanted["model_kwargs"], "random_weights": run.info.random_weights,
        "package_version": __version__, "precision": run.precision,
        "d4_average": run.encoder.d4_average, "name": stem,
    }
    coords = grid.coords
    with FeatureWriter(h5_path, run.info.embed_dim, run.dtype, coords_attrs=coords_attrs,
                       features_attrs=features_attrs, expected_rows=len(coords)) as writer:
        if len(coords) == 0:
            message = (f"no tissue tiles ({grid.n_grid} grid tiles, tissue mask "
                       f"{run.tissue_mask!r}); wrote an empty feature file")
            warnings.warn(f"{slide}: {message}", NoTissueWarning, stacklevel=3)
            summary.warnings.append((str(slide), message))
        else:
            dataset = TileDataset(opened, coords, run.patch_size, run.target_mpp,
                                  reuse_reader=run.workers == 0)
            loader = DataLoader(dataset, batch_size=run.batch_size, shuffle=False,
                                num_workers=run.workers,
                                pin_memory=run.device.type == "cuda")
            amp = PRECISIONS[run.precision]
            bar = tqdm(total=len(coords), desc=stem, unit="patch", leave=False,
                       disable=not run.progress, position=1)
            done = 0
            for batch in loader:
                x = batch.to(run.device, non_blocking=True)
                with torch.inference_mode(), torch.autocast(run.device.type, dtype=amp,
                                                            enabled=amp is not None):
                    features = run.encoder(normalise_batch(x))
                features = features.float().cpu().numpy()
                writer.append(features, coords[done:done + len(features)])
                done += len(features)
                bar.update(len(features))
            bar.close()
            if done != len(coords):
                raise RuntimeError(f"read {done} tiles of {len(coords)}")
        tmp = writer.close_temporary()
        if run.also_pt:
            _write_pt(tmp, pt_path)
        elif pt_path.is_file():
            pt_path.unlink()  # a .pt from an earlier run no longer matches the new .h5
        writer.commit()
    record.n_patches = len(coords)
    record.seconds = time.perf_counter() - start
    return record


def extract_features(
    slides: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    model: str | Path = DEFAULT_MODEL,
    model_kwargs: Mapping[str, Any] | None = None,
    mpp: float = 0.5,
    slide_mpp: float | None = None,
    patch_size: int = 224,
    stride: int | None = None,
    tissue_mask: str = "morphological",
    min_tissue: float = 0.0,
    batch_size: int = 64,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    dtype: str = "float32",
    also_pt: bool = False,
    overwrite: bool = False,
    d4_average: bool = False,
    seed: int = 0,
    verbose: bool = False,
    print_summary: bool = True,
) -> ExtractionSummary:
    """Embed the tissue tiles of whole-slide images into CLAM/TRIDENT-style HDF5 files.

    Writes ``<out_dir>/h5_files/<slide_stem>.h5`` per slide (datasets ``features (N, D)`` and
    ``coords (N, 2)`` int64 level-0 top-left ``(x, y)``; attributes in
    :mod:`equivit_plugin.features.h5`) and, with ``also_pt``,
    ``<out_dir>/pt_files/<slide_stem>.pt``. Complete outputs are skipped (``overwrite``
    forces); a slide that fails is reported in the summary and the run goes on. Under
    ``torchrun`` each rank does ``slides[rank::world_size]``.

    Args:
        slides: slide files, directories, globs, ``.txt``/``.csv`` lists (see
            :func:`~equivit_plugin.features.slides.resolve_slides`).
        out_dir: output folder.
        model: registered timm name (random weights, with a warning) or checkpoint path.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"depth": 1}``).
        mpp: target resolution, micrometres per pixel (0.5 is 20x).
        slide_mpp: resolution of slides without resolution metadata (plain images).
        patch_size: tile side at ``mpp`` (pixels); must be the model's input size.
        stride: grid step at ``mpp`` (default ``patch_size``: no overlap).
        tissue_mask: ``"morphological"``, ``"otsu"`` (TIAToolbox maskers) or ``"none"``.
        min_tissue: minimum tissue fraction of a kept tile (``0``: any tissue).
        batch_size: tiles per forward pass.
        workers: ``DataLoader`` worker processes reading tiles (default: half the CPUs, at
            most 4; ``0`` reads in this process).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (under ``torchrun``: ``cuda:LOCAL_RANK``).
        precision: ``"fp32"``, or ``"bf16"``/``"fp16"`` autocast.
        dtype: stored feature dtype, ``"float32"`` or ``"float16"``.
        also_pt: also write CLAM's ``pt_files/<stem>.pt``.
        overwrite: recompute slides whose output exists.
        d4_average: average each tile's features over its 8 rotations/flips (8x cost).
        seed: seed of random weights (registered names only).
        verbose: progress bars even when stderr is not a terminal, and a line per slide.
        print_summary: print the summary (rank 0) when done.

    Returns:
        The :class:`ExtractionSummary` of the whole run (all ranks).

    Raises:
        ExtractionConfigError: bad arguments (the message names the argument); raised before
            anything is processed.
    """
    started = time.perf_counter()
    # -- validate everything before touching a slide --
    for name, value in (("--patch-size", patch_size), ("--batch-size", batch_size)):
        if int(value) != value or value <= 0:
            raise ExtractionConfigError(f"{name} must be a positive integer, got {value!r}")
    stride = patch_size if stride is None else stride
    if int(stride) != stride or stride <= 0:
        raise ExtractionConfigError(f"--stride must be a positive integer, got {stride!r}")
    if not (isinstance(mpp, (int, float)) and mpp > 0 and math.isfinite(mpp)):
        raise ExtractionConfigError(f"--mpp must be a positive number, got {mpp!r}")
    if slide_mpp is not None and not (slide_mpp > 0 and math.isfinite(slide_mpp)):
        raise ExtractionConfigError(f"--slide-mpp must be a positive number, got {slide_mpp!r}")
    if tissue_mask not in TISSUE_MASKS:
        raise ExtractionConfigError(f"--tissue-mask must be one of {list(TISSUE_MASKS)}, "
                                    f"got {tissue_mask!r}")
    if not 0.0 <= min_tissue < 1.0:
        raise ExtractionConfigError(f"--min-tissue must be in [0, 1), got {min_tissue!r}")
    precision = _canonical_precision(precision)
    if dtype not in OUT_DTYPES:
        raise ExtractionConfigError(f"--dtype must be one of {list(OUT_DTYPES)}, got {dtype!r}")
    if workers is None:
        workers = min(4, max(0, (os.cpu_count() or 1) // 2))
    if int(workers) != workers or workers < 0:
        raise ExtractionConfigError(f"--workers must be an integer >= 0, got {workers!r}")
    try:
        slide_list = resolve_slides(slides)
    except ValueError as error:
        raise ExtractionConfigError(f"SLIDES: {error}") from error
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    dist_info = _dist_from_env()
    dev = _resolve_device(device, dist_info)
    encoder, info = build_encoder(model, patch_size=int(patch_size), model_kwargs=model_kwargs,
                                  d4_average=d4_average, seed=seed)
    if info.random_weights:
        warnings.warn(f"--model {info.name}: no checkpoint given, the weights are RANDOM "
                      f"(seed {seed}); the features are only useful for testing. Pass a "
                      f"checkpoint path to --model for meaningful features.",
                      RandomWeightsWarning, stacklevel=2)
    encoder = encoder.to(dev)
    _init_group(dist_info, dev)

    is_tty = sys.stderr.isatty()
    progress = verbose or (is_tty and dist_info.rank == 0)
    run = _Run(encoder=encoder, info=info, device=dev, h5_dir=out_dir / H5_DIR,
               pt_dir=out_dir / PT_DIR, target_mpp=float(mpp),
               slide_mpp=None if slide_mpp is None else float(slide_mpp),
               patch_size=int(patch_size), stride=int(stride), tissue_mask=tissue_mask,
               min_tissue=float(min_tissue), batch_size=int(batch_size), workers=int(workers),
               precision=precision, dtype=dtype, also_pt=also_pt, overwrite=overwrite,
               rank=dist_info.rank, progress=progress, verbose=verbose)
    if also_pt:
        run.pt_dir.mkdir(parents=True, exist_ok=True)

    share = slide_list[dist_info.rank::dist_info.world_size]
    summary = ExtractionSummary(world_size=dist_info.world_size, out_dir=str(out_dir))
    try:
        bar = tqdm(share, desc="slides" if dist_info.world_size == 1
                   else f"slides (rank {dist_info.rank})", unit="slide", disable=not progress,
                   position=0)
        for slide in bar:
            try:
                record = _extract_slide(slide, run, summary)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as error:  # one bad slide must not stop the run
                reason = _reason(error).removeprefix(f"{slide}: ")  # the summary names it
                record = SlideRecord(slide=str(slide), status="failed", reason=reason,
                                     rank=dist_info.rank)
            summary.add(record)
            if verbose:
                detail = (f"{record.n_patches} patches in {record.seconds:.1f} s"
                          if record.status == "done" else record.reason)
                tqdm.write(f"[rank {dist_info.rank}] {record.status} {slide}: {detail}",
                           file=sys.stderr)
        bar.close()
        summary.seconds = time.perf_counter() - started
        if dist_info.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
            parts: list[Any] = [None] * dist_info.world_size
            dist.all_gather_object(parts, summary)
            summary = ExtractionSummary.merge(parts)
    finally:
        if dist_info.created_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    if print_summary and dist_info.rank == 0:
        print(summary.format(), flush=True)
    return summary
