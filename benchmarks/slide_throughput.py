"""Slide-level feature extraction throughput against the model's own forward pass.

For each model in ``--models`` (random weights, seed 0), on one slide, side by side in one run:

* ``model-only``: the encoder's forward (``forward_head(forward_features(x),
  pre_logits=True)``, ``torch.inference_mode``) on the slide's N tissue patches, already read
  and normalised in memory, in batches of ``--batch-size``: the ceiling;
* ``tiatoolbox``: ``DeepFeatureExtractor(model=EquiViTEncoder(...)).run(images=[slide],
  patch_mode=False, output_type="zarr", auto_get_mask=True)``, end to end (tissue mask,
  reading, preprocessing, inference, writing);
* ``pipeline``: ``equivit_plugin.features.extract_features`` (slide -> HDF5), end to end
  (only when that module is installed).

Each is timed ``--repeats`` times in rotating round-robin order (first call per runner is a
warm-up, not timed); the median is reported as patches/s and as a ratio to ``model-only`` on
the same N patches, batch size and threads. Results go to stdout (markdown) and to
``--out/slide_throughput_<device>.{json,md}``.

    .venv/bin/python benchmarks/slide_throughput.py                 # CPU, about 5 minutes
    .venv/bin/python benchmarks/slide_throughput.py --device cuda --amp bf16 --batch-size 128
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cpu_count, cpu_model, publish, table  # noqa: E402

import equivit_plugin  # noqa: E402
from equivit_plugin.models import normalise_tile  # noqa: E402
from equivit_plugin.tiatoolbox import EquiViTEncoder, make_ioconfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EQUIVIT_DATA", ROOT.parent / "shared" / "data"))
Runner = Callable[[], int]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=Path, nargs="+",
                        default=[DATA / "slides" / "CMU-1-Small-Region.svs"])
    parser.add_argument("--mosaic", action="store_true",
                        help="also a 4x larger slide (the first slide mirrored 2x2, JPEG-tiled "
                             "TIFF; see pipeline_memory.py): a cohort of slides, so fixed "
                             "per-run costs (model build) weigh as they do in real use")
    parser.add_argument("--models", nargs="+",
                        default=["equivit_ri_small_patch16_224", "vit_small_patch16_224"])
    parser.add_argument("--engines", nargs="+", default=["tiatoolbox", "pipeline"],
                        choices=["tiatoolbox", "pipeline"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="loader workers of each engine")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def read_tissue_patches(boxes: dict[Path, np.ndarray]) -> torch.Tensor:
    """The engine's patches of every slide, read once with WSIReader and normalised,
    ``(N, 3, 224, 224)``."""
    from tiatoolbox.wsicore.wsireader import WSIReader

    tiles = []
    for slide, slide_boxes in boxes.items():
        reader = WSIReader.open(slide)
        tiles += [normalise_tile(reader.read_bounds(tuple(int(v) for v in box), resolution=0.5,
                                                    units="mpp", pad_constant_values=255,
                                                    coord_space="resolution"))
                  for box in slide_boxes]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


def tiatoolbox_runner(encoder: EquiViTEncoder, args: argparse.Namespace,
                      workdir: Path) -> tuple[Runner, dict[Path, np.ndarray]]:
    from tiatoolbox.models.engine.deep_feature_extractor import DeepFeatureExtractor

    engine = DeepFeatureExtractor(model=encoder, batch_size=args.batch_size,
                                  num_workers=args.workers, device=args.device)

    def run() -> tuple[int, dict[Path, np.ndarray]]:
        import zarr

        out_dir = workdir / "tiatoolbox"
        shutil.rmtree(out_dir, ignore_errors=True)
        result = engine.run(images=list(args.slides), patch_mode=False,
                            ioconfig=make_ioconfig(), save_dir=out_dir, output_type="zarr",
                            auto_get_mask=True, device=args.device)
        synchronize(args.device)
        boxes = {slide: np.asarray(zarr.open(str(result[slide]), mode="r")["coordinates"])
                 for slide in args.slides}
        return sum(len(b) for b in boxes.values()), boxes

    _, boxes = run()  # warm-up; also gives the tissue patches for model-only
    return (lambda: run()[0]), boxes


def pipeline_runner(model: str, args: argparse.Namespace, workdir: Path) -> Runner:
    from equivit_plugin.features import extract_features

    def run() -> int:
        out_dir = workdir / "pipeline"
        shutil.rmtree(out_dir, ignore_errors=True)
        summary = extract_features(list(args.slides), out_dir, model=model,
                                   batch_size=args.batch_size, workers=args.workers,
                                   device=args.device,
                                   precision="fp32" if args.amp == "none" else args.amp)
        synchronize(args.device)
        return int(summary.n_patches)

    run()
    return run


def model_only_runner(encoder: EquiViTEncoder, patches: torch.Tensor,
                      args: argparse.Namespace) -> Runner:
    device = torch.device(args.device)
    net = encoder.to(device).eval()
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    # on CUDA the patches start in host memory, as they would after a loader
    patches = patches.pin_memory() if device.type == "cuda" else patches

    def run() -> int:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                    enabled=dtype is not None):
            for start in range(0, len(patches), args.batch_size):
                batch = patches[start:start + args.batch_size].to(device, non_blocking=True)
                net(batch).float().cpu()
        synchronize(args.device)
        return len(patches)

    run()
    return run


def round_robin(runners: dict[str, Runner], repeats: int) -> dict[str, dict[str, Any]]:
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    counts: dict[str, int] = {}
    names = list(runners)
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            start = time.perf_counter()
            counts[name] = runners[name]()
            seconds[name].append(time.perf_counter() - start)
            log(f"  {name}: {counts[name]} patches in {seconds[name][-1]:.2f} s")
    return {name: {"patches": counts[name], "seconds": seconds[name],
                   "median_s": statistics.median(seconds[name]),
                   "patches_per_s": counts[name] / statistics.median(seconds[name])}
            for name in runners}


def bench_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    adapter_kwargs = {"autocast": None if args.amp == "none" else args.amp}
    encoder = EquiViTEncoder.from_name(model, adapter_kwargs=adapter_kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        runners: dict[str, Runner] = {}
        tia_run, boxes = tiatoolbox_runner(encoder, args, workdir)
        runners["model-only"] = model_only_runner(encoder, read_tissue_patches(boxes), args)
        if "tiatoolbox" in args.engines:
            runners["tiatoolbox"] = tia_run
        if "pipeline" in args.engines:
            try:
                runners["pipeline"] = pipeline_runner(model, args, workdir)
            except ImportError as error:
                log(f"pipeline skipped: {error}")
        timings = round_robin(runners, args.repeats)
    base = timings["model-only"]["patches_per_s"]
    for timing in timings.values():
        timing["ratio_to_model_only"] = timing["patches_per_s"] / base
    return timings


def render(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    slides = ", ".join(f"`{Path(p).name}`" for p in s["slides"])
    lines = [f"# Slide feature-extraction throughput ({s['device']})", "",
             f"Slides {slides}, batch {s['batch_size']}, {s['amp']} autocast, "
             f"{m['threads']} threads, loader workers {s['workers']}, median of "
             f"{s['repeats']} round-robin rounds; {m['device_name']}, torch {m['torch']}, "
             f"tiatoolbox {m['tiatoolbox']}.", ""]
    rows = [[model, name, str(t["patches"]), f"{t['patches_per_s']:.2f}",
             f"{t['ratio_to_model_only']:.3f}", f"{min(t['seconds']):.2f}-{max(t['seconds']):.2f}"]
            for model, timings in report["results"].items() for name, t in timings.items()]
    lines += table(["model", "runner", "patches", "patches/s", "vs model-only", "seconds (range)"],
                   rows)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for slide in args.slides:
        if not slide.is_file():
            raise SystemExit(f"--slides {slide} not found (set EQUIVIT_DATA or pass --slides)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.mosaic:
            from pipeline_memory import make_slides

            args.slides = [*args.slides, make_slides(args.slides[0], Path(tmp))["4x"]]
        return run_all(args)


def run_all(args: argparse.Namespace) -> int:
    import tiatoolbox

    device_name = cpu_model()
    if torch.device(args.device).type == "cuda":
        device_name = torch.cuda.get_device_name(args.device)
    report: dict[str, Any] = {
        "settings": {k: [str(p) for p in v] if k == "slides" else
                     str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "tiatoolbox": tiatoolbox.__version__,
                    "equivit_plugin": equivit_plugin.__version__, "cpu_model": cpu_model(),
                    "cpu_cores": cpu_count(), "threads": torch.get_num_threads(),
                    "device_name": device_name},
        "results": {},
    }
    for model in args.models:
        log(f"{model}")
        report["results"][model] = bench_model(model, args)
    stem = f"slide_throughput_{torch.device(args.device).type}{'_mosaic' if args.mosaic else ''}"
    publish(args.out, stem, report, render(report))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
