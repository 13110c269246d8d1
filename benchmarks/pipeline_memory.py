"""Peak memory of ``equivit extract-features`` on a slide and on a 4x larger one.

Both slides are written by this script in the same format (JPEG-tiled pyramidal TIFF, read by
TIAToolbox's ``TIFFWSIReader``) from the real slide ``CMU-1-Small-Region.svs``: ``1x`` is the
slide itself, ``4x`` is it mirrored into a 2x2 mosaic (4x the area and the tissue). Each
extraction runs in a fresh process; its peak resident memory (``ru_maxrss``) is reported for
the main process and, separately, for the loader workers. The target: the 4x slide's peak
within 10 % of the 1x slide's (memory must not grow with slide size).

    .venv/bin/python benchmarks/pipeline_memory.py             # about 4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cpu_model, publish, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EQUIVIT_DATA", ROOT.parent / "shared" / "data"))

DRIVER = """
import json, resource, sys, time
from equivit_plugin.features import extract_features
start = time.perf_counter()
summary = extract_features([sys.argv[1]], sys.argv[2], model=sys.argv[3],
                           batch_size=int(sys.argv[4]), workers=int(sys.argv[5]),
                           print_summary=False)
print(json.dumps({
    "patches": summary.n_patches, "seconds": time.perf_counter() - start,
    "failed": summary.failed,
    "main_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "workers_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}))
"""


def write_tiff_slide(image: np.ndarray, mpp: float, path: Path) -> Path:
    """A JPEG-tiled pyramidal TIFF (levels halved down to <= 1024 px) with its resolution."""
    from equivit_plugin.features.demo import write_pyramid_tiff

    return write_pyramid_tiff(image, mpp, path, smallest_level=1024)


def make_slides(source: Path, folder: Path) -> dict[str, Path]:
    from tiatoolbox.wsicore.wsireader import WSIReader

    reader = WSIReader.open(source)
    mpp = float(reader.info.mpp[0])
    width, height = reader.slide_dimensions(resolution=0, units="level")
    image = reader.read_bounds((0, 0, width, height), resolution=0, units="level")
    mosaic = np.concatenate([np.concatenate([image, image[:, ::-1]], axis=1),
                             np.concatenate([image[::-1], image[::-1, ::-1]], axis=1)], axis=0)
    return {"1x": write_tiff_slide(image, mpp, folder / "slide_1x.tif"),
            "4x": write_tiff_slide(np.ascontiguousarray(mosaic), mpp, folder / "slide_4x.tif")}


def measure(slide: Path, out_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(slide), str(out_dir), args.model,
         str(args.batch_size), str(args.workers)],
        capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=DATA / "slides" / "CMU-1-Small-Region.svs")
    parser.add_argument("--model", default="equivit_ri_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        slides = make_slides(args.slide, Path(tmp))
        for name, slide in slides.items():
            results[name] = measure(slide, Path(tmp) / f"out_{name}", args)
            print(f"{name}: {results[name]}", file=sys.stderr)
    growth = results["4x"]["main_peak_mib"] / results["1x"]["main_peak_mib"] - 1
    worker_growth = (results["4x"]["workers_peak_mib"] / results["1x"]["workers_peak_mib"] - 1
                     if results["1x"]["workers_peak_mib"] else 0.0)
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "cpu": cpu_model(),
              "results": results, "main_growth": growth, "workers_growth": worker_growth,
              "target_met": growth <= 0.10 and worker_growth <= 0.10}
    rows = [[name, str(r["patches"]), f"{r['seconds']:.1f}", f"{r['main_peak_mib']:.0f}",
             f"{r['workers_peak_mib']:.0f}"] for name, r in results.items()]
    markdown = "\n".join([
        "# Peak memory of feature extraction vs slide size", "",
        f"`{args.model}`, batch {args.batch_size}, {args.workers} loader worker(s), "
        f"{cpu_model()}; slides written from `{args.slide.name}` as JPEG-tiled TIFF.", "",
        *table(["slide", "patches", "seconds", "main peak MiB", "worker peak MiB"], rows), "",
        f"4x vs 1x: main process {growth:+.1%}, loader workers {worker_growth:+.1%} "
        f"(target <= +10 %: {'met' if report['target_met'] else 'missed'}).", ""])
    publish(args.out, "pipeline_memory", report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
