"""Whole cells for MIL: an ``equivit_disc`` student on its 224 px cell vs a 320 px context.

``equivit_disc`` sees only the disc inscribed in its input, so with non-overlapping 224 px
cells part of every cell's corners never reaches a feature. The feature pipeline now embeds,
for such a model, the ``ceil(224 sqrt 2)`` -> 320 px region centred on each cell
(``extract-features --context``; ``--context 224`` is the old behaviour). This script
measures both for the same distilled student, side by side:

(a) today: the student on the 224 px cell;
(b) the 320 px context around the cell, same weights (``dynamic_img_size=True``), no
    retraining.

Teacher and student are ``benchmarks/distillation.py``'s: ``vit_tiny`` trained with the MONAI
bundle (``benchmarks/rotation_robustness.py``'s recipe, 15 epochs, any-angle augmentation),
one ``equivit_disc_tiny`` student distilled from it with ``equivit distill`` (10 epochs, the
shared slide at stride 112, the CRC tiles and the LC25000 training tiles without labels).
Both are reused when their runs exist. Measured per variant:

1. **fidelity**: the cosine between the student's pipeline feature of a cell and the
   teacher's D4-mean target of that 224 px cell (the distillation target), raw and after
   removing the mean of the distillation targets (as ``distillation.py`` reports it), on
   held-out cells of the demo slide (TIAToolbox's packaged H&E image, never distilled on,
   mirrored into a 2000 px mosaic by ``equivit_plugin.features.demo``; stride 112, only
   cells whose 320 px context lies inside the slide), and, as a second row, on the shared
   slide's cells (stride 224), which the student was distilled on;
2. **the rotation report** (Elphick et al.'s protocol, k = 10) of the teacher, (a) and (b) on
   the same regions of the shared slide: regions of twice each model's input (640 px for
   (b), 448 px for the others) around the same centres, rotated about the centre;
3. **cost**: tiles/s of the pooled embedding at 224 and at 320 px inputs, round robin in one
   run (``benchmarks/throughput.py``'s timer), and the ratio of ``extract_features`` end to
   end on the demo slide (alternating runs, median);
4. **coverage**: the share of the cell's pixels that can change the feature: the inscribed
   disc analytically (pi / 4), and measured as the support of the input gradient (float64,
   random projections of the feature, real cells); then the probe: the cell pixels that (a)
   cannot see, inverted, in every held-out cell, and how far each variant's feature moves.

Results: ``--out`` (default ``benchmarks/results``) gets ``coverage.{json,md}`` and
``coverage_report/rotation_report.{json,png}``; runs stay in ``--runs`` (git-ignored).

Commands, from the repository root::

    .venv/bin/python benchmarks/cell_coverage.py

(Not ``coverage.py``: the benchmark scripts put ``benchmarks/`` first on ``sys.path``, and a
module named ``coverage`` there is what numba, imported by TIAToolbox, takes for coverage.py's
package: every script that reads a slide would fail.)

Measured run time (2-core CPU, another job running beside it part of the time): teacher
training 850 s and student distillation 1069 s (teacher targets included), each done once and
reused; the measuring itself 417 s (rotation report 4 minutes of it, (b) 141 s of that).

A student distilled on 320 px views, (c), is not here: ``equivit distill`` cuts student
views of the teacher's input size (``distill/run.py`` sizes views, contexts and the student
from the teacher's ``img_size``), so it needs a setting in ``distill/config.py`` and
``distill/run.py`` besides ``distill/views.py`` and ``distill/tiles.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import distillation  # noqa: E402  (teacher, student, fidelity and timing helpers)
import rotation_robustness as robustness  # noqa: E402  (the teacher's training recipe)
import throughput  # noqa: E402  (round-robin timing)

from equivit_plugin.features import extract_features, read_features  # noqa: E402
from equivit_plugin.features.demo import demo_slide  # noqa: E402
from equivit_plugin.features.encoder import automatic_context  # noqa: E402
from equivit_plugin.models import (  # noqa: E402
    PooledEncoder,
    input_normalisation,
    load_model,
)
from equivit_plugin.robustness import rotation_report  # noqa: E402

REPO = robustness.REPO
STUDENT = "equivit_disc_tiny_patch16_224"
CELL = 224
log = robustness.log


def trained_models(runs: Path, epochs: int, batch_size: int,
                   workers: int) -> tuple[Path, Path, float]:
    """The bundle-trained teacher and the distilled student (made unless their runs exist):
    ``(teacher.pt, student.pt, distillation seconds)``."""
    teacher = robustness.train(distillation.TEACHER_RUN,
                               robustness.CANDIDATES[distillation.TEACHER_RUN], runs, 15,
                               "any_angle")
    work = runs / "coverage"
    work.mkdir(parents=True, exist_ok=True)
    tiles = distillation.unlabelled_tiles(work)
    slide = robustness.data_dir() / "slides" / "CMU-1-Small-Region.svs"
    student, seconds = distillation.distil(STUDENT, teacher, work, epochs, slide, tiles,
                                           batch_size, workers)
    return teacher, student, seconds


def target_centre(work: Path) -> tuple[np.ndarray, int]:
    """The mean of the distillation targets (the teacher's D4-mean embeddings of the tiles the
    student learnt from), what the centred fidelity removes, and their number."""
    with h5py.File(work / "targets_vit_tiny.h5", "r") as handle:
        values, status = handle["targets"][:], handle["status"][:]
    done = values[status == 1].astype(np.float64)
    return done.mean(0), len(done)


def pipeline(slide: Path, out: Path, student: Path, context: int, stride: int,
             workers: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any], float]:
    """``extract_features`` of one slide, recomputed: (features, coords, attrs, seconds)."""
    start = time.perf_counter()
    summary = extract_features([slide], out, model=student, context=context, stride=stride,
                               workers=workers, batch_size=32, overwrite=True,
                               print_summary=False)
    seconds = time.perf_counter() - start
    if not summary.ok:
        raise RuntimeError(f"{slide}: {summary.failed}")
    features, coords, attrs = read_features(out / "h5_files" / f"{slide.stem}.h5")
    return features.astype(np.float64), coords, attrs, seconds


def read_regions(slide: Path, coords: np.ndarray, margin: int, size: int) -> torch.Tensor:
    """``(N, 3, size, size)`` float ``[0, 1]`` regions with level-0 top-left ``coords -
    margin``, read as the pipeline reads them."""
    from tiatoolbox.wsicore.wsireader import WSIReader

    reader = WSIReader.open(slide)
    out = np.stack([np.asarray(reader.read_rect(location=(int(x) - margin, int(y) - margin),
                                                size=(size, size), resolution=0.5,
                                                units="mpp"))[..., :3] for x, y in coords])
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0


def embed(model: nn.Module, x: torch.Tensor, mean: tuple, std: tuple, *, d4: bool = False,
          batch_size: int = 32) -> np.ndarray:
    """Pooled ``(N, D)`` float64 features of ``[0, 1]`` images ``x`` (D4-averaged with ``d4``)."""
    encoder = PooledEncoder(model, d4_average=d4).eval()
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return torch.cat([encoder((x[i:i + batch_size] - m) / s).double()
                          for i in range(0, len(x), batch_size)]).numpy()


def cosines(a: np.ndarray, b: np.ndarray, centre: np.ndarray | float = 0.0) -> np.ndarray:
    a, b = a - centre, b - centre
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def fidelity_row(features: np.ndarray, target: np.ndarray, centre: np.ndarray) -> dict:
    raw, centred = cosines(features, target), cosines(features, target, centre)
    return {"cosine": float(raw.mean()), "centred_cosine": float(centred.mean()),
            "centred_cosine_min": float(centred.min()), "n": len(features)}


def inside(coords: np.ndarray, attrs: dict[str, Any], margin: int, size: int) -> np.ndarray:
    """The cells whose ``size`` region (top-left ``coords - margin``) lies inside the slide."""
    x0, y0 = coords[:, 0] - margin, coords[:, 1] - margin
    scale = size * attrs["target_mpp"] / attrs["level0_mpp"]
    return ((x0 >= 0) & (y0 >= 0) & (x0 + scale <= attrs["level0_width"])
            & (y0 + scale <= attrs["level0_height"]))


def gradient_support(net: nn.Module, x: torch.Tensor, mean: tuple, std: tuple,
                     projections: int = 4) -> torch.Tensor:
    """``(H, W)`` bool: the pixels where the feature's gradient is not zero, for any of the
    images ``x`` and random projections of the feature (float64: no rounding hides a pixel)."""
    net = net.double()
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(0)
    total = torch.zeros(x.shape[-2:], dtype=torch.float64)
    try:
        for image in x:
            pixels = image[None].double().requires_grad_(True)
            features = net.forward_head(net.forward_features((pixels - m) / s),
                                        pre_logits=True)
            for _ in range(projections):
                direction = torch.randn(features.shape[1], generator=gen, dtype=torch.float64)
                (grad,) = torch.autograd.grad(features[0] @ direction, pixels,
                                              retain_graph=True)
                total += grad.abs().sum((0, 1))
    finally:
        net.float()
    return total > 0


def coverage(student: Path, cells: torch.Tensor, contexts: torch.Tensor,
             mean: tuple, std: tuple) -> dict[str, Any]:
    """Share of the cell's pixels that reach the feature, for (a) and (b), and the probe:
    every pixel (a) cannot see inverted, in every cell, and how far each feature moves."""
    fixed, _ = load_model(student)
    dynamic, _ = load_model(student, dynamic_img_size=True)
    size = contexts.shape[-1]
    m = (size - CELL) // 2
    seen_a = gradient_support(fixed, cells[:2], mean, std)
    seen_b_full = gradient_support(dynamic, contexts[:2], mean, std)
    seen_b = seen_b_full[m:m + CELL, m:m + CELL]
    yy, xx = torch.meshgrid(torch.arange(CELL) + 0.5, torch.arange(CELL) + 0.5, indexing="ij")
    radius = ((yy - CELL / 2) ** 2 + (xx - CELL / 2) ** 2).sqrt()
    hidden = ~seen_a  # the cell pixels (a) never sees
    probe_cells, probe_contexts = cells.clone(), contexts.clone()
    probe_cells[..., hidden] = 1.0 - probe_cells[..., hidden]
    window = probe_contexts[..., m:m + CELL, m:m + CELL]
    window[..., hidden] = 1.0 - window[..., hidden]
    moved = {}
    for label, net, before, after in (("a", fixed, cells, probe_cells),
                                      ("b", dynamic, contexts, probe_contexts)):
        f0, f1 = embed(net, before, mean, std), embed(net, after, mean, std)
        change = np.linalg.norm(f1 - f0, axis=1) / np.linalg.norm(f0, axis=1)
        moved[label] = {"relative_change_mean": float(change.mean()),
                        "relative_change_min": float(change.min()),
                        "relative_change_max": float(change.max()),
                        "cosine_mean": float(cosines(f0, f1).mean()), "n": len(change)}
    return {
        "disc_fraction_analytic": math.pi / 4,
        "disc_fraction_pixels": float((radius <= CELL / 2).double().mean()),
        "a_cell_fraction_seen": float(seen_a.double().mean()),
        "a_hidden_min_radius_px": float(radius[hidden].min()) if hidden.any() else None,
        "b_cell_fraction_seen": float(seen_b.double().mean()),
        "b_context_fraction_seen": float(seen_b_full.double().mean()),
        "b_seen_outside_cell_vs_cell_area": float(
            (seen_b_full.sum() - seen_b.sum()) / CELL ** 2),
        "probe_hidden_pixels": int(hidden.sum()),
        "probe": moved,
    }


def speed(teacher: nn.Module, fixed: nn.Module, dynamic: nn.Module, size: int,
          repeats: int) -> dict[str, Any]:
    """Tiles/s of the pooled embedding: teacher and (a) at 224, (b) at ``size``, round robin."""
    settings = {s: throughput.Settings(
        device="cpu", batch_size=32, threads=torch.get_num_threads(), sizes=("tiny",),
        repeats=repeats, warmup=1, iters=1, img_size=s, out="", quick=False, amp="none",
        channels_last=False, compile=False, compile_scope="blocks") for s in (CELL, size)}
    images = {s: throughput.make_batch(settings[s])[0] for s in settings}
    runners = {
        "teacher (224)": throughput.inference_runner(PooledEncoder(teacher), images[CELL],
                                                     settings[CELL]),
        "(a) student, 224 cell": throughput.inference_runner(PooledEncoder(fixed),
                                                             images[CELL], settings[CELL]),
        f"(b) student, {size} context": throughput.inference_runner(
            PooledEncoder(dynamic), images[size], settings[size]),
    }
    timings = throughput.round_robin(runners, settings[CELL], "pooled embedding")
    return {"batch_size": 32, "threads": settings[CELL].threads, "repeats": repeats,
            "tiles_per_s": {k: t.median for k, t in timings.items()},
            "spread": {k: t.spread for k, t in timings.items()},
            "vs_a": throughput.ratios(timings, "(a) student, 224 cell")}


def cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(result: dict[str, Any]) -> str:
    fid, report, rates = result["fidelity"], result["rotation_report"], result["speed"]
    cov, pipe, size = result["coverage"], result["pipeline"], result["context"]
    summaries = {m["label"]: m for m in report["models"]}
    labels = {"teacher": "teacher (`vit_tiny`, 224)", "a": "(a) student, 224 cell (today)",
              "b": f"(b) student, {size} context (default now)"}
    speed_keys = {"teacher": "teacher (224)", "a": "(a) student, 224 cell",
                  "b": f"(b) student, {size} context"}
    probe = cov["probe"]
    seen = {"teacher": None, "a": cov["a_cell_fraction_seen"], "b": cov["b_cell_fraction_seen"]}
    lines = [
        "# Whole cells for MIL: equivit_disc on its cell vs a context around it (CPU)", "",
        f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ",
        f"Teacher: `{result['teacher']}` (vit_tiny, bundle-trained); student: "
        f"`{result['student']}` (equivit_disc_tiny, distilled {result['epochs']} epochs); "
        f"the same weights for (a) and (b).", "",
        "| variant | cell pixels that reach the feature | fidelity, held-out demo cells "
        "(centred) | fidelity, CMU-1 cells (centred) | mkNN 90° | mkNN off-grid | "
        "mkNN 8 px | cos off-grid | tiles/s | vs (a) |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for key, label in labels.items():
        summary = summaries[label]["summary"]
        shifts = summaries[label]["shifts"]
        demo, cmu = fid["demo"][key], fid["cmu"][key]
        lines.append(
            f"| {label} | {'-' if seen[key] is None else f'{100 * seen[key]:.1f} %'} | "
            f"{cell(demo['cosine'], 4)} ({cell(demo['centred_cosine'])}) | "
            f"{cell(cmu['cosine'], 4)} ({cell(cmu['centred_cosine'])}) | "
            f"{cell(summary['grid90_mutual_knn'])} | {cell(summary['off_grid_mutual_knn'])} | "
            f"{cell(shifts['8']['mutual_knn'])} | {cell(summary['off_grid_mean_cosine'], 4)} | "
            f"{rates['tiles_per_s'][speed_keys[key]]:.1f} | "
            f"{rates['vs_a'][speed_keys[key]]:.2f}x |")
    lines += [
        "", f"Fidelity: cosine to the teacher's D4-mean target of the 224 px cell; centred: "
        f"after removing the mean of the {result['n_targets']} distillation targets. Held-out: "
        f"{fid['demo']['a']['n']} cells of the demo slide (stride 112, context inside the "
        f"slide; never distilled on); CMU-1: {fid['cmu']['a']['n']} cells of the shared slide "
        f"(stride 224), which the student was distilled on. Teacher row: the teacher's own "
        f"feature of the cell (not averaged).",
        f"Rotation report: {report['n_regions']} regions of the shared slide, k = "
        f"{report['k']}, each model on regions twice its input ({size * 2} px for (b), 448 px "
        f"for the others) around the same centres.", "",
        "## Coverage", "",
        f"- inscribed disc: {100 * cov['disc_fraction_analytic']:.1f} % of the cell "
        f"(analytic; {100 * cov['disc_fraction_pixels']:.1f} % of its pixel centres)",
        f"- measured (support of the input gradient, float64): (a) "
        f"{100 * cov['a_cell_fraction_seen']:.1f} % of the cell's pixels reach the feature "
        f"(the kept tokens' 16 px squares and the stem's receptive fields reach past the disc; "
        f"no pixel nearer the centre than {cell(cov['a_hidden_min_radius_px'], 1)} px is "
        f"hidden); (b) {100 * cov['b_cell_fraction_seen']:.1f} %, plus tissue outside the cell "
        f"of {cov['b_seen_outside_cell_vs_cell_area']:.2f}x the cell's area "
        f"({100 * cov['b_context_fraction_seen']:.1f} % of the {size} px context)",
        f"- probe: the {cov['probe_hidden_pixels']} cell pixels (a) cannot see, inverted in "
        f"each of {probe['a']['n']} held-out cells: (a)'s feature moves by "
        f"{probe['a']['relative_change_max']:.1e} (relative, max); (b)'s by "
        f"{probe['b']['relative_change_mean']:.4f} on average (min "
        f"{probe['b']['relative_change_min']:.4f}; cosine before/after "
        f"{probe['b']['cosine_mean']:.5f})", "",
        "## Cost", "",
        f"Pooled embedding, batch {rates['batch_size']}, {rates['threads']} threads, median of "
        f"{rates['repeats']} round-robin rounds: (b) at {size} px runs at "
        f"{rates['vs_a'][speed_keys['b']]:.2f}x the tiles/s of (a) at 224 px.  ",
        f"Pipeline (`extract_features` on the demo slide, {pipe['n_cells']} cells, end to end, "
        f"median of {len(pipe['seconds'][str(CELL)])} alternating runs): "
        f"{statistics.median(pipe['seconds'][str(CELL)]):.1f} s at 224, "
        f"{statistics.median(pipe['seconds'][str(size)]):.1f} s at {size}: the {size} px "
        f"context takes {pipe['ratio']:.2f}x the time.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=REPO / "benchmarks" / "runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--regions", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="throughput rounds")
    parser.add_argument("--pipeline-rounds", type=int, default=2)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    teacher_path, student_path, distil_seconds = trained_models(
        args.runs, args.epochs, args.batch_size, args.workers)
    work = args.runs / "coverage"
    measure_start = time.perf_counter()
    teacher, teacher_info = load_model(teacher_path)
    fixed, info = load_model(student_path)
    dynamic, _ = load_model(student_path, dynamic_img_size=True)
    size = automatic_context(fixed, CELL)
    t_mean, t_std = input_normalisation(teacher_info)
    s_mean, s_std = input_normalisation(info)
    centre, n_targets = target_centre(work)

    log("pipeline: the demo slide at 224 and at the automatic context, alternating")
    demo = demo_slide(work / "demo")
    seconds: dict[str, list[float]] = {str(CELL): [], str(size): []}
    runs: dict[int, Any] = {}
    for _ in range(args.pipeline_rounds):
        for context in (CELL, size):
            runs[context] = pipeline(demo, work / f"features_demo_{context}", student_path,
                                     context, 112, args.workers)
            seconds[str(context)].append(runs[context][3])
    coords, attrs = runs[size][1], runs[size][2]
    np.testing.assert_array_equal(coords, runs[CELL][1])  # the same cells
    assert attrs["context_size"] == size and runs[CELL][2]["context_size"] == CELL
    margin = int(attrs["context_margin_level0"])
    keep = inside(coords, attrs, margin, size)
    log(f"fidelity: {keep.sum()} held-out demo cells with their context inside the slide")
    cells = read_regions(demo, coords[keep], 0, CELL)
    contexts = read_regions(demo, coords[keep], margin, size)
    target = embed(teacher, cells, t_mean, t_std, d4=True)
    fidelity = {"demo": {
        "teacher": fidelity_row(embed(teacher, cells, t_mean, t_std), target, centre),
        "a": fidelity_row(runs[CELL][0][keep], target, centre),
        "b": fidelity_row(runs[size][0][keep], target, centre)}}

    slide = robustness.data_dir() / "slides" / "CMU-1-Small-Region.svs"
    cmu = {context: pipeline(slide, work / f"features_cmu_{context}", student_path, context,
                             CELL, args.workers) for context in (CELL, size)}
    cmu_coords, cmu_attrs = cmu[size][1], cmu[size][2]
    cmu_keep = inside(cmu_coords, cmu_attrs, int(cmu_attrs["context_margin_level0"]), size)
    cmu_cells = read_regions(slide, cmu_coords[cmu_keep], 0, CELL)
    cmu_target = embed(teacher, cmu_cells, t_mean, t_std, d4=True)
    fidelity["cmu"] = {
        "teacher": fidelity_row(embed(teacher, cmu_cells, t_mean, t_std), cmu_target, centre),
        "a": fidelity_row(cmu[CELL][0][cmu_keep], cmu_target, centre),
        "b": fidelity_row(cmu[size][0][cmu_keep], cmu_target, centre)}
    log(f"fidelity: {fidelity}")

    log("coverage: gradient support and the corner probe")
    covered = coverage(student_path, cells, contexts, s_mean, s_std)
    log(f"coverage: {covered}")

    log("rotation report")
    labels = ("teacher (`vit_tiny`, 224)", "(a) student, 224 cell (today)",
              f"(b) student, {size} context (default now)")
    models = [(teacher, dataclasses.replace(teacher_info, source=labels[0])),
              (fixed, dataclasses.replace(info, source=labels[1])),
              (dynamic, dataclasses.replace(info, source=labels[2], img_size=size))]
    report = rotation_report(models, [slide], n_regions=args.regions, progress=True,
                             out_dir=args.out / "coverage_report")

    log("throughput")
    rates = speed(teacher, fixed, dynamic, size, args.repeats)
    pipe_ratio = statistics.median(seconds[str(size)]) / statistics.median(seconds[str(CELL)])
    result = {
        "command": " ".join(["python", "benchmarks/cell_coverage.py", *(argv or sys.argv[1:])]),
        "machine": f"{throughput.cpu_model()}, {throughput.cpu_count()} cores, torch "
                   f"{torch.__version__}",
        "teacher": str(teacher_path.relative_to(REPO)) if teacher_path.is_relative_to(REPO)
        else str(teacher_path),
        "student": str(student_path.relative_to(REPO)) if student_path.is_relative_to(REPO)
        else str(student_path),
        "epochs": args.epochs, "cell": CELL, "context": size, "n_targets": n_targets,
        "fidelity": fidelity, "coverage": covered, "rotation_report": report,
        "speed": rates,
        "pipeline": {"slide": str(demo), "n_cells": len(coords), "stride": 112,
                     "seconds": seconds, "ratio": pipe_ratio,
                     "patches_per_s": {str(c): len(coords) / statistics.median(seconds[str(c)])
                                       for c in (CELL, size)}},
        "seconds": {"distillation": distil_seconds,
                    "measuring": time.perf_counter() - measure_start,
                    "total": time.perf_counter() - started},
    }
    throughput.publish(args.out, "coverage", result, render(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
