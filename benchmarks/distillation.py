"""Distillation on CPU: a bundle-trained ViT teacher, exactly invariant students, side by side.

No foundation-model weights are reachable here, so the teacher is made: ``vit_tiny`` trained
with the MONAI bundle on the shared LC25000 lung tiles (``benchmarks/rotation_robustness.py``'s
recipe and run directory: ``train.json`` + ``quick_train.json``, 15 epochs, any-angle
augmentation). Then, in one run:

1. every student in ``--students`` is distilled with ``equivit distill`` on unlabelled tiles -
   the shared slide at stride 112 (2T contexts with >= 50 % tissue), the 41 CRC tiles and the
   LC25000 *training* tiles without their labels - sharing one teacher-target cache;
2. on the held-out LC25000 groups (the bundle's validation split, never distilled on):
   kNN (k = 20, cosine) and linear-probe (logistic regression) accuracy of the teacher, the
   teacher with D4 averaging and each student, fitted on the training tiles' features at 0
   degrees and evaluated on the held-out tiles at 0 degrees and rotated (``rotate``: exact
   at multiples of 90, bilinear with a reflected border otherwise); fidelity, the cosine
   between each model's feature and the teacher's invariant target of the unrotated tile;
3. the rotation report (Elphick et al.'s protocol, k = 10) of all of them on the same regions
   of the slide;
4. tiles/s of the pooled embedding of each, round robin (``benchmarks/throughput.py``).

Results go to ``--out`` (default ``benchmarks/results``): ``distillation.{json,md}`` and
``distillation_report/rotation_report.{json,png}``; runs stay in ``--runs`` (git-ignored).

Commands, from the repository root (about 55 minutes on 2 cores when nothing else runs: 7-8
per student, 15 for the rotation report, most of it teacher + D4)::

    .venv/bin/python benchmarks/distillation.py
    .venv/bin/python benchmarks/distillation.py --students equivit_disc_tiny_patch16_224 --epochs 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rotation_robustness as robustness  # noqa: E402  (the teacher's training recipe)
import throughput  # noqa: E402  (round-robin timing)

from equivit_plugin.bundle.data import datalist, tile_pixels  # noqa: E402
from equivit_plugin.equivariance import rotate  # noqa: E402
from equivit_plugin.models import (  # noqa: E402
    ModelInfo,
    PooledEncoder,
    input_normalisation,
    load_model,
)
from equivit_plugin.robustness import rotation_report  # noqa: E402

REPO = robustness.REPO
STUDENTS = ("equivit_disc_tiny_patch16_224", "equivit_ric_tiny_patch16_224",
            "equivit_rid_tiny_patch16_224", "equivit_ri_tiny_patch16_224")
ANGLES = (0.0, 15.0, 30.0, 45.0, 60.0, 75.0, 90.0, 180.0)
OFF_GRID = tuple(a for a in ANGLES if a % 90)
TEACHER_RUN = "vit_tiny"
TARGETS = {"accuracy_points": 1.0, "grid90_mutual_knn": 1.0, "off_grid_mutual_knn": 0.95,
           "shift_8_mutual_knn": 0.95, "throughput_vs_teacher": 0.9,
           "throughput_vs_teacher_d4": 6.0}
log = robustness.log


class D4Averaged(nn.Module):
    """A timm model whose pooled embedding is averaged over the 8 rotations/flips, with the
    ``forward_features``/``forward_head`` contract, so the rotation report measures it as a
    model of its own."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.encoder = PooledEncoder(net, d4_average=True)
        self.pretrained_cfg = getattr(net, "pretrained_cfg", {})

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def unlabelled_tiles(runs: Path) -> list[Path]:
    """Folders of the unlabelled tiles: the CRC tiles and the LC25000 training split (linked,
    without class folders, so no label reaches the student)."""
    lc_train = runs / "lc25000_train_unlabelled"
    if not lc_train.is_dir():
        staging = lc_train.with_name(lc_train.name + ".tmp")
        staging.mkdir(parents=True, exist_ok=True)
        for item in datalist(str(robustness.data_dir() / "lc25000_lung_train"), part="train"):
            source = Path(item["image"])
            link = staging / source.name
            if not link.exists():
                link.symlink_to(source)
        staging.rename(lc_train)
    return [robustness.data_dir() / "crc_tiles", lc_train]


def distil(student: str, teacher: Path, runs: Path, epochs: int, slide: Path,
           tiles: Sequence[Path], batch_size: int, workers: int) -> tuple[Path, float]:
    """``equivit distill`` for one student unless it finished before; (checkpoint, seconds)."""
    root = runs / "students" / student
    out = root / "student.pt"
    done = root / "done"
    if done.is_file() and out.is_file():
        log(f"{student}: distilled already ({out})")
        return out, float(done.read_text().split()[0])
    root.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "equivit_plugin.cli", "distill",
               "--teacher", str(teacher), "--student", student,
               "--tiles", *map(str, tiles), "--slides", str(slide), "--stride", "112",
               "--out", str(out), "--targets-cache", str(runs / "targets_vit_tiny.h5"),
               "--epochs", str(epochs), "--batch-size", str(batch_size),
               "--workers", str(workers), "--no-progress"]
    log(f"{student}: {' '.join(command[3:])}")
    start = time.perf_counter()
    with open(root / "distill.log", "w") as stream:
        subprocess.run(command, check=True, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = time.perf_counter() - start
    done.write_text(f"{seconds:.0f}\n")
    log(f"{student}: distilled in {seconds:.0f} s")
    return out, seconds


def labelled(part: str) -> tuple[torch.Tensor, np.ndarray]:
    """``(N, 3, 224, 224)`` float ``[0, 1]`` tiles and labels of an LC25000 split."""
    items = datalist(str(robustness.data_dir() / "lc25000_lung_train"), part=part)
    read = tile_pixels(224)
    images = torch.stack([torch.as_tensor(read(dict(i))["image"]) for i in items]) / 255.0
    return images.float(), np.asarray([i["label"] for i in items])


def embed(model: nn.Module, images: torch.Tensor, mean: tuple, std: tuple, angle: float,
          batch_size: int = 32) -> np.ndarray:
    """Pooled features of ``images`` turned by ``angle`` (reflected border off the grid)."""
    shape = (1, 3, 1, 1)
    m, s = torch.tensor(mean).view(shape), torch.tensor(std).view(shape)
    encoder = model if isinstance(model, D4Averaged) else PooledEncoder(model)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = rotate(images[start:start + batch_size], angle)
            out.append(encoder((x - m) / s).double())
    return torch.cat(out).numpy()


def knn_accuracy(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray,
                 k: int = 20) -> float:
    """Majority vote of the ``k`` cosine-nearest training tiles (ties: the nearest's class)."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = test / np.linalg.norm(test, axis=1, keepdims=True)
    nearest = np.argsort(-(b @ a.T), axis=1)[:, :k]
    votes = train_y[nearest]
    predicted = []
    for row in votes:
        counts = np.bincount(row, minlength=train_y.max() + 1)
        best = np.flatnonzero(counts == counts.max())
        predicted.append(row[np.isin(row, best)][0])
    return float(np.mean(np.asarray(predicted) == test_y))


def probe(train: np.ndarray, train_y: np.ndarray):
    """A linear probe: logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(train, train_y)


def cosine(a: np.ndarray, b: np.ndarray, centre: np.ndarray | float = 0.0) -> float:
    """Mean cosine of matching rows, after subtracting ``centre`` from both."""
    a, b = a - centre, b - centre
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1)
                                              * np.linalg.norm(b, axis=1))))


def evaluate(models: dict[str, tuple[nn.Module, tuple, tuple]]) -> dict[str, Any]:
    """kNN / linear-probe accuracy and fidelity of every model at every angle."""
    train_x, train_y = labelled("train")
    val_x, val_y = labelled("val")
    teacher_d4 = models["teacher + D4"]
    target = embed(teacher_d4[0], val_x, teacher_d4[1], teacher_d4[2], 0.0)
    # Centred fidelity: pooled ViT features share a large common component (raw cosines are
    # near 1 for any two tiles), so the cosine after removing the training targets' mean is
    # the one that separates models.
    centre = embed(teacher_d4[0], train_x, teacher_d4[1], teacher_d4[2], 0.0).mean(0)
    results = {}
    for label, (model, mean, std) in models.items():
        log(f"evaluating {label}")
        reference = embed(model, train_x, mean, std, 0.0)
        classifier = probe(reference, train_y)
        rows = {}
        for angle in ANGLES:
            features = embed(model, val_x, mean, std, angle)
            same_width = features.shape[1] == target.shape[1]
            rows[f"{angle:g}"] = {
                "knn": knn_accuracy(reference, train_y, features, val_y),
                "probe": float(classifier.score(features, val_y)),
                "fidelity": cosine(features, target) if same_width else None,
                "centred_fidelity": cosine(features, target, centre) if same_width else None,
            }
        off = [rows[f"{a:g}"] for a in OFF_GRID]
        results[label] = {"angles": rows, "off_grid": {
            key: float(np.mean([r[key] for r in off]))
            for key in ("knn", "probe", "fidelity", "centred_fidelity")
            if off[0][key] is not None}}
    return {"n_train": len(train_y), "n_val": len(val_y), "angles": list(ANGLES),
            "models": results}


def speed(models: dict[str, nn.Module], repeats: int) -> dict[str, Any]:
    settings = throughput.Settings(
        device="cpu", batch_size=32, threads=torch.get_num_threads(), sizes=("tiny",),
        repeats=repeats, warmup=1, iters=1, img_size=224, out="", quick=False, amp="none",
        channels_last=False, compile=False, compile_scope="blocks")
    images, _ = throughput.make_batch(settings)
    runners = {label: throughput.inference_runner(
        model if isinstance(model, D4Averaged) else PooledEncoder(model), images, settings)
        for label, model in models.items()}
    timings = throughput.round_robin(runners, settings, "pooled embedding")
    return {"batch_size": settings.batch_size, "threads": settings.threads,
            "repeats": repeats, "tiles_per_s": {k: t.median for k, t in timings.items()},
            "vs_teacher": throughput.ratios(timings, "teacher"),
            "vs_teacher_d4": throughput.ratios(timings, "teacher + D4")
            if "teacher + D4" in timings else {}}


def view_costs(slide: Path, folders: Sequence[Path], n: int = 40) -> dict[str, float]:
    """CPU milliseconds of one training sample from a slide tile and from a folder tile, in
    one process: what the DataLoader workers must keep up with on a GPU. Since the views are
    made on the device (``PrepareViews``), that is reading the 2T context and drawing the view;
    runs before it also turned, shifted, cropped and normalised here."""
    from equivit_plugin.distill import DistillationViews, collect_tiles

    costs = {}
    for source, tiles in (("slide", collect_tiles(224, slides=[slide], stride=112)),
                          ("folder", collect_tiles(224, tiles=folders))):
        targets = np.zeros((len(tiles), 1), dtype=np.float32)
        views = DistillationViews(tiles, targets, np.arange(min(n, len(tiles))), max_shift=8,
                                  mean=(0.5,) * 3, std=(0.5,) * 3)
        views[0]  # open the reader / build the loader once
        start = time.perf_counter()
        for item in range(len(views)):
            views[item]
        costs[source] = 1000 * (time.perf_counter() - start) / len(views)
    return costs


def ratio(rates: dict[str, Any], against: str, label: str) -> str:
    value = (rates.get(against) or {}).get(label)
    return "-" if value is None else f"{value:.2f}x"


def cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(result: dict[str, Any]) -> str:
    evaluation, report, rates = result["evaluation"], result["rotation_report"], result["speed"]
    summaries = {m["label"]: m for m in report["models"]}
    lines = [
        "# Distillation into exactly invariant students (CPU)", "",
        f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ",
        f"Teacher: `{result['teacher']['checkpoint']}` (vit_tiny, bundle-trained, "
        f"val acc {result['teacher']['val_acc']:.3f}); unlabelled tiles: "
        f"{result['distillation']['n_tiles']} ({result['distillation']['sources']}); "
        f"{result['distillation']['epochs']} epochs per student.", "",
        f"## Held-out LC25000 groups ({evaluation['n_val']} tiles; probes fitted on "
        f"{evaluation['n_train']} training tiles at 0 degrees)", "",
        "| model | kNN 0° | kNN 90° | kNN off-grid | probe 0° | probe 90° | probe off-grid | "
        "fidelity 0° (centred) | fidelity off-grid (centred) |",
        "|---|---|---|---|---|---|---|---|---|"]
    for label, row in evaluation["models"].items():
        a = row["angles"]
        lines.append(
            f"| {label} | {cell(a['0']['knn'])} | {cell(a['90']['knn'])} | "
            f"{cell(row['off_grid']['knn'])} | {cell(a['0']['probe'])} | "
            f"{cell(a['90']['probe'])} | {cell(row['off_grid']['probe'])} | "
            f"{cell(a['0']['fidelity'], 4)} ({cell(a['0']['centred_fidelity'])}) | "
            f"{cell(row['off_grid'].get('fidelity'), 4)} "
            f"({cell(row['off_grid'].get('centred_fidelity'))}) |")
    lines += ["", f"Off-grid = mean over {', '.join(f'{a:g}' for a in OFF_GRID)} degrees.", "",
              f"## Rotation report ({report['n_regions']} regions of the slide, k = "
              f"{report['k']})", "",
              "| model | mkNN 90/180/270 | mkNN off-grid | mkNN 4 px | mkNN 8 px | "
              "cos off-grid | tiles/s | vs teacher | vs teacher + D4 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for label in [m for m in evaluation["models"] if m in summaries]:
        summary = summaries[label]["summary"]
        shifts = summaries[label]["shifts"]
        lines.append(
            f"| {label} | {cell(summary['grid90_mutual_knn'])} | "
            f"{cell(summary['off_grid_mutual_knn'])} | {cell(shifts['4']['mutual_knn'])} | "
            f"{cell(shifts['8']['mutual_knn'])} | {cell(summary['off_grid_mean_cosine'], 4)} | "
            f"{rates['tiles_per_s'][label]:.1f} | {rates['vs_teacher'][label]:.2f}x | "
            f"{ratio(rates, 'vs_teacher_d4', label)} |")
    lines += ["", "## Targets", "",
              "| student | kNN / probe 0° vs teacher (≥ -1 pt) | mkNN 90° (1.0) | "
              "mkNN off-grid (≥ 0.95; teacher) | mkNN 8 px (≥ 0.95; teacher) | "
              "vs teacher (≥ 0.9x) | vs teacher + D4 (≥ 6x) |", "|---|---|---|---|---|---|---|"]
    teacher_eval = evaluation["models"]["teacher"]["angles"]["0"]
    teacher_report = summaries["teacher"]
    for label in evaluation["models"]:
        if not label.endswith("(student)"):
            continue
        own = evaluation["models"][label]["angles"]["0"]
        summary, shifts = summaries[label]["summary"], summaries[label]["shifts"]
        lines.append(
            f"| {label} | {100 * (own['knn'] - teacher_eval['knn']):+.1f} / "
            f"{100 * (own['probe'] - teacher_eval['probe']):+.1f} pt | "
            f"{cell(summary['grid90_mutual_knn'])} | {cell(summary['off_grid_mutual_knn'])} "
            f"({cell(teacher_report['summary']['off_grid_mutual_knn'])}) | "
            f"{cell(shifts['8']['mutual_knn'])} "
            f"({cell(teacher_report['shifts']['8']['mutual_knn'])}) | "
            f"{rates['vs_teacher'][label]:.2f}x | {ratio(rates, 'vs_teacher_d4', label)} |")
    lines += ["", "Distillation time per student (CPU, this machine): " + ", ".join(
        f"{k}: {v:.0f} s" for k, v in result["distillation"]["seconds"].items()) + ".  ",
              "CPU time to make one training view (one process): " + ", ".join(
        f"{k} tile {v:.1f} ms" for k, v in result["cpu_ms_per_view"].items()) + ".", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=REPO / "benchmarks" / "runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--students", nargs="+", default=list(STUDENTS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--regions", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="throughput rounds")
    parser.add_argument("--no-d4-report", dest="d4_report", action="store_false",
                        help="leave teacher + D4 out of the rotation report and the timing "
                             "(8x the cost of the others; accuracy and fidelity still use it)")
    parser.add_argument("--name", default="distillation",
                        help="stem of the result files in --out")
    parser.add_argument("--slide", type=Path,
                        default=robustness.data_dir() / "slides" / "CMU-1-Small-Region.svs")
    args = parser.parse_args(argv)
    runs = args.runs / "distillation"
    runs.mkdir(parents=True, exist_ok=True)
    teacher_path = robustness.train(TEACHER_RUN, robustness.CANDIDATES[TEACHER_RUN],
                                    args.runs, 15, "any_angle")
    tiles = unlabelled_tiles(runs)
    students, seconds = {}, {}
    for name in args.students:
        students[name], seconds[name] = distil(name, teacher_path, runs, args.epochs,
                                               args.slide, tiles, args.batch_size,
                                               args.workers)
    teacher, teacher_info = load_model(teacher_path)
    loaded: dict[str, tuple[nn.Module, ModelInfo]] = {
        "teacher": (teacher, dataclasses.replace(teacher_info, source="teacher")),
        "teacher + D4": (D4Averaged(teacher),
                         dataclasses.replace(teacher_info, source="teacher + D4")),
    }
    for name, path in students.items():
        net, info = load_model(path)
        loaded[name.replace("_patch16_224", "") + " (student)"] = (
            net, dataclasses.replace(info, source=name.replace("_patch16_224", "")
                                     + " (student)"))
    normalisation = {label: input_normalisation(info)
                     for label, (net, info) in loaded.items()}
    evaluation = evaluate({label: (net, *normalisation[label])
                           for label, (net, _) in loaded.items()})
    measured = {label: pair for label, pair in loaded.items()
                if args.d4_report or label != "teacher + D4"}
    log("rotation report")
    report = rotation_report(list(measured.values()), [args.slide], n_regions=args.regions,
                             progress=True, out_dir=args.out / f"{args.name}_report")
    log("throughput")
    rates = speed({label: net for label, (net, _) in measured.items()}, args.repeats)
    costs = view_costs(args.slide, tiles)
    with open(runs / "students" / args.students[0] / "student.distill"
              / "distill_summary.json") as handle:
        n_tiles = json.load(handle)
    result = {
        "command": " ".join(["python", "benchmarks/distillation.py", *(argv or sys.argv[1:])]),
        "machine": f"{throughput.cpu_model()}, {throughput.cpu_count()} cores, torch "
                   f"{torch.__version__}",
        "teacher": {"checkpoint": str(teacher_path.relative_to(REPO)) if teacher_path
                    .is_relative_to(REPO) else str(teacher_path),
                    "val_acc": float(teacher_info.extra.get("metrics", {}).get("val_acc",
                                                                               float("nan")))},
        "distillation": {"epochs": args.epochs, "seconds": seconds,
                         "n_tiles": n_tiles["n_train"] + n_tiles["n_val"],
                         "sources": "CMU-1-Small-Region at stride 112, crc_tiles, LC25000 "
                                    "training split (unlabelled)"},
        "targets": TARGETS,
        "evaluation": evaluation,
        "rotation_report": report,
        "speed": rates,
        "cpu_ms_per_view": costs,
    }
    throughput.publish(args.out, args.name, result, render(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
