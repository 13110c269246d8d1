"""Slides in, one feature file per slide out: :func:`extract_features`.

The run, in order: the arguments are checked (:class:`~.config.ExtractionConfig`), the rank
layout and device found (:mod:`.distributed`), the encoder built (:mod:`.encoder`); then this
rank's share of the slides goes through :func:`~.slide_job.run_slides` (one reader pool for
all of them, the next slide prepared while one is embedded) and the ranks' summaries are
combined (:mod:`.summary`); rank 0 prints it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MODEL,
    DEFAULT_MPP,
    ExtractionConfig,
)
from .distributed import Ranks, gather_summaries, process_group, ranks_from_env, resolve_device
from .encoder import automatic_context, build_encoder, warn_random_weights
from .slide_job import SlideJob, run_slides
from .summary import ExtractionSummary, SlideRecord

__all__ = ["extract_features", "run_extraction"]


def _run_share(job: SlideJob, ranks: Ranks, started: float) -> ExtractionSummary:
    """This rank's slides, ``slide_paths[rank::world_size]``, one after the other."""
    config = job.config
    summary = ExtractionSummary(world_size=ranks.world_size, out_dir=str(config.out_dir))
    share = config.slide_paths[ranks.rank::ranks.world_size]
    desc = "slides" if ranks.world_size == 1 else f"slides (rank {ranks.rank})"
    bar = tqdm(total=len(share), desc=desc, unit="slide", disable=not job.progress,
               position=0)

    def on_record(record: SlideRecord) -> None:
        summary.add(record)
        bar.update(1)
        if config.verbose:
            detail = (f"{record.n_patches} patches in {record.seconds:.1f} s"
                      if record.status == "done" else record.reason)
            tqdm.write(f"[rank {ranks.rank}] {record.status} {record.slide}: {detail}",
                       file=sys.stderr)

    with bar:
        run_slides(share, job, summary, on_record)
    summary.seconds = time.perf_counter() - started
    return summary


def run_extraction(config: ExtractionConfig, *, print_summary: bool = True) -> ExtractionSummary:
    """Run a checked configuration (what :func:`extract_features` does after checking).

    Raises:
        ExtractionConfigError: the output folder, the device or the model is unusable.
    """
    started = time.perf_counter()
    config.prepare_output()
    ranks = ranks_from_env()
    device = resolve_device(config.device, ranks)
    encoder, info = build_encoder(config.model, weights=config.weights,
                                  patch_size=config.patch_size, context=config.context,
                                  model_kwargs=config.model_kwargs,
                                  d4_average=config.d4_average, seed=config.seed)
    config.set_patch_size(info.img_size)
    config.set_context(automatic_context(encoder.net, info.img_size))
    warn_random_weights(info, config.seed)
    progress = config.verbose or (sys.stderr.isatty() and ranks.rank == 0)
    job = SlideJob(config=config, encoder=encoder.to(device), info=info, device=device,
                   rank=ranks.rank, progress=progress)
    with process_group(ranks, device):
        summary = gather_summaries(_run_share(job, ranks, started), ranks)
    if print_summary and ranks.rank == 0:
        print(summary.format(), flush=True)
    return summary


def extract_features(
    slides: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    model: str | Path = DEFAULT_MODEL,
    weights: str | Path | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    mpp: float = DEFAULT_MPP,
    slide_mpp: float | None = None,
    patch_size: int | None = None,
    stride: int | None = None,
    context: int | None = None,
    tissue_mask: str = "morphological",
    min_tissue: float = 0.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    decoder: str = "auto",
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
        model: a foundation model's name (``equivit encoders``: ``uni_v1``, ``kaiko-vits16``...;
            give ``weights``), a checkpoint path, or a registered timm name (random weights,
            with a warning).
        weights: a foundation model's released weights (file or folder).
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"depth": 1}``).
        mpp: target resolution, micrometres per pixel (0.5 is 20x).
        slide_mpp: resolution of slides without resolution metadata (plain images).
        patch_size: tile side at ``mpp`` (pixels); must be the model's input size (default:
            the model's input size; 224 for a registered timm name).
        stride: grid step at ``mpp`` (default ``patch_size``: no overlap).
        context: side, in pixels at ``mpp``, of the square region centred on each cell that
            the encoder embeds (the cell's ``coords`` and ``patch_size`` stay the cell's).
            Default ``None``: automatic, the cell itself except for a model that sees only its
            inscribed disc (``equivit_disc``), which gets the smallest multiple of its patch
            size whose disc covers the whole cell (320 for 224 px cells; it then runs with
            ``dynamic_img_size=True``). ``0`` or ``patch_size``: the cell alone; smaller than
            the cell: an error.
        tissue_mask: ``"morphological"``, ``"otsu"`` (TIAToolbox maskers) or ``"none"``.
        min_tissue: minimum tissue fraction of a kept tile (``0``: any tissue).
        batch_size: tiles per forward pass.
        workers: ``DataLoader`` worker processes reading tiles, for the whole run (default
            from the cores available: all but one on CUDA, one on the CPU; ``0`` reads in this
            process).
        decoder: what decodes the slides' stored tiles (each once, :mod:`.reader`):
            ``"auto"`` (the library TIAToolbox opens the slide with: OpenSlide for ``.svs``),
            ``"openslide"``, or ``"tifffile"`` (TIFF-based slides; faster where measured).
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
        The :class:`~.summary.ExtractionSummary` of the whole run (all ranks).

    Raises:
        ExtractionConfigError: bad arguments, raised before anything is processed; the
            message names the argument (``patch_size=``) and ``.argument`` holds it.
    """
    config = ExtractionConfig(
        slides=slides, out_dir=out_dir, model=model, weights=weights,
        model_kwargs=model_kwargs, mpp=mpp,
        slide_mpp=slide_mpp, patch_size=patch_size, stride=stride, context=context,
        tissue_mask=tissue_mask,
        min_tissue=min_tissue, batch_size=batch_size, workers=workers, decoder=decoder,
        device=device,
        precision=precision, dtype=dtype, also_pt=also_pt, overwrite=overwrite,
        d4_average=d4_average, seed=seed, verbose=verbose)
    return run_extraction(config, print_summary=print_summary)
