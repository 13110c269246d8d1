"""Which invariant variant holds off the 90-degree grid: bundle-trained models side by side.

For every candidate in :data:`CANDIDATES`, with the same data, split, seed and schedule:

1. train it with the MONAI bundle (``train.json`` + ``quick_train.json``, ``--max_epochs 15
   --augment any_angle``: any angle, up to 8 px shifts, flips) on the shared LC25000 lung
   tiles; a candidate whose checkpoint exists is not trained again (the run is resumable);
2. accuracy of its checkpoint on the held-out groups (the bundle's validation split);
3. the rotation report (:func:`equivit_plugin.robustness.rotation_report`, Elphick et al.'s
   protocol) of all candidates on the SAME regions of the shared slide: mutual-kNN (k = 10) and
   mean cosine at 15-degree steps, under 4 and 8 px shifts and shifts + a 90-degree turn;
4. inference and training-step throughput of each architecture against ``vit_tiny``, in one
   round-robin run (``benchmarks/throughput.py``'s timing).

Results: ``--out`` (default ``benchmarks/results``) gets ``rotation_robustness.{json,md}`` and
the report's ``rotation_robustness_report.{json,png}``; checkpoints and training logs stay in
``--runs`` (default ``benchmarks/runs``, git-ignored).

Commands, from the repository root (about 8 minutes of training per candidate on 2 cores when
nothing else runs, then about 15 minutes of measuring)::

    .venv/bin/python benchmarks/rotation_robustness.py
    .venv/bin/python benchmarks/rotation_robustness.py --only vit_tiny equivit_ric_tiny
    .venv/bin/python benchmarks/rotation_robustness.py --skip-train --regions 60   # measure only
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "monai_bundle"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402  (beside this script: the round-robin timing)

from equivit_plugin.bundle.data import datalist, tile_transforms  # noqa: E402
from equivit_plugin.models import ModelInfo, create_model, load_model  # noqa: E402
from equivit_plugin.robustness import rotation_report  # noqa: E402


@dataclass(frozen=True)
class Candidate:
    """A bundle-trained architecture: ``network_name`` plus constructor overrides."""

    label: str
    network_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def bundle_overrides(self) -> list[str]:
        args = ["--network_name", self.network_name]
        for key, value in self.kwargs.items():
            args += [f"--network_def#{key}", str(value), f"--model_kwargs#{key}", str(value)]
        return args


RI = "equivit_ri_tiny_patch16_224"
CANDIDATES: dict[str, Candidate] = {
    "vit_tiny": Candidate("vit_tiny (timm ViT, class token)", "vit_tiny_patch16_224"),
    "equivit_ri_tiny": Candidate("equivit_ri_tiny (GMR patch, radial, class token)", RI),
    "equivit_rid_tiny": Candidate(
        "equivit_rid_tiny (+ distance attention bias, mean-pooled)", RI,
        {"global_pool": "avg", "attn_bias": "distance"}),
    "equivit_ri_stem_tiny": Candidate(
        "equivit_ri + conv stem 6/4, 4/2, 4/2, mean-pooled, 11 blocks (no distance bias)", RI,
        {"embed_layer": "gmr_stem", "embed_kwargs": {"stages": [[6, 4], [4, 2], [4, 2]]},
         "depth": 11, "global_pool": "avg"}),
    "equivit_ri_stem_dist_tiny": Candidate(
        "equivit_ri + conv stem 6/4, 4/2, 4/2 + distance bias, mean-pooled, 11 blocks", RI,
        {"embed_layer": "gmr_stem", "embed_kwargs": {"stages": [[6, 4], [4, 2], [4, 2]]},
         "depth": 11, "global_pool": "avg", "attn_bias": "distance"}),
    "equivit_ric_nobias_tiny": Candidate(
        "conv stem 4 x 4/2, mean-pooled, 10 blocks, no distance bias",
        "equivit_ric_tiny_patch16_224", {"attn_bias": "none"}),
    "equivit_ric_tiny": Candidate(
        "equivit_ric_tiny (conv stem 4 x 4/2 + distance bias, mean-pooled, 10 blocks)",
        "equivit_ric_tiny_patch16_224"),
    "equivit_disc_tiny": Candidate(
        "equivit_disc_tiny (equivit_ric over the inscribed disc: 156 of 196 tokens, disc norms)",
        "equivit_disc_tiny_patch16_224"),
}
"""Run directory name -> candidate. ``equivit_rid_tiny``, ``equivit_ric_tiny`` and
``equivit_disc_tiny`` are the architectures of the registered ``equivit_rid_tiny_patch16_224``,
``equivit_ric_tiny_...`` and ``equivit_disc_tiny_...``."""

BASELINE = "vit_tiny"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def data_dir() -> Path:
    return Path(os.environ.get("EQUIVIT_DATA", REPO.parent / "shared" / "data"))


# --------------------------------------------------------------------------- training


def train(name: str, candidate: Candidate, runs: Path, epochs: int, augment: str) -> Path:
    """Train one candidate with the bundle unless its checkpoint is there; the checkpoint."""
    root = runs / name
    checkpoint = root / "models" / "model.pt"
    if (root / "done").is_file() and checkpoint.is_file():
        log(f"{name}: trained already ({checkpoint})")
        return checkpoint
    root.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str([str(BUNDLE / "configs" / "train.json"),
                              str(BUNDLE / "configs" / "quick_train.json")]),
        "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
        "--logging_file", str(BUNDLE / "configs" / "logging.conf"),
        "--bundle_root", str(root),
        "--dataset_dir", str(data_dir() / "lc25000_lung_train"),
        "--max_epochs", str(epochs), "--augment", augment,
        *candidate.bundle_overrides(),
    ]
    log(f"{name}: training ({' '.join(command[3:])})")
    start = time.perf_counter()
    with open(root / "train.log", "w") as stream:
        subprocess.run(command, check=True, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = time.perf_counter() - start
    (root / "done").write_text(f"{seconds:.0f}\n")
    log(f"{name}: trained in {seconds:.0f} s")
    return checkpoint


# --------------------------------------------------------------------------- measuring


def accuracy(net: torch.nn.Module, info: ModelInfo, batch_size: int = 32) -> dict[str, Any]:
    """Top-1 accuracy on the bundle's validation split (held-out LC25000 groups)."""
    items = datalist(str(data_dir() / "lc25000_lung_train"), part="val",
                     class_names=list(info.class_names))
    transform = tile_transforms(info.img_size, augment="none")
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            images = torch.stack([torch.as_tensor(transform(dict(item))["image"])
                                  for item in chunk])
            labels = torch.tensor([item["label"] for item in chunk])
            correct += int((net(images).argmax(-1) == labels).sum())
    return {"accuracy": correct / len(items), "n_tiles": len(items)}


def speed(names: Sequence[str], repeats: int) -> dict[str, Any]:
    """Inference and training-step images/s of each architecture, round robin, vs ViT."""
    settings = throughput.Settings(
        device="cpu", batch_size=32, threads=torch.get_num_threads(), sizes=("tiny",),
        repeats=repeats, warmup=1, iters=1, img_size=224, out="", quick=False, amp="none",
        channels_last=False, compile=False, compile_scope="blocks")
    images, labels = throughput.make_batch(settings)
    models = {}
    for name in names:
        torch.manual_seed(0)
        candidate = CANDIDATES[name]
        models[name] = create_model(candidate.network_name, 3, **candidate.kwargs)
    infer = throughput.round_robin(
        {n: throughput.inference_runner(m, images, settings) for n, m in models.items()},
        settings, "inference")
    step = throughput.round_robin(
        {n: throughput.train_runner(m, images, labels % 3, settings) for n, m in models.items()},
        settings, "train step")
    return {
        "batch_size": settings.batch_size, "threads": settings.threads, "repeats": repeats,
        "inference_img_s": {n: t.median for n, t in infer.items()},
        "train_img_s": {n: t.median for n, t in step.items()},
        "inference_ratio": throughput.ratios(infer, BASELINE),
        "train_ratio": throughput.ratios(step, BASELINE),
    }


# --------------------------------------------------------------------------- report


def render(result: dict[str, Any]) -> str:
    report, rows = result["rotation_report"], []
    for name in result["candidates"]:
        summary = report["models"][result["report_index"][name]]["summary"]
        acc = result["accuracy"][name]
        sp = result["speed"]
        rows.append([
            CANDIDATES[name].label, f"{100 * acc['accuracy']:.1f}",
            f"{summary['grid90_mutual_knn']:.3f}", f"{summary['off_grid_mutual_knn']:.3f}",
            f"{summary['shift_4_mutual_knn']:.3f}", f"{summary['shift_8_mutual_knn']:.3f}",
            f"{summary['shift_8_rot90_mutual_knn']:.3f}",
            f"{summary['off_grid_mean_cosine']:.3f}",
            f"{sp['inference_ratio'][name]:.3f}x", f"{sp['train_ratio'][name]:.3f}x",
        ])
    header = ["model (bundle, 15 epochs, any-angle + shift augmentation)", "acc %",
              "mkNN 90/180/270", "mkNN off-grid", "mkNN 4 px", "mkNN 8 px", "mkNN 8 px + 90",
              "cos off-grid", "infer / ViT", "train / ViT"]
    lines = [
        "# Rotation robustness of bundle-trained tiny models (CPU)", "",
        f"Machine: {result['machine']}. Accuracy on {result['accuracy'][BASELINE]['n_tiles']} "
        f"held-out LC25000 tiles (validation groups). Rotation report: "
        f"{report['n_regions']} regions of the shared slide, k = "
        f"{report['k']}, mutual-kNN (mkNN) between original and rotated/shifted "
        f"features. Throughput: batch 32, round robin, median of {result['speed']['repeats']}.",
        "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows), "",
        f"Command: `{result['command']}`", "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=REPO / "benchmarks" / "runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--only", nargs="+", choices=sorted(CANDIDATES))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--augment", default="any_angle")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--regions", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=5, help="throughput rounds")
    parser.add_argument("--slide", type=Path,
                        default=data_dir() / "slides" / "CMU-1-Small-Region.svs")
    args = parser.parse_args(argv)
    names = list(args.only or CANDIDATES)
    if BASELINE not in names:
        names.insert(0, BASELINE)
    checkpoints = {}
    for name in names:
        if args.skip_train:
            checkpoints[name] = args.runs / name / "models" / "model.pt"
        else:
            checkpoints[name] = train(name, CANDIDATES[name], args.runs, args.epochs,
                                      args.augment)
    loaded = {name: load_model(path) for name, path in checkpoints.items()}
    log("accuracy")
    accuracies = {name: accuracy(*loaded[name]) for name in names}
    log("rotation report")
    # (model, info) pairs labelled with the candidate's name (every checkpoint is "model.pt")
    models = [(loaded[name][0], dataclasses.replace(loaded[name][1], source=name))
              for name in names]
    report = rotation_report(models, [args.slide],
                             n_regions=args.regions, progress=True,
                             out_dir=args.out / "rotation_robustness_report")
    log("throughput")
    result = {
        "command": " ".join(["python", "benchmarks/rotation_robustness.py",
                             *(argv or sys.argv[1:])]),
        "machine": f"{throughput.cpu_model()}, {throughput.cpu_count()} cores, torch "
                   f"{torch.__version__}",
        "candidates": names,
        "training": {"configs": ["train.json", "quick_train.json"], "max_epochs": args.epochs,
                     "augment": args.augment},
        "accuracy": accuracies,
        "report_index": {name: index for index, name in enumerate(names)},
        "rotation_report": report,
        "speed": speed(names, args.repeats),
    }
    throughput.publish(args.out, "rotation_robustness", result, render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
