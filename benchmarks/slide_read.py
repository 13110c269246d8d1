"""Reading slides: the loader against the decode limit, per worker count, and the fixed cost
per slide.

Slides (both real tissue):

* ``realistic_40x.svs``: a 40x (0.25 um/px) Aperio-layout slide, ``--side`` px square
  (default 20480), written once into ``--cache`` (``benchmarks/runs/slide_read``) with
  :func:`equivit_plugin.features.demo.write_aperio_svs` (JPEG 240 px tiles, Q 80, levels 1, 4,
  16, 64x) from a mosaic of 2048 px blocks cut at random from the shared slide
  (``CMU-1-Small-Region.svs``, 4 blocks in 5) and from TIAToolbox's packaged H&E image
  (mirrored 2x2), each turned/flipped at random (seed 0). Pixels are the scans' own, so the
  JPEG tiles cost what scanned tissue costs to decode; read at 0.5 um/px every region is a
  448 px region of level 0, halved, as for a real 40x slide;
* ``CMU-1-Small-Region.svs`` itself (20x, read at its own level 0).

For each slide, at 0.5 um/px, 224 px tiles, the morphological tissue mask, measured side by
side in one run:

* **decode limit**, per decoder: every stored tile that the tissue tiles' regions touch,
  decoded exactly once, on one core, and nothing else: ``openslide`` reads each with
  ``read_region`` (tile-aligned, one stored tile per call); ``tifffile`` decodes each tile's
  bytes (already in memory) with tifffile's codec (imagecodecs, libjpeg-turbo). Given as grid
  tiles/s (tissue tiles over that time); with ``W`` workers the limit is ``min(W, cores)``
  times the one-core limit;
* **loaders** (no model; uint8 regions delivered to the main process): ``per-tile`` is the
  pipeline before this reader (``TileDataset``: one TIAToolbox ``read_rect`` per tile, resized
  on the CPU, in a ``DataLoader``); ``decode-once/<decoder>`` is the pipeline's loader now
  (:mod:`equivit_plugin.features.loader`), whose regions are then resized on the device
  (here the CPU: ``+ resize`` adds that cost, in the main process);
* **fixed cost per slide**: open, tissue mask, grid (without the mask), read planning, and
  the workers' start (once per run: they persist across slides);
* **distillation views** (``benchmarks/distill_views.py``): views made one at a time on the
  CPU against batched on the device;
* **rotation-report regions** (2T = 448 px at 0.5 um/px around each tile): per-region
  ``read_rect`` against the decode-once reader, and their decode limit.

Prints ``loader / limit`` per loader and worker count; results go to
``--out/slide_read.{json,md}``.

    .venv/bin/python benchmarks/slide_read.py --quick      # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/slide_read.py              # every worker count, 3 repeats
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from throughput import cpu_count, cpu_model, publish, table  # noqa: E402

from equivit_plugin.features.demo import write_aperio_svs  # noqa: E402
from equivit_plugin.features.loader import make_loader, received, slide_chunks  # noqa: E402
from equivit_plugin.features.reader import (  # noqa: E402
    LevelPlan,
    RegionReader,
    decoder_for,
    open_tiles,
    plan_read,
    resize_regions,
)
from equivit_plugin.features.slides import open_slide  # noqa: E402
from equivit_plugin.features.tiles import TileDataset, tile_grid  # noqa: E402
from equivit_plugin.utils.atomic import atomic_path  # noqa: E402
from equivit_plugin.utils.demo_data import demo_he_image  # noqa: E402

DATA = Path(os.environ.get("EQUIVIT_DATA", ROOT.parent / "shared" / "data"))
SHARED_SLIDE = DATA / "slides" / "CMU-1-Small-Region.svs"
MPP, TILE = 0.5, 224
BLOCK = 2048


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="workers 0 and 1, one repeat, the per-tile loader on a third of "
                             "the grid rows")
    parser.add_argument("--side", type=int, default=20480,
                        help="side of the realistic slide, level-0 px (at least 20000)")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker counts (default 0 1 2; --quick: 0 1)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--min-tiles", type=int, default=600,
                        help="a slide with fewer tissue tiles is read this many tiles' worth "
                             "of times over, one run (its workers start once)")
    parser.add_argument("--cache", type=Path, default=BENCH / "runs" / "slide_read")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--no-views", action="store_true",
                        help="leave out the distillation views")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- the slide


def realistic_slide(cache: Path, side: int, source: Path = SHARED_SLIDE) -> Path:
    """The 40x mosaic slide (see the module docstring), written once, from ``source`` (the
    shared slide) and TIAToolbox's packaged image."""
    path = cache / f"realistic_40x_{side}.svs"
    if path.is_file():
        return path
    from tiatoolbox.wsicore.wsireader import WSIReader

    log(f"writing {path} (once)")
    reader = WSIReader.open(source)
    width, height = reader.slide_dimensions(resolution=0, units="level")
    scan = np.ascontiguousarray(reader.read_bounds((0, 0, width, height), resolution=0,
                                                   units="level")[..., :3])
    short = [(0, max(0, BLOCK - n)) for n in scan.shape[:2]] + [(0, 0)]
    scan = np.pad(scan, short, mode="symmetric")  # a source smaller than a block: mirrored
    he = demo_he_image()
    he = np.concatenate([np.concatenate([he, he[:, ::-1]], 1),
                         np.concatenate([he[::-1], he[::-1, ::-1]], 1)], 0)
    he = np.pad(he, ((24, 24), (24, 24), (0, 0)), mode="reflect")  # 2048 px
    rng = np.random.default_rng(0)
    blocks = -(-side // BLOCK)
    canvas = np.empty((blocks * BLOCK, blocks * BLOCK, 3), np.uint8)
    for by in range(blocks):
        for bx in range(blocks):
            source = he if rng.random() < 0.2 else scan
            turn = int(rng.integers(8))
            source = np.rot90(source, turn % 4)
            source = source[:, ::-1] if turn >= 4 else source
            y0 = int(rng.integers(0, source.shape[0] - BLOCK + 1))
            x0 = int(rng.integers(0, source.shape[1] - BLOCK + 1))
            canvas[by * BLOCK:(by + 1) * BLOCK, bx * BLOCK:(bx + 1) * BLOCK] = \
                source[y0:y0 + BLOCK, x0:x0 + BLOCK]
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write_aperio_svs(np.ascontiguousarray(canvas[:side, :side]), 0.25, tmp)
    return path


# ------------------------------------------------------------------------ measurements


def timed(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls, and the last result."""
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def stored_tiles(plan: LevelPlan, corners: np.ndarray, tile_size: tuple[int, int]
                 ) -> list[tuple[int, int]]:
    """``(row, col)`` of every stored tile that a region at ``corners`` (level px) touches."""
    tw, th = tile_size
    size = plan.read_size
    needed: set[tuple[int, int]] = set()
    for x, y in corners:
        rows = range(max(0, y) // th, (min(y + size, plan.level_dimensions[1]) - 1) // th + 1)
        cols = range(max(0, x) // tw, (min(x + size, plan.level_dimensions[0]) - 1) // tw + 1)
        needed.update((r, c) for r in rows for c in cols)
    return sorted(needed)


def decode_limit(path: Path, opened: Any, plan: LevelPlan, corners: np.ndarray,
                 decoder: str, repeats: int) -> dict[str, Any]:
    """Seconds to decode each needed stored tile once on one core, with ``decoder``."""
    source = open_tiles(opened.reader, path, plan, decoder)
    needed = stored_tiles(plan, corners, source.tile_size)
    if decoder == "openslide":
        slide, level, ds = opened.reader.openslide_wsi, plan.level, plan.downsample
        tw, th = source.tile_size

        def run() -> None:
            for row, col in needed:
                h, w = source.shape_of(row, col)
                np.asarray(slide.read_region((int(col * tw * ds), int(row * th * ds)), level,
                                             (w, h)))
    else:
        # the bytes are read before timing: decoding alone
        data = [(row, col, source.raw(row, col)) for row, col in needed]

        def run() -> None:
            for row, col, raw in data:
                source.decode(raw, row, col)
    seconds, _ = timed(run, repeats)
    return {"stored_tiles": len(needed), "seconds": seconds,
            "stored_tiles_per_s": len(needed) / seconds}


def decode_once_loader(path: Path, opened: Any, plan: LevelPlan, decoder: str,
                       level0_corners: np.ndarray, workers: int, repeats: int,
                       resize: bool, copies: int = 1) -> dict[str, Any]:
    """The pipeline's loader, tiles/s delivered to the main process: ``copies`` passes over
    the slide in one loader, as a run's slides go through its one set of workers."""
    chunks = [item for copy in range(copies)
              for item in slide_chunks(copy, path, opened.mpp_override, decoder, plan,
                                       level0_corners, workers)]

    def run() -> int:
        n = 0
        loader = make_loader(lambda: chunks, workers=workers, pin_memory=False)
        for item in loader:
            if item["error"]:
                raise RuntimeError(item["error"])
            regions = received(loader, item)
            if resize and len(regions):
                resize_regions(regions.permute(0, 3, 1, 2).float(), plan.out_size)
            n += len(regions)
        return n

    seconds, n = timed(run, repeats)
    if n != copies * len(level0_corners):
        raise RuntimeError(f"the loader delivered {n} regions of {copies} x "
                           f"{len(level0_corners)}")
    return {"tiles": n, "seconds": seconds, "tiles_per_s": n / seconds}


def per_tile_loader(opened: Any, coords: np.ndarray, size: int, workers: int,
                    repeats: int, copies: int = 1) -> dict[str, Any]:
    """The pipeline before: one ``read_rect`` per tile in ``TileDataset`` workers, a new
    ``DataLoader`` (and its workers) per slide, ``copies`` slides."""
    from torch.utils.data import DataLoader

    dataset = TileDataset(opened, coords, size, MPP, reuse_reader=workers == 0)

    def run() -> int:
        return sum(len(b) for _ in range(copies)
                   for b in DataLoader(dataset, batch_size=32, num_workers=workers))

    seconds, n = timed(run, repeats)
    return {"tiles": n, "seconds": seconds, "tiles_per_s": n / seconds}


def worker_start(path: Path, opened: Any, plan: LevelPlan, decoder: str, workers: int) -> float:
    """Seconds from ``iter(loader)`` to the first region with ``workers`` workers, less the
    time the main process takes to read that first chunk itself."""
    if workers == 0:
        return 0.0
    chunk = slide_chunks(0, path, opened.mpp_override, decoder, plan,
                         np.zeros((1, 2), np.int64) + np.asarray(plan.level_dimensions) // 3, 1)
    start = time.perf_counter()
    RegionReader(opened.reader, plan, open_tiles(opened.reader, path, plan, decoder)
                 ).regions(chunk[0].corners)
    alone = time.perf_counter() - start
    start = time.perf_counter()
    next(iter(make_loader(lambda: chunk * workers, workers=workers, pin_memory=False)))
    return max(0.0, time.perf_counter() - start - alone)


def fixed_costs(path: Path, repeats: int) -> dict[str, float]:
    """Open, mask + grid, grid alone, read planning: median seconds (imports warmed)."""
    open_s, opened = timed(lambda: open_slide(path), repeats)
    grid_s, grid = timed(lambda: tile_grid(opened, target_mpp=MPP, patch_size=TILE,
                                           stride=TILE), repeats)
    bare_s, _ = timed(lambda: tile_grid(opened, target_mpp=MPP, patch_size=TILE, stride=TILE,
                                        tissue_mask="none"), repeats)

    def planning() -> None:
        plan = plan_read(opened.reader, TILE, MPP)
        slide_chunks(0, path, None, decoder_for(opened.reader), plan, grid.coords, 1)

    plan_s, _ = timed(planning, repeats)
    return {"open_s": open_s, "mask_and_grid_s": grid_s, "grid_without_mask_s": bare_s,
            "tissue_mask_s": max(0.0, grid_s - bare_s), "read_planning_s": plan_s,
            "beyond_mask_s": open_s + bare_s + plan_s}


def bench_slide(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    repeats = args.repeats
    opened = open_slide(path)
    tile_grid(opened, target_mpp=MPP, patch_size=TILE, stride=TILE)  # imports, caches
    costs = fixed_costs(path, repeats)
    grid = tile_grid(opened, target_mpp=MPP, patch_size=TILE, stride=TILE)
    plan = plan_read(opened.reader, TILE, MPP)
    corners = plan.corners(grid.coords)
    decoders = ["openslide", "tifffile"]
    log(f"{path.name}: {len(grid.coords)} tissue tiles of {grid.n_grid}, level {plan.level}, "
        f"regions {plan.read_size} px")
    limits = {d: decode_limit(path, opened, plan, corners, d, repeats) for d in decoders}
    for d, limit in limits.items():
        limit["tiles_per_s"] = len(corners) / limit["seconds"]
        log(f"  limit {d}: {limit['stored_tiles']} stored tiles in {limit['seconds']:.2f} s")
    cores = cpu_count()
    rows: list[dict[str, Any]] = []
    subset = grid.coords
    if args.quick:  # the per-tile loader is slow: a third of the grid rows
        ys = np.unique(grid.coords[:, 1])
        subset = grid.coords[grid.coords[:, 1] <= ys[len(ys) // 3]]
    # a small slide is read several times over (a cohort of it), so that what a run pays
    # once (the workers' start) weighs as it does over many slides
    copies = max(1, -(-args.min_tiles // len(grid.coords)))
    subset_copies = max(1, -(-args.min_tiles // len(subset)))
    for workers in args.workers:
        scale = max(1, min(workers, cores))
        entries = {"per-tile": per_tile_loader(opened, subset, TILE, workers, repeats,
                                               subset_copies)}
        for d in decoders:
            entries[f"decode-once/{d}"] = decode_once_loader(
                path, opened, plan, d, grid.coords, workers, repeats, resize=False,
                copies=copies)
        entries[f"decode-once/{decoders[0]} + resize"] = decode_once_loader(
            path, opened, plan, decoders[0], grid.coords, workers, repeats, resize=True,
            copies=copies)
        for name, entry in entries.items():
            decoder = name.split("/")[1].split(" ")[0] if "/" in name else "openslide"
            limit = limits[decoder]["tiles_per_s"] * scale
            rows.append({"workers": workers, "loader": name, **entry,
                         "limit_decoder": decoder, "limit_tiles_per_s": limit,
                         "loader_over_limit": entry["tiles_per_s"] / limit})
            log(f"  workers {workers} {name}: {entry['tiles_per_s']:.1f} tiles/s, "
                f"{entry['tiles_per_s'] / limit:.3f} of the {decoder} limit")
    starts = {w: worker_start(path, opened, plan, "openslide", w) for w in args.workers}
    return {"slide": path.name, "tiles": len(grid.coords), "grid_tiles": grid.n_grid,
            "copies": copies,
            "level": plan.level, "read_size": plan.read_size, "fixed": costs,
            "worker_start_s": starts, "limits": limits, "loaders": rows}


def report_regions(path: Path, repeats: int) -> dict[str, Any]:
    """The rotation report's regions (2T around each tile): per-region ``read_rect`` vs the
    decode-once reader, one core."""
    from equivit_plugin.features.tiles import read_tile

    opened = open_slide(path)
    grid = tile_grid(opened, target_mpp=MPP, patch_size=TILE, stride=TILE)
    margin = int(round(TILE // 2 * MPP / opened.level0_mpp[0]))
    level0 = grid.coords - margin
    plan = plan_read(opened.reader, 2 * TILE, MPP)
    corners = plan.corners(level0)
    reader = opened.reader

    def per_region() -> None:
        for xy in level0:
            read_tile(reader, xy, 2 * TILE, MPP)

    def once() -> None:
        RegionReader(reader, plan, open_tiles(reader, path, plan, "openslide")).regions(corners)

    per_s, _ = timed(per_region, repeats)
    once_s, _ = timed(once, repeats)
    limit = decode_limit(path, opened, plan, corners, "openslide", repeats)
    n = len(corners)
    return {"slide": path.name, "regions": n, "region_size": 2 * TILE,
            "per_region_read_rect_per_s": n / per_s, "decode_once_per_s": n / once_s,
            "limit_per_s": n / limit["seconds"],
            "decode_once_over_limit": limit["seconds"] / once_s,
            "speed_up": per_s / once_s}


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [f"# Reading slides: loader vs decode limit ({m['device']})", "",
             f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, python {m['python']}; "
             f"0.5 um/px, {TILE} px tiles, morphological tissue mask; median of "
             f"{s['repeats']} run(s){' (--quick)' if s['quick'] else ''}.", ""]
    for slide in report["slides"]:
        f = slide["fixed"]
        over = f", read {slide['copies']} times over" if slide["copies"] > 1 else ""
        lines += [f"## {slide['slide']}: {slide['tiles']} tissue tiles of {slide['grid_tiles']}, "
                  f"level {slide['level']} regions of {slide['read_size']} px{over}", ""]
        lines += table(["decoder", "stored tiles", "limit s (1 core)", "limit tiles/s"],
                       [[d, str(v["stored_tiles"]), f"{v['seconds']:.2f}",
                         f"{v['tiles_per_s']:.1f}"] for d, v in slide["limits"].items()])
        lines += [""]
        lines += table(["workers", "loader", "tiles", "tiles/s", "limit tiles/s",
                        "loader / limit"],
                       [[str(r["workers"]), r["loader"], str(r["tiles"]),
                         f"{r['tiles_per_s']:.1f}", f"{r['limit_tiles_per_s']:.1f} "
                         f"({r['limit_decoder']})", f"**{r['loader_over_limit']:.3f}**"]
                        for r in slide["loaders"]])
        starts = ", ".join(f"{w} workers {s:.2f} s" for w, s in slide["worker_start_s"].items())
        lines += ["", f"Fixed cost per slide: open {f['open_s']:.3f} s, tissue mask "
                      f"{f['tissue_mask_s']:.3f} s, grid {f['grid_without_mask_s']:.3f} s, "
                      f"read planning {f['read_planning_s']:.3f} s: **{f['beyond_mask_s']:.3f} s "
                      f"beyond the tissue mask**; worker start (once per run) {starts}.", ""]
    if report.get("report_regions"):
        r = report["report_regions"]
        lines += [f"## Rotation-report regions ({r['slide']}, {r['regions']} regions of "
                  f"{r['region_size']} px, one core)", ""]
        lines += table(["per-region read_rect /s", "decode-once /s", "limit /s",
                        "decode-once / limit", "speed-up"],
                       [[f"{r['per_region_read_rect_per_s']:.1f}", f"{r['decode_once_per_s']:.1f}",
                         f"{r['limit_per_s']:.1f}", f"{r['decode_once_over_limit']:.3f}",
                         f"{r['speed_up']:.2f}x"]])
        lines += [""]
    if report.get("views"):
        v = report["views"]
        lines += ["## Distillation views (benchmarks/distill_views.py)", "", v["table"], ""]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side < 20000 and not args.quick:
        log(f"--side {args.side}: below the 20000 px a realistic slide needs")
    args.workers = args.workers or ([0, 1] if args.quick else [0, 1, 2])
    args.repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(1)  # the loaders' own cores are measured, not torch's threads
    slides = [realistic_slide(args.cache, args.side), SHARED_SLIDE]
    report: dict[str, Any] = {
        "machine": {"device": "cpu", "cpu": cpu_model(), "cores": cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "settings": {"quick": args.quick, "repeats": args.repeats, "workers": args.workers,
                     "side": args.side},
        "slides": [bench_slide(path, args) for path in slides if path.is_file()],
    }
    report["report_regions"] = report_regions(slides[0], args.repeats)
    if not args.no_views:
        from distill_views import measure_view_making
        from distill_views import render as render_views

        # one torch thread: what one DataLoader worker (the old path's home) has
        report["views"] = measure_view_making(n_batches=3 if args.quick else 10, threads=1)
        report["views"]["table"] = render_views(report["views"])
    publish(args.out, "slide_read", report, render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
