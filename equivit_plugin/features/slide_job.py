"""Slides in, one feature file each out: skip or refuse an existing output, lay the tissue
tiles, read them (:mod:`.loader`: one ``DataLoader`` for the whole run, each stored tile
decoded once), embed each batch on the device and stream it into the HDF5 file (:mod:`.h5`),
so memory does not grow with the slide.

:func:`run_slides` overlaps the three stages: while a slide is read and embedded, a thread
prepares the next one (opens it, builds its tissue mask and grid: :func:`plan_slide`) and the
workers already read its first regions once they are done with this one's."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from ..models import ModelInfo, PooledEncoder, normalise_batch
from ..utils.atomic import atomic_save, stale_temporaries
from ..utils.precision import autocast
from ..version import __version__
from .config import ExtractionConfig
from .h5 import FeatureWriter, is_complete, partial_path, read_attrs
from .loader import RegionChunk, make_loader, received, slide_chunks
from .reader import LevelPlan, decoder_for, open_tiles, plan_read, resize_regions
from .slides import OpenedSlide, SlideError, open_slide
from .summary import ExtractionSummary, SlideRecord
from .tiles import TileGrid, tile_grid

__all__ = ["COMPARED_SETTINGS", "NoTissueWarning", "SlideJob", "SlidePlan", "failure_reason",
           "plan_slide", "run_slides"]

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


@dataclass
class SlidePlan:
    """A slide prepared for reading: open, its tissue grid laid, its read level chosen."""

    opened: OpenedSlide
    grid: TileGrid
    read: LevelPlan
    decoder: str


def plan_slide(slide: Path, config: ExtractionConfig) -> SlidePlan:
    """Open ``slide``, lay its tissue grid (:func:`~.tiles.tile_grid`) and choose how its
    regions are read (:func:`~.reader.plan_read`, :func:`~.reader.decoder_for`). Reads the
    slide only (thread-safe: :func:`run_slides` calls it in a thread, one slide ahead)."""
    c = config
    opened = open_slide(slide, c.slide_mpp)
    grid = tile_grid(opened, target_mpp=c.mpp, patch_size=c.patch_size, stride=c.stride,
                     tissue_mask=c.tissue_mask, min_tissue=c.min_tissue,
                     context_size=c.context)
    read = plan_read(opened.reader, grid.context_size, c.mpp)
    try:
        decoder = decoder_for(opened.reader, c.decoder)
        if decoder == "tifffile":  # refused here, in one line, rather than in every worker
            open_tiles(opened.reader, slide, read, decoder).close()
    except Exception as error:  # tifffile's own errors for a file that is not a TIFF
        raise SlideError(f"{slide}: decoder={c.decoder!r}: {type(error).__name__}: "
                         f"{error}") from error
    return SlidePlan(opened=opened, grid=grid, read=read, decoder=decoder)


@dataclass
class _Output:
    """A slide whose regions are being embedded into its (temporary) feature file."""

    record: SlideRecord
    plan: SlidePlan
    writer: FeatureWriter
    started: float
    chunks: int
    received: int = 0
    rows: list[np.ndarray] = field(default_factory=list)
    regions: list[torch.Tensor] = field(default_factory=list)
    bar: Any = None

    @property
    def pending(self) -> int:
        return sum(len(r) for r in self.rows)


def _failed(slide: Path | str, error: BaseException | str, rank: int) -> SlideRecord:
    reason = error if isinstance(error, str) else failure_reason(error)
    return SlideRecord(slide=str(slide), status="failed",
                       reason=reason.removeprefix(f"{slide}: "),  # the summary names it
                       rank=rank)


def _embed_pending(job: SlideJob, output: _Output, *, everything: bool) -> None:
    """Embed the regions that have arrived, ``batch_size`` at a time (and the rest too with
    ``everything``), and write their features at their rows: uint8 ``(B, S, S, 3)`` on the
    device -> normalised float ``(B, 3, S, S)`` -> resized to the context ``C`` when the
    level read is not the target resolution -> ``(B, D)``."""
    c, coords = job.config, output.plan.grid.coords
    size = output.plan.grid.context_size
    while output.rows and (everything or output.pending >= c.batch_size):
        rows, regions = np.concatenate(output.rows), torch.cat(output.regions)
        take = len(rows) if everything else c.batch_size
        batch_rows, batch = rows[:take], regions[:take]
        output.rows = [rows[take:]] if take < len(rows) else []
        output.regions = [regions[take:]] if take < len(rows) else []
        for start in range(0, len(batch_rows), c.batch_size):
            part = batch[start:start + c.batch_size]
            part_rows = batch_rows[start:start + c.batch_size]
            with torch.inference_mode(), autocast(job.device.type, c.precision):
                # resized in [0, 255], then normalised, as read_as_embedded reads it back;
                # contiguous (NCHW) as a direct forward pass gets it: a channels-last input
                # takes other convolution kernels, whose sums round differently
                x = resize_regions(part.permute(0, 3, 1, 2).float(), size).contiguous()
                x = normalise_batch(x.permute(0, 2, 3, 1), job.info.mean, job.info.std)
                features = job.encoder(x)
            output.writer.write_rows(part_rows, features.float().cpu().numpy(),
                                     coords[part_rows])
            if output.bar is not None:
                output.bar.update(len(part_rows))


def _open_output(job: SlideJob, slide: Path, seq: int, record: SlideRecord, started: float,
                 plan: SlidePlan, summary: ExtractionSummary
                 ) -> tuple[_Output | None, list[RegionChunk]]:
    """The slide's output file and its work items; a slide without tissue gets its empty
    file (and a :class:`NoTissueWarning`) here and ``None``."""
    c, grid = job.config, plan.grid
    coords_attrs, features_attrs = _file_attrs(job, plan.opened, grid, slide.stem)
    writer = FeatureWriter(c.h5_dir / f"{slide.stem}.h5", job.info.embed_dim, c.dtype,
                           coords_attrs=coords_attrs, features_attrs=features_attrs,
                           expected_rows=len(grid.coords))
    if len(grid.coords) == 0:
        message = (f"no tissue tiles ({grid.n_grid} grid tiles, tissue mask "
                   f"{c.tissue_mask!r}); wrote an empty feature file")
        warnings.warn(f"{slide}: {message}", NoTissueWarning, stacklevel=2)
        summary.warnings.append((str(slide), message))
        output = _Output(record=record, plan=plan, writer=writer, started=started, chunks=0)
        _finish(job, output)
        return None, []
    chunks = slide_chunks(seq, slide, plan.opened.mpp_override, plan.decoder, plan.read,
                          grid.coords - grid.context_margin_level0, c.workers)
    bar = tqdm(total=len(grid.coords), desc=slide.stem, unit="patch", leave=False,
               disable=not job.progress, position=1)
    return _Output(record=record, plan=plan, writer=writer, started=started,
                   chunks=len(chunks), bar=bar), chunks


def _finish(job: SlideJob, output: _Output) -> SlideRecord:
    """Commit a slide whose every region was embedded (and its ``.pt``)."""
    c, record, writer = job.config, output.record, output.writer
    if output.bar is not None:
        output.bar.close()
    expected = len(output.plan.grid.coords)
    if writer.n != expected:
        raise RuntimeError(f"embedded {writer.n} tiles of {expected}")
    stem = Path(record.slide).stem
    pt_path = c.pt_dir / f"{stem}.pt"
    tmp = writer.close_temporary()
    if c.also_pt:
        write_pt(tmp, pt_path)
    elif pt_path.is_file():
        pt_path.unlink()  # a .pt from an earlier run no longer matches the new .h5
    writer.commit()
    record.n_patches = expected
    record.seconds = time.perf_counter() - output.started
    return record


def run_slides(slides: Sequence[Path], job: SlideJob, summary: ExtractionSummary,
               on_record: Callable[[SlideRecord], None]) -> None:
    """Embed ``slides`` into ``<out>/h5_files/<stem>.h5`` each (and ``.pt`` with ``also_pt``),
    calling ``on_record`` with each slide's :class:`~.summary.SlideRecord` as it ends (done,
    skipped or failed; a failure never stops the other slides).

    Complete outputs made with the same settings are skipped, others refused unless
    ``overwrite``. Each remaining slide is planned (:func:`plan_slide`) in a thread while the
    slide before it is embedded; its regions are read by the run's single ``DataLoader``
    (:func:`~.loader.make_loader`, ``config.workers`` processes) and embedded on the device
    ``batch_size`` at a time; its file is committed when all have been written.
    """
    c = job.config
    outputs: dict[int, _Output] = {}
    ahead: deque[tuple[int, Path, SlideRecord, Future]] = deque()  # being planned

    def chunks(pool: ThreadPoolExecutor) -> Iterator[RegionChunk]:
        queue = iter(enumerate(slides))

        def submit_next() -> None:
            for seq, slide in queue:
                h5_path = c.h5_dir / f"{slide.stem}.h5"
                record = SlideRecord(slide=str(slide), status="done", rank=job.rank,
                                     output=str(h5_path))
                remove_leftovers(h5_path, c.pt_dir, slide.stem)
                kept = _existing_output(record, h5_path, c.pt_dir / f"{slide.stem}.pt", job)
                if kept is not None:
                    on_record(kept)
                    continue
                ahead.append((seq, slide, record, pool.submit(plan_slide, slide, c)))
                return

        submit_next()
        while ahead:
            seq, slide, record, future = ahead.popleft()
            submit_next()  # the next slide's mask and grid while this one is read
            try:
                plan = future.result()
                # the slide's time runs from its turn (its planning overlapped the slide before)
                output, items = _open_output(job, slide, seq, record, time.perf_counter(),
                                             plan, summary)
            except Exception as error:  # one bad slide must not stop the run
                on_record(_failed(slide, error, job.rank))
                continue
            if output is None:
                on_record(record)
                continue
            outputs[seq] = output
            yield from items

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="equivit-plan") as pool:
        loader = make_loader(lambda: chunks(pool), workers=c.workers,
                             pin_memory=job.device.type == "cuda")
        try:
            for item in loader:
                output = outputs.get(item["slide"])
                if output is None:  # the rest of a slide that failed
                    received(loader, item)
                    continue
                try:
                    if item["error"]:
                        raise SlideError(f"{output.record.slide}: {item['error']}")
                    regions = received(loader, item)
                    if len(regions):
                        output.rows.append(np.arange(item["start"], item["start"] + len(regions)))
                        output.regions.append(regions.to(job.device, non_blocking=True))
                    output.received += 1
                    done = output.received == output.chunks
                    _embed_pending(job, output, everything=done)
                    if done:
                        del outputs[item["slide"]]
                        on_record(_finish(job, output))
                except Exception as error:
                    del outputs[item["slide"]]
                    _abort(output)
                    on_record(_failed(output.record.slide, error, job.rank))
        finally:
            for output in outputs.values():  # interrupted: nothing half-written stays
                _abort(output)
            for *_, future in ahead:
                future.cancel()


def _abort(output: _Output) -> None:
    if output.bar is not None:
        output.bar.close()
    output.writer.abort()
