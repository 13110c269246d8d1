"""One slide in, one feature file out: skip or refuse an existing output, lay the tissue
tiles, read them in ``DataLoader`` workers, embed each batch on the device and stream it into
the HDF5 file (:mod:`.h5`), so memory does not grow with the slide."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..models import ModelInfo, PooledEncoder, normalise_batch
from ..utils.atomic import atomic_save, stale_temporaries
from ..utils.precision import autocast
from ..version import __version__
from .config import ExtractionConfig
from .h5 import FeatureWriter, is_complete, partial_path, read_attrs
from .slides import OpenedSlide, SlideError, open_slide
from .summary import ExtractionSummary, SlideRecord
from .tiles import TileDataset, TileGrid, tile_grid

__all__ = ["COMPARED_SETTINGS", "NoTissueWarning", "SlideJob", "extract_slide",
           "failure_reason", "process_slide"]

COMPARED_SETTINGS = ("encoder", "checkpoint_sha256", "model_kwargs", "d4_average",
                     "patch_size", "stride", "context_size", "target_mpp", "tissue_mask",
                     "min_tissue")
"""Attributes of an existing output that must match this run's for it to be skipped (a file
written before contexts existed, without ``context_size``, embedded the cell alone)."""


class NoTissueWarning(UserWarning):
    """A slide has no tissue tiles; an empty (but valid) feature file was written."""


@dataclass
class SlideJob:
    """What every slide of a run (on this rank) shares."""

    config: ExtractionConfig
    encoder: PooledEncoder
    info: ModelInfo
    device: torch.device
    rank: int = 0
    progress: bool = False

    def settings(self) -> dict[str, Any]:
        """The :data:`COMPARED_SETTINGS` of this run, as the feature files store them."""
        c = self.config
        return {"encoder": self.info.name, "checkpoint_sha256": self.info.checkpoint_sha256,
                "model_kwargs": json.dumps(c.model_kwargs, sort_keys=True),
                "d4_average": self.encoder.d4_average, "patch_size": c.patch_size,
                "stride": c.stride, "context_size": c.context, "target_mpp": c.mpp,
                "tissue_mask": c.tissue_mask, "min_tissue": c.min_tissue}


def magnification(mpp: float) -> int | float:
    """Objective magnification TRIDENT-style, ``10 / mpp`` (0.5 um/px -> 20); an int when
    it is one."""
    value = 10.0 / mpp
    return int(round(value)) if abs(value - round(value)) < 1e-6 else round(value, 6)


def mismatch(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    """Settings in which an existing output differs from this run (``""``: none)."""
    diffs = []
    for key in COMPARED_SETTINGS:
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


def write_pt(h5_file: Path, pt_path: Path) -> None:
    """CLAM's ``pt_files/<stem>.pt``: the ``(N, D)`` features tensor, written atomically."""
    with h5py.File(h5_file, "r") as handle:
        features = torch.from_numpy(handle["features"][()])
    atomic_save(features, pt_path)


def remove_leftovers(h5_path: Path, pt_dir: Path, stem: str) -> None:
    """Temporary files a killed run left for this slide (only this rank writes them)."""
    partial_path(h5_path).unlink(missing_ok=True)
    for tmp in stale_temporaries(pt_dir / f"{stem}.pt"):
        tmp.unlink(missing_ok=True)


def failure_reason(error: BaseException) -> str:
    """One line: the exception type and message (a DataLoader worker's original error)."""
    text = str(error).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker
        last = [line for line in text.splitlines() if line.strip()][-1]
        return last.strip()
    first = text.splitlines()[0] if text else ""
    return first if isinstance(error, SlideError) else f"{type(error).__name__}: {first}"


def _existing_output(record: SlideRecord, h5_path: Path, pt_path: Path,
                     job: SlideJob) -> SlideRecord | None:
    """The record of a slide whose complete output is kept (skipped) or refused (other
    settings); ``None`` when it must be (re)computed."""
    if job.config.overwrite or not is_complete(h5_path):
        return None
    existing = read_attrs(h5_path)
    if "context_size" not in existing and "encoder" in existing and "patch_size" in existing:
        # Written by this package before contexts existed: it embedded the cell alone, which
        # an automatic context (a disc model) no longer does.
        existing["context_size"] = existing["patch_size"]
    diff = mismatch(existing, job.settings())
    if diff:
        record.status = "failed"
        record.reason = (f"{h5_path} exists but was made with other settings ({diff}); "
                         f"pass --overwrite (overwrite=True) or choose another --out")
        return record
    record.status, record.reason = "skipped", "already complete"
    if job.config.also_pt and not pt_path.is_file():
        write_pt(h5_path, pt_path)
        record.reason = "already complete (wrote the missing .pt)"
    return record


def _file_attrs(job: SlideJob, opened: OpenedSlide, grid: TileGrid,
                stem: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``coords`` and ``features`` attributes of a slide's file (see :mod:`.h5`)."""
    c, settings = job.config, job.settings()
    coords_attrs = {
        "patch_size": c.patch_size, "patch_size_level0": grid.patch_size_level0,
        "level0_width": opened.dimensions[0], "level0_height": opened.dimensions[1],
        "target_mpp": c.mpp, "target_magnification": magnification(c.mpp),
        "level0_mpp": opened.level0_mpp[0],
        "level0_magnification": magnification(opened.level0_mpp[0]),
        "overlap": c.patch_size - c.stride, "stride": c.stride, "name": stem,
        "tissue_mask": c.tissue_mask, "min_tissue": c.min_tissue,
        "context_size": grid.context_size,
        "context_margin_level0": grid.context_margin_level0,
    }
    features_attrs = {
        "encoder": job.info.name, "checkpoint_sha256": job.info.checkpoint_sha256,
        "model_kwargs": settings["model_kwargs"], "random_weights": job.info.random_weights,
        "package_version": __version__, "precision": c.precision,
        "d4_average": job.encoder.d4_average, "name": stem,
        "embedding": job.info.embedding, "normalisation_mean": list(job.info.mean),
        "normalisation_std": list(job.info.std),
    }
    return coords_attrs, features_attrs


def _embed_tiles(job: SlideJob, opened: OpenedSlide, grid: TileGrid,
                 writer: FeatureWriter, stem: str) -> None:
    """Read the grid's regions (each tile's context) in ``DataLoader`` workers, embed them
    batch by batch and append each ``(B, D)`` batch of features to ``writer``, with the
    tiles' own ``coords``."""
    c, coords = job.config, grid.coords
    dataset = TileDataset(opened, coords, c.patch_size, c.mpp, context_size=grid.context_size,
                          context_margin_level0=grid.context_margin_level0,
                          reuse_reader=c.workers == 0)
    loader = DataLoader(dataset, batch_size=c.batch_size, shuffle=False,
                        num_workers=c.workers, pin_memory=job.device.type == "cuda")
    bar = tqdm(total=len(coords), desc=stem, unit="patch", leave=False,
               disable=not job.progress, position=1)
    done = 0
    for batch in loader:  # uint8 (B, C, C, 3), C the context side
        x = batch.to(job.device, non_blocking=True)
        with torch.inference_mode(), autocast(job.device.type, c.precision):
            features = job.encoder(normalise_batch(x, job.info.mean, job.info.std))
        features = features.float().cpu().numpy()
        writer.append(features, coords[done:done + len(features)])
        done += len(features)
        bar.update(len(features))
    bar.close()
    if done != len(coords):
        raise RuntimeError(f"read {done} tiles of {len(coords)}")


def extract_slide(slide: Path, job: SlideJob, summary: ExtractionSummary) -> SlideRecord:
    """Embed one slide into ``<out>/h5_files/<stem>.h5`` (and ``.pt`` with ``also_pt``).

    Raises whatever reading the slide raises (:func:`process_slide` turns it into a failed
    record); a slide without tissue gets an empty file and a :class:`NoTissueWarning`.
    """
    start, stem, c = time.perf_counter(), slide.stem, job.config
    h5_path, pt_path = c.h5_dir / f"{stem}.h5", c.pt_dir / f"{stem}.pt"
    record = SlideRecord(slide=str(slide), status="done", rank=job.rank, output=str(h5_path))
    remove_leftovers(h5_path, c.pt_dir, stem)
    kept = _existing_output(record, h5_path, pt_path, job)
    if kept is not None:
        return kept
    opened = open_slide(slide, c.slide_mpp)
    grid = tile_grid(opened, target_mpp=c.mpp, patch_size=c.patch_size, stride=c.stride,
                     tissue_mask=c.tissue_mask, min_tissue=c.min_tissue,
                     context_size=c.context)
    coords_attrs, features_attrs = _file_attrs(job, opened, grid, stem)
    with FeatureWriter(h5_path, job.info.embed_dim, c.dtype, coords_attrs=coords_attrs,
                       features_attrs=features_attrs, expected_rows=len(grid.coords)) as writer:
        if len(grid.coords) == 0:
            message = (f"no tissue tiles ({grid.n_grid} grid tiles, tissue mask "
                       f"{c.tissue_mask!r}); wrote an empty feature file")
            # stacklevel: the caller of extract_features
            warnings.warn(f"{slide}: {message}", NoTissueWarning, stacklevel=6)
            summary.warnings.append((str(slide), message))
        else:
            _embed_tiles(job, opened, grid, writer, stem)
        tmp = writer.close_temporary()
        if c.also_pt:
            write_pt(tmp, pt_path)
        elif pt_path.is_file():
            pt_path.unlink()  # a .pt from an earlier run no longer matches the new .h5
        writer.commit()
    record.n_patches = len(grid.coords)
    record.seconds = time.perf_counter() - start
    return record


def process_slide(slide: Path, job: SlideJob, summary: ExtractionSummary) -> SlideRecord:
    """:func:`extract_slide`, with any failure (a bad slide) turned into a failed record."""
    try:
        return extract_slide(slide, job, summary)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # one bad slide must not stop the run
        reason = failure_reason(error).removeprefix(f"{slide}: ")  # the summary names it
        return SlideRecord(slide=str(slide), status="failed", reason=reason, rank=job.rank)
