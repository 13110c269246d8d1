"""Rotation/flip invariance of MIL features, measured through the extraction pipeline.

The real slide ``CMU-1-Small-Region.svs`` is read at 0.5 um/px and cropped to a multiple of
the patch size (so the 224-px grid maps onto itself under every rotation/flip); each of the 8
D4 transforms of that image is saved as a PNG "slide" (``--slide-mpp 0.5``) and run through
``extract_features`` end to end (tissue mask, tiling, reading, model, HDF5). Tiles are matched
by where their pixels came from, then, per transform and model: per-tile cosine between the
features of a tile and of its transformed copy (mean, min) and the mutual-kNN similarity of
the two feature sets (Huh et al. 2024; the measure Elphick et al., arXiv 2412.11938, report
0.53-0.85 for pathology foundation models).

    .venv/bin/python benchmarks/pipeline_invariance.py          # about 4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cpu_model, publish, table  # noqa: E402

from equivit_plugin.equivariance import D4_TRANSFORMS, mutual_knn_similarity  # noqa: E402
from equivit_plugin.features import extract_features, read_features  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EQUIVIT_DATA", ROOT.parent / "shared" / "data"))


def source_image(slide: Path, patch: int) -> np.ndarray:
    from tiatoolbox.wsicore.wsireader import WSIReader

    reader = WSIReader.open(slide)
    width, height = reader.slide_dimensions(resolution=0.5, units="mpp")
    width, height = width // patch * patch, height // patch * patch
    return reader.read_bounds((0, 0, width, height), resolution=0.5, units="mpp",
                              coord_space="resolution")


def transformed(array: np.ndarray, fn: Any) -> np.ndarray:
    """Apply a D4 transform (on the last two dims of a tensor) to an ``(H, W, C)`` array."""
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    return np.ascontiguousarray(fn(tensor).permute(1, 2, 0).numpy())


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def render(report: dict[str, Any]) -> str:
    settings, (width, height) = report["settings"], report["image"]
    rows = [[model, name, str(r["tiles"]), f"{r['cosine_mean']:.7f}", f"{r['cosine_min']:.7f}",
             f"{r['mutual_knn']:.3f}"]
            for model, per in report["results"].items() for name, r in per.items()
            if name != "rot0"]
    return "\n".join([
        "# Feature invariance through the extraction pipeline", "",
        f"`{Path(settings['slide']).name}` at 0.5 um/px cropped to {width}x{height} px, its 8 "
        f"rotations/flips as PNG slides, `extract_features` (morphological tissue mask, 224-px "
        f"tiles, random weights, seed 0), tiles matched by source position (tiles the mask kept "
        f"in only one of the two images are left out); mutual kNN with k = {settings['k']}. "
        f"{report['cpu']}.", "",
        *table(["model", "transform", "tiles", "cosine mean", "cosine min", "mutual kNN"], rows),
        ""])


def main(argv: Sequence[str] | None = None) -> int:
    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=DATA / "slides" / "CMU-1-Small-Region.svs")
    parser.add_argument("--models", nargs="+",
                        default=["equivit_ri_small_patch16_224", "vit_small_patch16_224"])
    parser.add_argument("--k", type=int, default=10, help="neighbourhood size of mutual kNN")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    patch = 224
    image = source_image(args.slide, patch)
    height, width = image.shape[:2]
    # where each pixel of a transformed image came from: (row, col) index planes, transformed
    origin = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), -1)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: said in the report instead
        tmp_path = Path(tmp)
        slides = {}
        for name, fn in D4_TRANSFORMS:
            slides[name] = tmp_path / f"{name}.png"
            Image.fromarray(transformed(image, fn)).save(slides[name])
        for model in args.models:
            out = tmp_path / model
            summary = extract_features(list(slides.values()), out, model=model, slide_mpp=0.5,
                                       batch_size=args.batch_size, print_summary=False)
            if not summary.ok:
                raise SystemExit(f"extraction failed: {summary.failed}")
            reference: dict[tuple[int, int], np.ndarray] = {}
            results[model] = {}
            for name, fn in D4_TRANSFORMS:
                features, coords, _ = read_features(out / "h5_files" / f"{name}.h5")
                rows = transformed(origin, fn)
                # original top-left of each tile: the smallest source (row, col) inside it
                keys = [tuple(int(v) for v in rows[y:y + patch, x:x + patch].reshape(-1, 2)
                              .min(0)[::-1]) for x, y in coords]
                if name == "rot0":
                    reference = dict(zip(keys, features))
                common = [i for i, key in enumerate(keys) if key in reference]
                a = np.stack([reference[keys[i]] for i in common])
                b = features[common]
                cos = cosine(a, b)
                results[model][name] = {
                    "tiles": len(common), "tiles_unmatched": len(keys) - len(common),
                    "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                    "mutual_knn": mutual_knn_similarity(a, b, k=args.k),
                }
                print(f"{model} {name}: {results[model][name]}", file=sys.stderr)
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "image": [width, height],
              "cpu": cpu_model(), "results": results}
    markdown = render(report)
    publish(args.out, "pipeline_invariance", report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
