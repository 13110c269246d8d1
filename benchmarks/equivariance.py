"""Rotation equivariance of Equi-ViT next to ConvViT and timm ViT, measured on real H&E tiles.

For randomly initialised models (fixed seed; equivariance is a property of the architecture,
not of training) this measures:

* token equivariance of the patch embedding (the paper's Fig. 2): cosine similarity between
  the tokens of a transformed tile and the transformed token grid of the original tile, under
  the 8 exact rotations/flips of the square (target >= 0.99999 for Equi-ViT) and every
  ``--angle-step`` degrees from 0 to 360 (bilinear rotation with reflect padding; off-grid
  angles compare only tokens inside the inscribed circle minus one token; the paper reports
  > 0.95 for Equi-ViT);
* invariance of pooled features and logits under the 8 D4 transforms (max abs difference vs
  the untransformed tile) for ``--invariance-models`` (default Equi-ViT-RI, with timm ViT as
  the contrast), on the first ``--invariance-tiles`` tiles (full forward passes are costly on
  a CPU).

Tiles are read from ``$EQUIVIT_DATA`` (default ``../shared/data`` relative to the repository
root): ``crc_tiles/<CLASS>/*.png|*.tif`` and ``lc25000_lung_train/<class>/*.jpeg|*.jpg``,
224x224 RGB, normalised with the ImageNet mean/std. ``--max-tiles`` takes tiles round-robin
over the class folders, so small subsets still cover every class.

Writes ``equivariance.json``, ``equivariance.md`` and ``equivariance_similarity.png`` to
``--out`` (default ``benchmarks/results``). From the repository root::

    .venv/bin/python benchmarks/equivariance.py --max-tiles 8     # smoke run, ~1 minute
    .venv/bin/python benchmarks/equivariance.py                   # all tiles
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import equivit_plugin  # noqa: F401  (registers the equivit_* / convvit_* models in timm)
from equivit_plugin.equivariance import (
    D4_NAMES,
    d4_token_similarity,
    feature_invariance,
    plot_similarity_vs_angle,
    token_similarity,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = {
    "crc_tiles": ("*.png", "*.tif", "*.tiff"),
    "lc25000_lung_train": ("*.jpeg", "*.jpg"),
}
TILE_SIZE = 224
MODELS = (
    "equivit_small_patch16_224",
    "equivit_ri_small_patch16_224",
    "convvit_small_patch16_224",
    "vit_small_patch16_224",
)
TOKEN_TARGET = 0.99999


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("EQUIVIT_DATA",
                                                    REPO_ROOT.parent / "shared" / "data")),
                        help="data folder (default $EQUIVIT_DATA or ../shared/data)")
    parser.add_argument("--max-tiles", type=int, default=None,
                        help="use at most this many tiles, round-robin over classes (default all)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results",
                        help="output folder (default benchmarks/results)")
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        help="timm model names (patch16, 224)")
    parser.add_argument("--angle-step", type=float, default=15.0,
                        help="degrees between angles of the arbitrary-angle sweep (default 15)")
    parser.add_argument("--invariance-models", nargs="*",
                        default=["equivit_ri_small_patch16_224", "vit_small_patch16_224"],
                        help="models whose pooled features/logits are checked under D4")
    parser.add_argument("--invariance-tiles", type=int, default=16,
                        help="tiles for the feature-invariance check (default 16; 0 skips it)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return parser.parse_args(argv)


def find_tiles(root: Path) -> list[Path]:
    """Tile files under ``root``, interleaved round-robin over the class folders."""
    if not root.is_dir():
        raise SystemExit(f"data folder not found: {root} (set EQUIVIT_DATA or pass --data)")
    per_class: list[list[Path]] = []
    for dataset, patterns in DATASETS.items():
        folder = root / dataset
        if not folder.is_dir():
            raise SystemExit(f"data folder not found: {folder} (expected {dataset}/<class>/ "
                             f"with {'/'.join(patterns)} tiles under {root})")
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            files = sorted({f for pattern in patterns for f in class_dir.glob(pattern)})
            if files:
                per_class.append(files)
    if not per_class:
        raise SystemExit(f"no tiles found under {root}")
    longest = max(len(files) for files in per_class)
    return [files[i] for i in range(longest) for files in per_class if i < len(files)]


def load_tiles(files: Sequence[Path]) -> torch.Tensor:
    """Read RGB tiles into an ImageNet-normalised ``(N, 3, 224, 224)`` float32 tensor."""
    from PIL import Image

    arrays = []
    for path in files:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        if array.shape[:2] != (TILE_SIZE, TILE_SIZE):
            raise SystemExit(f"{path} is {array.shape[1]}x{array.shape[0]}, expected "
                             f"{TILE_SIZE}x{TILE_SIZE}")
        arrays.append(array)
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return ((batch - mean) / std).contiguous()


def build(name: str, seed: int, device: torch.device) -> torch.nn.Module:
    # Same seed for every model: each is a reproducible random draw of its architecture.
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).to(device).eval()


def same_module(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same class and bitwise-equal parameters and buffers."""
    if type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def summarise(d4: dict[str, dict[str, float]], sweep: dict[float, dict[str, float]]
              ) -> dict[str, Any]:
    off_grid = {a: s for a, s in sweep.items() if a % 90.0 != 0.0}
    summary: dict[str, Any] = {
        "d4_mean": min(s["mean"] for s in d4.values()),
        "d4_min": min(s["min"] for s in d4.values()),
    }
    summary["d4_target_met"] = summary["d4_min"] >= TOKEN_TARGET
    if off_grid:
        worst = min(off_grid, key=lambda a: off_grid[a]["mean"])
        summary.update(
            off_grid_mean=float(np.mean([s["mean"] for s in off_grid.values()])),
            off_grid_worst_angle=worst,
            off_grid_worst_mean=off_grid[worst]["mean"],
            off_grid_min=min(s["min"] for s in off_grid.values()),
        )
    return summary


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "# Rotation equivariance on real H&E tiles",
        "",
        f"{cfg['num_tiles']} tiles ({', '.join(f'{k}: {v}' for k, v in cfg['tiles'].items())}), "
        f"randomly initialised models (seed {cfg['seed']}), {cfg['device']}, "
        f"torch {cfg['torch']}, timm {cfg['timm']}; {report['elapsed_s']:.0f} s.",
        "",
        "## Token equivariance of the patch embedding",
        "",
        "Cosine similarity between tokens of the transformed tile and the transformed token grid "
        "of the original. D4 columns: worst mean and overall min over the 8 exact rotations/flips "
        f"(target >= {TOKEN_TARGET}). Off-grid: the {cfg['num_off_grid_angles']} angles of the "
        f"{cfg['angle_step']:g}-degree sweep that are not multiples of 90 (bilinear, reflect "
        "padding, tokens inside the inscribed circle minus one token).",
        "",
        *(f"{m} has the same patch-embedding weights as {t} (same seed), so the same numbers."
          for m, t in cfg["shared_stem"].items()),
        "",
        "| model | D4 mean (worst) | D4 min | D4 target | off-grid mean | off-grid worst mean "
        "(angle) | off-grid min |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in report["summary"].items():
        off = (f"{s['off_grid_mean']:.4f} | {s['off_grid_worst_mean']:.4f} "
               f"({s['off_grid_worst_angle']:g}) | {s['off_grid_min']:.4f}"
               if "off_grid_mean" in s else "- | - | -")
        lines.append(f"| {name} | {s['d4_mean']:.7f} | {s['d4_min']:.7f} | "
                     f"{'met' if s['d4_target_met'] else 'missed'} | {off} |")

    models = list(report["token_similarity"])
    lines += ["", "### Mean (min) token cosine per angle", "",
              "| angle | " + " | ".join(models) + " |",
              "|---|" + "---|" * len(models)]
    angles = sorted({float(a) for m in models for a in report["token_similarity"][m]})
    for angle in angles:
        cells = []
        for m in models:
            s = report["token_similarity"][m][str(angle)]
            cells.append(f"{s['mean']:.4f} ({s['min']:.4f})")
        lines.append(f"| {angle:g} | " + " | ".join(cells) + " |")

    if report["feature_invariance"]:
        lines += [
            "", "## Invariance of pooled features and logits under D4", "",
            f"First {cfg['invariance_tiles']} tiles; largest |f(g x) - f(x)| over tiles and "
            "the 7 non-identity transforms, smallest cosine, and the scale max |f(x)|.",
            "",
            "| model | output | max abs diff | min cosine | max abs of output |",
            "|---|---|---|---|---|",
        ]
        for name, per_output in report["feature_invariance"].items():
            for output, per_transform in per_output.items():
                stats = [s for t, s in per_transform.items() if t != "rot0"]
                lines.append(
                    f"| {name} | {output} | {max(s['max_abs_diff'] for s in stats):.3g} | "
                    f"{min(s['min_cosine'] for s in stats):.7f} | "
                    f"{per_transform['rot0']['ref_max_abs']:.3g} |")
        lines += ["", "Per transform, max abs diff of pooled features / logits:", "",
                  "| model | " + " | ".join(D4_NAMES[1:]) + " |",
                  "|---|" + "---|" * (len(D4_NAMES) - 1)]
        for name, per_output in report["feature_invariance"].items():
            cells = [
                " / ".join(f"{per_output[o][t]['max_abs_diff']:.2g}"
                           for o in ("pooled", "logits") if o in per_output)
                for t in D4_NAMES[1:]
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_tiles is not None and args.max_tiles < 1:
        raise SystemExit(f"--max-tiles must be >= 1, got {args.max_tiles}")
    if args.angle_step <= 0:
        raise SystemExit(f"--angle-step must be > 0, got {args.angle_step}")
    device = torch.device(args.device)
    start = time.perf_counter()

    files = find_tiles(args.data)[: args.max_tiles]
    images = load_tiles(files).to(device)
    tiles: dict[str, int] = {}
    for path in files:
        tiles[path.parent.parent.name] = tiles.get(path.parent.parent.name, 0) + 1
    print(f"{len(files)} tiles from {args.data} ({tiles})", flush=True)
    angles = [float(a) for a in np.arange(0.0, 360.0, args.angle_step)]

    results: dict[str, Any] = {}
    d4_results: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    stems: list[tuple[str, torch.nn.Module]] = []
    shared_stem: dict[str, str] = {}
    for name in args.models:
        t0 = time.perf_counter()
        model = build(name, args.seed, device)
        # Equi-ViT and Equi-ViT-RI differ only after the stem: with the same seed their patch
        # embeddings are identical, so the (costly) token measurements are reused.
        twin = next((other for other, stem in stems if same_module(stem, model.patch_embed)),
                    None)
        if twin is not None:
            shared_stem[name] = twin
            d4_results[name], results[name] = d4_results[twin], results[twin]
        else:
            stems.append((name, model.patch_embed))
            d4_results[name] = d4_token_similarity(model, images, batch_size=args.batch_size)
            results[name] = token_similarity(model, images, angles, batch_size=args.batch_size)
        summary[name] = summarise(d4_results[name], results[name])
        print(f"{name}: token cosine D4 min {summary[name]['d4_min']:.7f}, off-grid mean "
              f"{summary[name].get('off_grid_mean', float('nan')):.4f} "
              f"({time.perf_counter() - t0:.0f} s"
              f"{f', same stem weights as {twin}' if twin else ''})", flush=True)

    invariance: dict[str, Any] = {}
    inv_tiles = min(args.invariance_tiles, len(files))
    for name in args.invariance_models if inv_tiles > 0 else []:
        t0 = time.perf_counter()
        model = build(name, args.seed, device)
        invariance[name] = feature_invariance(model, images[:inv_tiles],
                                              batch_size=args.batch_size)
        worst = max(s["max_abs_diff"] for s in invariance[name]["logits"].values())
        print(f"{name}: logits max abs diff under D4 {worst:.3g} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    report = {
        "config": {
            "data": str(args.data), "num_tiles": len(files), "tiles": tiles,
            "models": args.models, "angles": angles, "angle_step": args.angle_step,
            "num_off_grid_angles": sum(a % 90.0 != 0.0 for a in angles),
            "invariance_models": args.invariance_models, "invariance_tiles": inv_tiles,
            "shared_stem": shared_stem,
            "seed": args.seed, "device": str(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(),
        },
        "summary": summary,
        "d4_token_similarity": d4_results,
        # JSON keys are strings; plot_similarity_vs_angle accepts them as they are.
        "token_similarity": {m: {str(a): s for a, s in r.items()} for m, r in results.items()},
        "feature_invariance": invariance,
        "elapsed_s": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "equivariance.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / "equivariance.md").write_text(table)
    plot_similarity_vs_angle(results, args.out / "equivariance_similarity.png",
                             title=f"Patch-token equivariance, {len(files)} H&E tiles")
    print(table)
    print(f"wrote {args.out / 'equivariance.json'}, equivariance.md, equivariance_similarity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
