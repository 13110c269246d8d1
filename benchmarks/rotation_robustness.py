"""Which invariant variant holds off the 90-degree grid and under shifts: bundle-trained models
side by side, on several sources, over several training seeds.

For every candidate in :data:`CANDIDATES` and every training seed in ``--seeds``, with the same
data, split and schedule:

1. train it with the MONAI bundle (``train.json`` + ``quick_train.json``, ``--max_epochs 15
   --augment any_angle``: any angle, up to 8 px shifts, flips; ``--seed S`` for the
   initialisation, the augmentation and the batch order, the validation split fixed at seed 0)
   on the shared LC25000 lung tiles; a run whose checkpoint exists is not trained again (the
   benchmark is resumable);
2. accuracy of its checkpoint on the held-out groups (the bundle's validation split);
3. the rotation report (:func:`equivit_plugin.robustness.rotation_report`, Elphick et al.'s
   protocol: mutual-kNN with k = 10 and mean cosine at 15-degree steps, under 4 and 8 px
   shifts and shifts + a 90-degree turn) of all of them on the SAME regions of four sources
   (:func:`sources`): the shared slide, TIAToolbox's packaged H&E image written as a pyramid,
   the held-out LC25000 tiles and the 41 CRC tiles (tiles as the centre of a mirrored ``2T``
   context); per source and pooled;
4. inference and training-step throughput of each architecture against ``vit_tiny``, in one
   round-robin run (``benchmarks/throughput.py``'s timing).

Besides the trained models the report measures two references that need no training
(:class:`WindowedDescriptors`): a perfectly shift-equivariant local descriptor (random
convolutions at stride 1, no subsampling) averaged over the inscribed disc, and over the whole
tile. They have no aliasing and no learned sensitivity, so what they lose under a shift is
what the window alone loses when tissue enters and leaves it: a ceiling for any model that
pools over that window.

Results: ``--out`` (default ``benchmarks/results``) gets ``rotation_robustness.{json,md}`` and
the report's ``rotation_robustness_report/rotation_report.{json,png}``; checkpoints and
training logs stay in ``--runs`` (default ``benchmarks/runs``, git-ignored):
``<candidate>/seed<S>/``.

Commands, from the repository root (about 7 minutes of training per run on 2 cores when
nothing else runs, then about 4 minutes of measuring per run)::

    .venv/bin/python benchmarks/rotation_robustness.py --only vit_tiny equivit_disc_tiny
    .venv/bin/python benchmarks/rotation_robustness.py --seeds 0 1 2 --only vit_tiny \\
        equivit_disc_tiny equivit_disc_blur07_tiny --single-seed equivit_disc_blur07_tiny
    .venv/bin/python benchmarks/rotation_robustness.py --skip-train ...   # measure only
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "monai_bundle"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402  (beside this script: the round-robin timing)

from equivit_plugin.bundle.data import datalist, tile_transforms  # noqa: E402
from equivit_plugin.features.demo import write_pyramid_tiff  # noqa: E402
from equivit_plugin.layers import disc_token_mask  # noqa: E402
from equivit_plugin.models import ModelInfo, create_model, load_model  # noqa: E402
from equivit_plugin.robustness import (  # noqa: E402
    RegionSet,
    rotation_report,
    sample_regions,
    tile_regions,
)
from equivit_plugin.utils.atomic import atomic_path  # noqa: E402
from equivit_plugin.utils.demo_data import DEMO_MPP, demo_he_image  # noqa: E402


@dataclass(frozen=True)
class Candidate:
    """A bundle-trained model: ``network_name``, constructor overrides and more bundle
    arguments (the training recipe, e.g. ``("--max_shift", "16")``)."""

    label: str
    network_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    bundle_args: tuple[str, ...] = ()

    def bundle_overrides(self) -> list[str]:
        args = ["--network_name", self.network_name]
        for key, value in self.kwargs.items():
            args += [f"--network_def#{key}", str(value), f"--model_kwargs#{key}", str(value)]
        return args + list(self.bundle_args)


RI = "equivit_ri_tiny_patch16_224"
DISC = "equivit_disc_tiny_patch16_224"
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
        DISC),
    "equivit_disc_blur07_tiny": Candidate(
        "equivit_disc + anti-aliasing: Gaussian blur (sigma 0.7) before every strided stem stage",
        DISC, {"embed_kwargs": {"norm_disc_radius": 1.0, "blur_sigma": 0.7}}),
    "equivit_disc_blur10_tiny": Candidate(
        "equivit_disc + anti-aliasing: Gaussian blur (sigma 1.0) before every strided stem stage",
        DISC, {"embed_kwargs": {"norm_disc_radius": 1.0, "blur_sigma": 1.0}}),
    "equivit_disc_shift16_tiny": Candidate(
        "equivit_disc trained with shifts up to 16 px (a whole patch) instead of 8",
        DISC, bundle_args=("--max_shift", "16")),
}
"""Run directory name -> candidate. ``equivit_rid_tiny``, ``equivit_ric_tiny`` and
``equivit_disc_tiny`` are the architectures of the registered ``equivit_rid_tiny_patch16_224``,
``equivit_ric_tiny_...`` and ``equivit_disc_tiny_...``."""

BASELINE = "vit_tiny"

REFERENCE_WINDOWS = {"disc": "ideal descriptor, mean over the inscribed disc (reference)",
                     "square": "ideal descriptor, mean over the whole tile (reference)"}
"""The :class:`WindowedDescriptors` references measured beside the models."""

METRICS = (("grid90_mutual_knn", "mkNN 90°"), ("off_grid_mutual_knn", "mkNN off-grid"),
           ("shift_4_mutual_knn", "mkNN 4 px"), ("shift_8_mutual_knn", "mkNN 8 px"),
           ("shift_8_rot90_mutual_knn", "mkNN 8 px + 90°"),
           ("off_grid_mean_cosine", "cos off-grid"))
"""Summary keys of the report in the tables, with their column names."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def data_dir() -> Path:
    return Path(os.environ.get("EQUIVIT_DATA", REPO.parent / "shared" / "data"))


def run_name(name: str, seed: int) -> str:
    """``"equivit_disc_tiny-seed1"``: a trained run, its label in the report (no ``/``: the
    report labels a model by the last part of its source)."""
    return f"{name}-seed{seed}"


# --------------------------------------------------------------------------- training


def train(name: str, candidate: Candidate, runs: Path, epochs: int, augment: str,
          seed: int = 0) -> Path:
    """Train one candidate with the bundle under ``seed`` unless its checkpoint is there
    (``runs/<name>/seed<seed>/models/model.pt``); the checkpoint. The validation split stays
    the one of seed 0 for every seed, so accuracies are measured on the same tiles."""
    root = runs / name / f"seed{seed}"
    checkpoint = root / "models" / "model.pt"
    if (root / "done").is_file() and checkpoint.is_file():
        log(f"{run_name(name, seed)}: trained already ({checkpoint})")
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
        "--seed", str(seed), "--train#datalist#seed", "0", "--validate#datalist#seed", "0",
        *candidate.bundle_overrides(),
    ]
    log(f"{run_name(name, seed)}: training ({' '.join(command[3:])})")
    start = time.perf_counter()
    with open(root / "train.log", "w") as stream:
        subprocess.run(command, check=True, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = time.perf_counter() - start
    (root / "done").write_text(f"{seconds:.0f}\n")
    log(f"{run_name(name, seed)}: trained in {seconds:.0f} s")
    return checkpoint


# --------------------------------------------------------------------------- sources


def sources(runs: Path, tile_size: int = 224) -> list[RegionSet]:
    """The regions every model is measured on, one set per source.

    * ``CMU-1-Small-Region``: the shared 20x slide, 150 of its overlapping ``2T`` tissue
      regions (step ``T / 2``, the report's default);
    * ``tiatoolbox_he``: TIAToolbox's packaged 1000 x 1000 H&E image (0.5 um/px) written as
      a pyramidal TIFF (lossless), every ``2T`` region at step ``T / 4`` (100: a small image);
    * ``lc25000_val``: the 91 held-out LC25000 lung tiles (the bundle's validation split,
      never trained on);
    * ``crc_tiles``: the 41 colorectal tiles (Kather classes; another organ and lab).

    Tiles are 224 px, so they are the centre of a ``2T`` context whose rest is their mirror
    image (:func:`~equivit_plugin.robustness.tile_regions`).
    """
    slide = data_dir() / "slides" / "CMU-1-Small-Region.svs"
    image = runs / "sources" / "tiatoolbox_he.tif"
    if not image.is_file():
        image.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(image) as tmp:
            write_pyramid_tiff(demo_he_image(), DEMO_MPP, tmp, compression="zlib")
    held_out = [item["image"] for item in
                datalist(str(data_dir() / "lc25000_lung_train"), part="val")]
    return [
        sample_regions(slide, tile_size=tile_size, n_regions=150, region_stride=0.5),
        sample_regions(image, tile_size=tile_size, n_regions=150, region_stride=0.25),
        tile_regions(held_out, tile_size=tile_size, name="lc25000_val"),
        tile_regions(data_dir() / "crc_tiles", tile_size=tile_size, name="crc_tiles"),
    ]


class WindowedDescriptors(nn.Module):
    """A reference encoder: an ideal shift-equivariant descriptor pooled over a window.

    Two fixed random convolutions (``3 -> C`` 5 x 5, ``C -> C`` 3 x 3, GELU after each) at
    stride 1 - no subsampling, so no aliasing and no patch grid - then the mean over
    ``window``: ``"disc"`` (the inscribed disc) or ``"square"`` (the whole tile). A shift of
    the view changes its features only through the tissue that enters and leaves the window.

    Shapes:
        ``(B, 3, T, T) -> (B, C)``.
    """

    def __init__(self, window: str, tile_size: int = 224, channels: int = 32,
                 seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Parameter(torch.randn(channels, 3, 5, 5, generator=generator)
                                  / math.sqrt(75), requires_grad=False)
        self.conv2 = nn.Parameter(torch.randn(channels, channels, 3, 3, generator=generator)
                                  / math.sqrt(9 * channels), requires_grad=False)
        # The disc equivit_disc attends to, at pixel resolution: every pixel a "token".
        weights = disc_token_mask((tile_size, tile_size), 1.0).view(tile_size, tile_size) \
            .float() if window == "disc" else torch.ones(tile_size, tile_size)
        self.register_buffer("window", weights / weights.sum())
        self.num_features = channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(F.conv2d(x, self.conv1, padding=2))
        return F.gelu(F.conv2d(x, self.conv2, padding=1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return (x * self.window).sum((-2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def references(tile_size: int = 224) -> list[tuple[nn.Module, ModelInfo]]:
    """The :data:`REFERENCE_WINDOWS` encoders, labelled ``reference/<window>``."""
    return [(WindowedDescriptors(window, tile_size).eval(),
             ModelInfo(name=f"windowed_descriptors_{window}", source=f"reference/{window}",
                       num_classes=0, class_names=None, img_size=tile_size, embed_dim=32,
                       random_weights=False))
            for window in REFERENCE_WINDOWS]


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


# --------------------------------------------------------------------------- aggregating


def spread(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "sd", "values"}``; ``sd`` is the sample standard deviation (0 for one)."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def aggregate(report: Mapping[str, Any], runs: Mapping[str, Sequence[str]],
              accuracies: Mapping[str, Sequence[float]] | None = None) -> dict[str, Any]:
    """Per source (and ``"all"``), per candidate: every :data:`METRICS` summary as mean and
    standard deviation over its runs (seeds).

    Args:
        report: the rotation report; models are found by their ``source``.
        runs: candidate -> the sources of its runs in the report.
        accuracies: candidate -> accuracy of each run (added as ``"accuracy"``).

    Returns:
        ``{source: {candidate: {metric: spread}}}``, ``"all"`` first, then the report's
        sources in order.
    """
    records = {model["source"]: model for model in report["models"]}
    names = ["all", *(source["name"] for source in report.get("sources", []))]
    table: dict[str, dict[str, Any]] = {}
    for source in names:
        rows = {}
        for candidate, labels in runs.items():
            parts = [records[label] if source == "all" else
                     (records[label].get("sources") or {}).get(source) for label in labels]
            if any(part is None for part in parts):
                continue
            rows[candidate] = {key: spread([part["summary"][key] for part in parts])
                               for key, _ in METRICS if parts[0]["summary"].get(key) is not None}
            if accuracies and candidate in accuracies:
                rows[candidate]["accuracy"] = spread(accuracies[candidate])
        if rows:
            table[source] = rows
    return table


def _cell(value: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    if value is None:
        return "-"
    if len(value["values"]) == 1:
        return f"{scale * value['mean']:.{digits}f}"
    return f"{scale * value['mean']:.{digits}f} ± {scale * value['sd']:.{digits}f}"


def targets(table: Mapping[str, Any], speed_ratio: Mapping[str, float],
            candidate: str) -> dict[str, Any]:
    """The issue's targets for one candidate, on every source: 8 px mutual-kNN at least ViT's
    + 0.10 and at least 0.90; accuracy not below ViT's; inference at least 0.90x ViT's."""
    sources = [name for name in table if name != "all" and candidate in table[name]
               and BASELINE in table[name]]
    eight = {name: table[name][candidate]["shift_8_mutual_knn"]["mean"] for name in sources}
    over_vit = {name: eight[name] - table[name][BASELINE]["shift_8_mutual_knn"]["mean"]
                for name in sources}
    accuracy = table["all"][candidate].get("accuracy", {}).get("mean")
    vit_accuracy = table["all"][BASELINE].get("accuracy", {}).get("mean")
    return {
        "shift_8_min": min(eight.values()) if eight else None,
        "shift_8_over_vit_min": min(over_vit.values()) if over_vit else None,
        "shift_8_at_least_0.90": all(v >= 0.90 for v in eight.values()),
        "shift_8_vit_plus_0.10": all(v >= 0.10 for v in over_vit.values()),
        "accuracy_not_below_vit": (accuracy is not None and vit_accuracy is not None
                                   and accuracy >= vit_accuracy),
        "inference_ratio": speed_ratio.get(candidate),
        "inference_at_least_0.90x": (speed_ratio.get(candidate) or 0.0) >= 0.90,
    }


def render(result: Mapping[str, Any]) -> str:
    """The markdown: one table per source (mean ± standard deviation over the seeds), the
    throughput and the targets."""
    table, seeds = result["table"], result["seeds"]
    labels = {**{name: CANDIDATES[name].label for name in result["candidates"]},
              **{f"reference/{w}": label for w, label in REFERENCE_WINDOWS.items()}}
    header = ["model", "seeds", "acc %", *(title for _, title in METRICS)]
    lines = [
        "# Rotation and shift robustness of bundle-trained tiny models, per source (CPU)", "",
        f"Machine: {result['machine']}. Each trained model over the training seeds in its "
        "`seeds` column: mean ± standard deviation over them (references are fixed, "
        "untrained encoders). Accuracy on "
        f"the 91 held-out LC25000 tiles (validation groups of split seed 0). Rotation report: "
        f"k = {result['rotation_report']['k']}, mutual-kNN (mkNN) between original and "
        f"rotated/shifted features; off-grid = the angles that are not multiples of 90.", "",
    ]
    sources = {source["name"]: source for source in result["rotation_report"]["sources"]}
    for name, rows in table.items():
        if name == "all":
            title = f"All {result['rotation_report']['n_regions']} regions pooled"
        else:
            kind = ("tiles, each the centre of a mirrored 448 px context"
                    if sources[name]["kind"] == "tiles" else "slide regions")
            title = f"{name}: {sources[name]['regions']} {kind}"
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for candidate, row in rows.items():
            lines.append("| " + " | ".join([
                labels.get(candidate, candidate),
                ", ".join(map(str, seeds[candidate])) if candidate in seeds else "-",
                _cell(row.get("accuracy"), 100.0, 1) if name == "all" else "",
                *(_cell(row.get(key)) for key, _ in METRICS)]) + " |")
        lines.append("")
    sp = result.get("speed")
    if sp:
        lines += ["## Throughput (batch 32, round robin, median of "
                  f"{sp['repeats']} rounds, one seed's architecture)", "",
                  "| model | infer img/s | infer / ViT | train img/s | train / ViT |",
                  "|---|---|---|---|---|"]
        for name in result["candidates"]:
            lines.append(f"| {labels[name]} | {sp['inference_img_s'][name]:.1f} | "
                         f"{sp['inference_ratio'][name]:.3f}x | {sp['train_img_s'][name]:.1f} | "
                         f"{sp['train_ratio'][name]:.3f}x |")
        lines.append("")
    if result.get("targets"):
        lines += ["## Targets (every source: 8 px mkNN >= ViT + 0.10 and >= 0.90; accuracy "
                  "not below ViT; inference >= 0.90x ViT)", "",
                  "| model | lowest 8 px mkNN | lowest margin over ViT at 8 px | acc >= ViT | "
                  "infer / ViT |", "|---|---|---|---|---|"]
        for name, got in result["targets"].items():
            lines.append(
                f"| {labels[name]} | {got['shift_8_min']:.3f} "
                f"({'met' if got['shift_8_at_least_0.90'] else 'missed'}) | "
                f"{got['shift_8_over_vit_min']:+.3f} "
                f"({'met' if got['shift_8_vit_plus_0.10'] else 'missed'}) | "
                f"{'yes' if got['accuracy_not_below_vit'] else 'no'} | "
                f"{got['inference_ratio']:.3f}x |")
        lines.append("")
    lines += [f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=REPO / "benchmarks" / "runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--only", nargs="+", choices=sorted(CANDIDATES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="training seeds of every candidate")
    parser.add_argument("--single-seed", nargs="+", default=[], choices=sorted(CANDIDATES),
                        metavar="NAME", help="candidates trained and measured with the first "
                        "of --seeds only (exploratory ones; the table shows each row's seeds)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--augment", default="any_angle")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--no-references", action="store_true",
                        help="leave out the windowed-descriptor references")
    parser.add_argument("--repeats", type=int, default=5, help="throughput rounds")
    args = parser.parse_args(argv)
    names = list(args.only or CANDIDATES)
    if BASELINE not in names:
        names.insert(0, BASELINE)
    seeds = {name: args.seeds[:1] if name in args.single_seed else list(args.seeds)
             for name in names}
    checkpoints: dict[str, Path] = {}
    for name in names:
        for seed in seeds[name]:
            checkpoints[run_name(name, seed)] = (
                args.runs / name / f"seed{seed}" / "models" / "model.pt" if args.skip_train
                else train(name, CANDIDATES[name], args.runs, args.epochs, args.augment, seed))
    loaded = {label: load_model(path) for label, path in checkpoints.items()}
    log("accuracy")
    accuracies = {label: accuracy(*loaded[label]) for label in checkpoints}
    log("rotation report")
    # (model, info) pairs whose source is the run's name (every checkpoint is "model.pt")
    models = [(net, dataclasses.replace(info, source=label))
              for label, (net, info) in loaded.items()]
    if not args.no_references:
        models += references()
    report = rotation_report(models, sources(args.runs), progress=True,
                             out_dir=args.out / "rotation_robustness_report")
    runs = {name: [run_name(name, seed) for seed in seeds[name]] for name in names}
    if not args.no_references:
        runs.update({f"reference/{window}": [f"reference/{window}"]
                     for window in REFERENCE_WINDOWS})
    table = aggregate(report, runs, {
        name: [accuracies[label]["accuracy"] for label in labels]
        for name, labels in runs.items() if name in CANDIDATES})
    log("throughput")
    speeds = speed(names, args.repeats)
    result = {
        "command": " ".join(["python", "benchmarks/rotation_robustness.py",
                             *(argv or sys.argv[1:])]),
        "machine": f"{throughput.cpu_model()}, {throughput.cpu_count()} cores, torch "
                   f"{torch.__version__}",
        "candidates": names,
        "seeds": seeds,
        "training": {"configs": ["train.json", "quick_train.json"], "max_epochs": args.epochs,
                     "augment": args.augment, "split_seed": 0},
        "accuracy": accuracies,
        "rotation_report": report,
        "table": table,
        "speed": speeds,
        "targets": {name: targets(table, speeds["inference_ratio"], name)
                    for name in names if name != BASELINE},
    }
    throughput.publish(args.out, "rotation_robustness", result, render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
