"""The rotation report: how stable an encoder's pooled features are when tissue turns.

The protocol of Elphick et al. (arXiv 2412.11938), for any timm encoder:

1. regions of ``2T x 2T`` px (``T``: the model's input side) are read from tissue at the
   target resolution (:mod:`.regions`), the same level-0 centres for every model;
2. each region is rotated about its centre by ``0, 15, ..., 345`` degrees (counter-clockwise,
   :func:`~equivit_plugin.equivariance.transforms.rotate`: multiples of 90 exact, others
   bilinear) and its central ``T x T`` crop is taken
   (:func:`~equivit_plugin.equivariance.transforms.region_views`); the crop never
   reaches the region's border, so no padding is read;
3. per angle, the pooled features of the rotated crops are compared with those of the
   unrotated crops: the mutual-kNN similarity (Huh et al. 2024,
   :func:`~equivit_plugin.equivariance.metrics.mutual_knn_similarity`, cosine neighbours) and
   the mean cosine between each region's two feature vectors;
4. sub-patch translations: the unrotated region cropped ``s`` px right and down of centre,
   and the same after an exact 90-degree turn (``"s+rot90"``), against the same reference.

The reference (0 degree) features are computed once per model and reused by every view.
Regions come from sources (slides, tile folders); with more than one, every number is given
over all regions (pooled: neighbours are found among all of them) and per source (neighbours
within the source), so a model that is steady on one kind of tissue and not on another shows.
"""

from __future__ import annotations

import datetime
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import timm.data
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..equivariance.metrics import mutual_knn_similarity
from ..equivariance.transforms import region_views
from ..features.encoder import RandomWeightsWarning
from ..features.slides import resolve_slides
from ..models import (
    ModelInfo,
    ModelLoadError,
    PooledEncoder,
    input_normalisation,
    load_model,
    unknown_source_reason,
)
from ..utils.atomic import atomic_write_json
from ..version import __version__
from .config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_K,
    DEFAULT_MIN_TISSUE,
    DEFAULT_MODEL,
    DEFAULT_MPP,
    DEFAULT_REGION_STRIDE,
    DEFAULT_REGIONS,
    DEFAULT_SHIFTS,
    REPORT_JSON,
    REPORT_PNG,
    ReportSettings,
    RotationReportError,
    angle_key,
)
from .plots import plot_rotation_report
from .regions import RegionSet, TileRegions, sample_regions, tile_regions

__all__ = ["REFERENCES", "ModelSource", "rotation_report", "summarise"]

ModelSource = (str | os.PathLike | tuple[str, str | os.PathLike]
               | tuple[nn.Module, ModelInfo])
"""A registered timm name (random weights), a checkpoint path, a foundation model with its
weights (``("uni_v1", "pytorch_model.bin")``), or a built ``(model, ModelInfo)`` pair (what
:func:`~equivit_plugin.models.load_model` returns)."""

REFERENCES = ("Elphick et al., arXiv 2412.11938 (protocol); Huh et al. 2024, 'The Platonic "
              "Representation Hypothesis' (mutual-kNN similarity)")


@dataclass
class _Encoder:
    """A loaded model and how its inputs are made (the model's own data config)."""

    label: str
    source: str
    net: nn.Module
    info: ModelInfo
    tile_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    data_config: dict[str, Any]


def _load(source: ModelSource, seed: int,
          model_kwargs: Mapping[str, Any]) -> tuple[nn.Module, ModelInfo, str]:
    """``(model, info, source as text)`` for one entry of ``models``."""
    weights = None
    if isinstance(source, tuple):
        if len(source) == 2 and isinstance(source[0], nn.Module) \
                and isinstance(source[1], ModelInfo):
            return source[0].eval(), source[1], source[1].source
        if len(source) != 2 or not all(isinstance(v, (str, os.PathLike)) for v in source):
            raise RotationReportError("models= a pair must be (name, weights) or (nn.Module, "
                                      "ModelInfo), as load_model returns it", "models")
        source, weights = source
    text = os.fspath(source)
    reason = unknown_source_reason(text)
    if reason is not None:
        raise RotationReportError(f"models= {reason}", "models")
    try:
        net, info = load_model(text, weights=weights, seed=seed,  # seed: names only
                               **model_kwargs)
    except ModelLoadError as error:
        raise RotationReportError(f"models= {text!r}: {error}", "models") from error
    return net, info, text


def _encoders(models: ModelSource | Sequence[ModelSource], seed: int,
              model_kwargs: Mapping[str, Any]) -> list[_Encoder]:
    """Load every model, label it uniquely and read its preprocessing (timm, and for checkpoints
    of this package the mean and std they were trained with)."""
    single = isinstance(models, (str, os.PathLike)) or (
        isinstance(models, tuple) and len(models) == 2)
    sources = [models] if single else list(models)
    if not sources:
        raise RotationReportError("models= give at least one model", "models")
    encoders: list[_Encoder] = []
    for source in sources:
        net, info, text = _load(source, seed, model_kwargs)
        base = Path(text).name if info.checkpoint else info.name
        label, copy = base, 2
        while label in {e.label for e in encoders}:
            label, copy = f"{base} ({copy})", copy + 1
        config = dict(timm.data.resolve_data_config({}, model=net))
        config["mean"], config["std"] = input_normalisation(info)
        size = int(info.img_size)
        # timm's pretrained_cfg keeps the registered input size (224) for a model built with
        # img_size=112: the size the model was built for is ModelInfo's.
        config["input_size"] = (3, size, size)
        if size % 2:
            raise RotationReportError(f"models= {text!r} takes {size} px inputs; the protocol "
                                      f"needs an even input size (a centred crop)", "models")
        encoders.append(_Encoder(
            label=label, source=text, net=net, info=info, tile_size=size,
            mean=tuple(float(v) for v in config["mean"]),
            std=tuple(float(v) for v in config["std"]),
            data_config={key: list(value) if isinstance(value, tuple) else value
                         for key, value in config.items()}))
    return encoders


def _device(device: Any) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise RotationReportError(f"device= {device!r} is not a torch device ({error})",
                                  "device") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RotationReportError(f"device= {device!r}: CUDA is not available here", "device")
    return resolved


def _embed(encoder: nn.Module, regions: torch.Tensor, *, angle: float, shift: int,
           tile_size: int, mean: torch.Tensor, std: torch.Tensor, batch_size: int,
           device: torch.device) -> torch.Tensor:
    """Features of one view of every region.

    Args:
        encoder: ``(B, 3, T, T)`` normalised -> ``(B, D)``.
        regions: ``(N, 2T, 2T, 3)`` uint8 (the cached read, shared: never written to).
        mean, std: ``(1, 3, 1, 1)`` on ``device``.

    Returns:
        ``(N, D)`` float64 on the CPU.
    """
    out = []
    for start in range(0, len(regions), batch_size):
        batch = regions[start:start + batch_size].permute(0, 3, 1, 2)
        # Rotated as [0, 1] floats, then normalised: rotation and normalisation commute up
        # to rounding, and this order keeps rotate's input a plain image.
        x = batch.to(device=device, dtype=torch.float32).contiguous().div_(255.0)
        views = (region_views(x, angle, tile_size, shift) - mean) / std
        out.append(encoder(views).double().cpu())
    return torch.cat(out)


def _compare(reference: torch.Tensor, features: torch.Tensor, k: int) -> dict[str, float]:
    """``{"mutual_knn", "mean_cosine"}`` of ``(N, D)`` features against the reference."""
    return {"mutual_knn": mutual_knn_similarity(reference, features, k=k),
            "mean_cosine": float(F.cosine_similarity(reference, features, dim=1).mean())}


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarise(angles: Mapping[str, Mapping[str, float]],
              shifts: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
    """The headline numbers of one model's ``angles`` and ``shifts`` records.

    Returns:
        ``grid90_<metric>`` (mean over 90/180/270 degrees), ``off_grid_<metric>`` (angles that
        are not multiples of 90), ``all_angles_<metric>`` (every angle but 0) for
        ``mutual_knn`` and ``mean_cosine``, and ``shift_<key>_<metric>`` per shift view
        (``"4"`` -> ``shift_4_...``, ``"4+rot90"`` -> ``shift_4_rot90_...``). ``None`` where
        no angle falls in a group.
    """
    summary: dict[str, float | None] = {}
    for metric in ("mutual_knn", "mean_cosine"):
        grid = [v[metric] for a, v in angles.items() if float(a) % 90 == 0]
        off = [v[metric] for a, v in angles.items() if float(a) % 90 != 0]
        summary[f"grid90_{metric}"] = _mean(grid)
        summary[f"off_grid_{metric}"] = _mean(off)
        summary[f"all_angles_{metric}"] = _mean(grid + off)
    for key, values in shifts.items():
        for metric in ("mutual_knn", "mean_cosine"):
            summary[f"shift_{key.replace('+', '_')}_{metric}"] = values[metric]
    return summary


def _views(settings: ReportSettings) -> list[tuple[str, str, float, int]]:
    """``(group, key, angle, shift)`` of every view, the reference first."""
    views = [("angles", angle_key(angle), angle, 0) for angle in settings.angles]
    for shift in settings.shifts:
        views += [("shifts", str(shift), 0.0, shift), ("shifts", f"{shift}+rot90", 90.0, shift)]
    return views


def _random_weights_note(encoder: _Encoder, seed: int) -> str:
    return (f"{encoder.label}: no checkpoint given, the weights are RANDOM (seed {seed}); its "
            f"numbers describe the untrained architecture, not a trained encoder")


def _source_rows(regions: Sequence[RegionSet]) -> dict[str, list[int]]:
    """Row indices of each source's regions, sources in order of appearance."""
    names = [name for region_set in regions for name in region_set.source_names]
    rows: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        rows.setdefault(name, []).append(row)
    return rows


def _read(regions: Sequence[RegionSet], size: int, progress: bool) -> torch.Tensor:
    """``(N, 2T, 2T, 3)`` uint8 of every source, in order (each source caches its read)."""
    parts = [region_set.read(size, progress=progress) for region_set in regions]
    return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))


def _measure(encoder: _Encoder, pixels: torch.Tensor, sources: Mapping[str, torch.Tensor],
             settings: ReportSettings, device: torch.device, bar: tqdm) -> dict[str, Any]:
    """Every view of one model on ``pixels`` (``(N, 2T, 2T, 3)`` uint8, ``T`` its tile size):
    ``{"angles", "shifts", "sources", "seconds"}``; ``sources`` holds the same comparisons
    within the rows of each source in ``sources``."""
    started = time.perf_counter()
    size = encoder.tile_size
    module = PooledEncoder(encoder.net, d4_average=settings.d4_average).eval().to(device)
    mean = torch.tensor(encoder.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, device=device).view(1, 3, 1, 1)
    records: dict[str, dict[str, dict[str, float]]] = {"angles": {}, "shifts": {}}
    per_source = {name: {"angles": {}, "shifts": {}} for name in sources}
    reference = None
    bar.set_postfix_str(encoder.label)
    with torch.inference_mode():
        for group, key, angle, shift in _views(settings):
            features = _embed(module, pixels, angle=angle, shift=shift, tile_size=size,
                              mean=mean, std=std, batch_size=settings.batch_size,
                              device=device)
            if reference is None:
                reference = features  # the 0-degree view comes first
            else:
                records[group][key] = _compare(reference, features, settings.k)
                for name, rows in sources.items():
                    per_source[name][group][key] = _compare(reference[rows], features[rows],
                                                            settings.k)
            bar.update()
    return {**records, "sources": per_source,
            "seconds": round(time.perf_counter() - started, 3)}


def _region_sets(slides: Any, tiles: Sequence[str | os.PathLike], settings: ReportSettings,
                 tile_size: int, progress: bool) -> list[RegionSet]:
    """The sources: the regions given, or those drawn from ``slides``, then one
    :class:`TileRegions` per tile folder; source names made unique."""
    if isinstance(slides, RegionSet):
        sets: list[RegionSet] = [slides]
    elif _is_region_sets(slides):
        sets = list(slides)
    elif slides is None or (not isinstance(slides, (str, os.PathLike)) and not len(slides)):
        sets = []
    else:
        sets = [sample_regions(slides, tile_size=tile_size, target_mpp=settings.target_mpp,
                               n_regions=settings.n_regions, min_tissue=settings.min_tissue,
                               region_stride=settings.region_stride,
                               tissue_mask=settings.tissue_mask, seed=settings.seed,
                               slide_mpp=settings.slide_mpp, progress=progress)]
    taken = {name for region_set in sets for name in region_set.source_names}
    for folder in tiles:
        found = tile_regions(folder, tile_size=tile_size, target_mpp=settings.target_mpp,
                             n_regions=settings.n_regions, seed=settings.seed)
        name, copy = found.name, 2
        while name in taken:
            name, copy = f"{found.name} ({copy})", copy + 1
        found.name = name
        taken.add(name)
        sets.append(found)
    if not sets:
        raise RotationReportError("slides= give slides, tiles= or regions to measure on",
                                  "slides")
    resolutions = {region_set.target_mpp for region_set in sets}
    if len(resolutions) > 1:
        raise RotationReportError(f"slides= the regions are at several resolutions "
                                  f"({sorted(resolutions)} um/px); compare them at one",
                                  "slides")
    for region_set in sets:
        if tile_size > region_set.tile_size:
            raise RotationReportError(
                f"slides= the regions were sampled for tiles of {region_set.tile_size} px, but "
                f"a model takes {tile_size} px: sample them with tile_size={tile_size}",
                "slides")
    return sets


def _is_region_sets(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes)) \
        and len(value) > 0 and all(isinstance(v, RegionSet) for v in value)


def _describe(sets: Sequence[RegionSet]) -> dict[str, Any]:
    """The report's ``sources``, ``slides`` and ``regions`` entries."""
    sources: list[dict[str, Any]] = []
    slides: list[dict[str, Any]] = []
    regions: dict[str, list[Any]] = {"source": [], "centres_level0": [], "file": []}
    for region_set in sets:
        described = region_set.describe()
        regions["source"] += region_set.source_names
        if isinstance(region_set, TileRegions):
            sources += described["sources"]
            regions["centres_level0"] += [None] * len(region_set)
            regions["file"] += described["tiles"]
        else:
            slides += described["slides"]
            sources += [slide for slide in described["slides"] if slide["regions"]]
            regions["centres_level0"] += described["regions"]["centres_level0"]
            regions["file"] += [None] * len(region_set)
    return {"sources": sources, "slides": slides, "regions": regions}


def rotation_report(
    models: ModelSource | Sequence[ModelSource] = DEFAULT_MODEL,
    slides: str | Path | Sequence[str | Path] | RegionSet | Sequence[RegionSet] = (),
    *,
    tiles: Sequence[str | os.PathLike] = (),
    angles: Sequence[float] | None = None,
    shifts: Sequence[int] = DEFAULT_SHIFTS,
    k: int = DEFAULT_K,
    d4_average: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    target_mpp: float = DEFAULT_MPP,
    n_regions: int = DEFAULT_REGIONS,
    region_stride: float = DEFAULT_REGION_STRIDE,
    slide_mpp: float | None = None,
    tissue_mask: str = "morphological",
    min_tissue: float = DEFAULT_MIN_TISSUE,
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Measure how stable each model's pooled features are under rotation and translation.

    Args:
        models: one or more registered timm names (random weights drawn under ``seed``; the
            report warns), checkpoint paths (``models.save_checkpoint``), or built
            ``(model, ModelInfo)`` pairs. All are measured on the same regions.
        slides: slide files, folders, globs or ``.txt``/``.csv`` lists, or regions already
            drawn - :class:`Regions` from :func:`~.regions.sample_regions`,
            :class:`TileRegions` from :func:`~.regions.tile_regions`, or a list of them, each
            drawn with its own settings (then ``target_mpp``, ``n_regions``, ``slide_mpp``,
            ``tissue_mask`` and ``min_tissue`` are the regions' own).
        tiles: folders of tile images, one source each (:func:`~.regions.tile_regions`: each
            tile the centre of a mirrored ``2T`` context; at most ``n_regions`` per folder).
        angles: degrees (counter-clockwise); default ``0, 15, ..., 345``. 0, the reference,
            is always measured.
        shifts: sub-patch translations in pixels, each ``< T / 2``; ``()`` for none.
        k: mutual-kNN neighbourhood, smaller than the number of regions found.
        d4_average: average each view's features over its 8 rotations/flips
            (:class:`~equivit_plugin.models.PooledEncoder`; 8x the cost).
        batch_size: views per forward pass.
        device: where the models run (``"cpu"``, ``"cuda"``...).
        target_mpp: resolution regions are read at, micrometres per pixel.
        n_regions: regions wanted from the slides (spread over them), and at most this many
            tiles from each tile folder.
        region_stride: step between candidate regions, in tile sizes (``2``: disjoint).
        slide_mpp: resolution of slides without metadata.
        tissue_mask: ``"morphological"``, ``"otsu"`` or ``"none"``.
        min_tissue: tissue fraction a region needs.
        seed: which regions are drawn, and the random weights of registered names.
        model_kwargs: more :func:`~equivit_plugin.models.load_model` arguments for every
            model (``{"img_size": 112}``...).
        progress: tqdm bars (regions, then one step per model and view).
        out_dir: write ``rotation_report.json`` and ``rotation_report.png`` there.

    Returns:
        The JSON-able report: the protocol (``k``, ``angles``, ``shifts``, ``target_mpp``,
        ``tile_sizes``, ``n_regions``, ``sources``, ``slides``, ``seed``, ``d4_average``...),
        ``version``, ``date``, ``warnings`` and ``models``, one record per model with
        ``angles`` (``{"15": {"mutual_knn", "mean_cosine"}, ...}``, every angle but 0),
        ``shifts`` (``{"4": ..., "4+rot90": ...}``) and ``summary`` (:func:`summarise`), over
        all regions; with several sources also ``sources``: ``{name: {"n_regions", "angles",
        "shifts", "summary"}}`` within each source of more than ``k`` regions. See
        ``docs/rotation_report.md``.

    Raises:
        RotationReportError: bad arguments, a missing or unreadable slide, an unknown model,
            no tissue, or fewer than ``k + 1`` regions; ``.argument`` names the argument.
        SlideError: a slide fails while its regions are read.
    """
    settings = ReportSettings(
        angles=angles, shifts=shifts, k=k, n_regions=n_regions, region_stride=region_stride,
        target_mpp=target_mpp,
        slide_mpp=slide_mpp, tissue_mask=tissue_mask, min_tissue=min_tissue,
        batch_size=batch_size, seed=seed, d4_average=d4_average)
    torch_device = _device(device)
    if not isinstance(slides, RegionSet) and not _is_region_sets(slides) and slides:
        try:
            paths = resolve_slides(slides)
        except ValueError as error:
            raise RotationReportError(f"slides= {error}", "slides") from error
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise RotationReportError(f"slides= {missing[0]}: no such file", "slides")
        slides = paths
    if isinstance(tiles, (str, os.PathLike)):
        tiles = [tiles]
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RotationReportError(f"out_dir={str(out)!r}: cannot write there ({error})",
                                      "out_dir") from error

    encoders = _encoders(models, settings.seed, dict(model_kwargs or {}))
    for encoder in encoders:
        too_far = [s for s in settings.shifts if 2 * s >= encoder.tile_size]
        if too_far:
            raise RotationReportError(
                f"shifts= {too_far[0]} px must be smaller than half the tile size "
                f"({encoder.tile_size} / 2) of {encoder.label}", "shifts")
    largest = max(encoder.tile_size for encoder in encoders)
    region_sets = _region_sets(slides, tiles, settings, largest, progress)
    n_found = sum(len(region_set) for region_set in region_sets)
    rows_by_source = _source_rows(region_sets)
    if n_found <= settings.k:
        names = ", ".join(sorted(rows_by_source))
        raise RotationReportError(
            f"k={settings.k} needs at least {settings.k + 1} regions, but only {n_found} "
            f"regions of {2 * largest} px were found in {names}; lower k=, give more "
            f"slides or a lower min_tissue=", "k")

    notes = []
    for region_set in region_sets:
        if len(region_set) < region_set.requested:
            where = region_set.name if isinstance(region_set, TileRegions) else "the slides"
            notes.append(f"{region_set.requested} regions were asked for, {where} hold "
                         f"{len(region_set)}")
    counts = {name: len(rows) for name, rows in rows_by_source.items()}
    # Compared within each source as well when there are several (one source: its numbers
    # are the pooled ones); a source of <= k regions has no k neighbours of its own.
    compared: dict[str, torch.Tensor] = {}
    if len(counts) > 1:
        for name, rows in rows_by_source.items():
            if len(rows) > settings.k:
                compared[name] = torch.tensor(rows)
            else:
                notes.append(f"{name}: {len(rows)} regions, not more than k={settings.k}: "
                             f"measured in the pooled numbers only")
    for encoder in encoders:
        if encoder.info.random_weights:
            note = _random_weights_note(encoder, settings.seed)
            notes.append(note)
            warnings.warn(note, RandomWeightsWarning, stacklevel=2)

    views = _views(settings)
    records = []
    with tqdm(total=len(encoders) * len(views), desc="rotation report", unit="view",
              disable=not progress) as bar:
        pixels: dict[int, torch.Tensor] = {}  # per tile size, shared by every view and model
        for encoder in encoders:
            size = encoder.tile_size
            if size not in pixels:
                pixels[size] = _read(region_sets, size, progress)
            measured = _measure(encoder, pixels[size], compared, settings, torch_device, bar)
            info = encoder.info
            records.append({
                "label": encoder.label, "source": encoder.source, "name": info.name,
                "random_weights": bool(info.random_weights),
                "checkpoint_sha256": info.checkpoint_sha256 or None,
                "tile_size": encoder.tile_size, "embed_dim": int(info.embed_dim),
                "data_config": encoder.data_config, "seconds": measured["seconds"],
                "angles": measured["angles"], "shifts": measured["shifts"],
                "summary": summarise(measured["angles"], measured["shifts"]),
                **({"sources": {
                    name: {"n_regions": counts[name], **values,
                           "summary": summarise(values["angles"], values["shifts"])}
                    for name, values in measured["sources"].items()}}
                   if measured["sources"] else {}),
            })

    described = _describe(region_sets)
    report: dict[str, Any] = {
        "version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "reference": REFERENCES,
        "k": settings.k,
        "angles": [float(a) for a in settings.angles],
        "shifts": list(settings.shifts),
        "target_mpp": region_sets[0].target_mpp,
        "tile_sizes": {e.label: e.tile_size for e in encoders},
        "region_sizes": {e.label: 2 * e.tile_size for e in encoders},
        "n_regions": n_found,
        "n_regions_requested": sum(region_set.requested for region_set in region_sets),
        "region_stride": settings.region_stride,
        "seed": settings.seed,
        "d4_average": settings.d4_average,
        "tissue_mask": settings.tissue_mask,
        "min_tissue": settings.min_tissue,
        "sources": described["sources"],
        "slides": described["slides"],
        "regions": described["regions"],
        "models": records,
        "warnings": notes,
    }
    if out is not None:
        report["files"] = {"json": str(out / REPORT_JSON), "png": str(out / REPORT_PNG)}
        plot_rotation_report(report, out / REPORT_PNG)
        atomic_write_json(report, out / REPORT_JSON)
    return report

