"""Benchmark scripts that must keep working on a machine without a GPU: ``gpu_check.py``
(every CUDA check skipped with one clear message, the CPU parts run, the JSON written) and
``startup.py`` (the JSON's structure; timings are never asserted)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "benchmarks"
CPU_CHECKS = ["data", "cpu_d4"]
CUDA_CHECKS = ["parity", "autocast", "engines", "pipeline", "slides", "bundle", "compile",
               "throughput"]
NO_CUDA = "skipped: CUDA not available"
CHECK_KEYS = {"id", "number", "title", "status", "seconds", "message", "rows", "details"}
ROW_KEYS = {"check", "result", "target", "status", "seconds"}


def _run_script(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> args`` from the repository root, with CUDA hidden."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _bench_module(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the benchmarks folder is not a package; the
    scripts import their neighbours, so it is on the path while one is imported)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    """``benchmarks/gpu_check.py`` as a module."""
    return _bench_module("gpu_check")


# ------------------------------------------------------------------------------ gpu_check


def test_gpu_check_quick_on_cpu_skips_every_cuda_check(tmp_path: Path) -> None:
    out = tmp_path / "results" / "gpu.json"
    result = _run_script("gpu_check.py", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads(out.read_text())
    assert {"machine", "settings", "checks", "summary", "wall_s"} <= set(report)
    checks = {entry["id"]: entry for entry in report["checks"]}
    assert [entry["id"] for entry in report["checks"]] == CPU_CHECKS + CUDA_CHECKS
    for entry in report["checks"]:
        assert set(entry) == CHECK_KEYS, entry["id"]
    for check_id in CUDA_CHECKS:
        entry = checks[check_id]
        assert (entry["status"], entry["message"], entry["rows"]) == ("skipped", NO_CUDA, [])
    for check_id in CPU_CHECKS:  # the CPU parts ran, on real data or the fallbacks
        entry = checks[check_id]
        assert entry["status"] == "pass", entry
        assert entry["rows"] and all(set(row) == ROW_KEYS for row in entry["rows"])
    assert report["summary"] == {"passed": 2, "failed": 0, "errors": 0, "skipped": 8,
                                 "exit_code": 0}
    assert report["machine"]["cuda_available"] is False

    # One clear message per CUDA part: one table row and one log line each.
    assert result.stdout.count(NO_CUDA) == len(CUDA_CHECKS)
    assert result.stderr.count(NO_CUDA) == len(CUDA_CHECKS)
    markdown = out.with_suffix(".md").read_text()
    assert "| check | result | target | pass/fail | seconds |" in markdown
    assert markdown.count("SKIPPED") == len(CUDA_CHECKS)


def test_gpu_check_without_data_writes_its_own_slide(tmp_path: Path) -> None:
    """No shared data: the slide is written from TIAToolbox's packaged H&E image."""
    out = tmp_path / "gpu.json"
    result = _run_script("gpu_check.py", "--quick", "--checks", "data", "--out", str(out),
                         "--data", str(tmp_path / "missing"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (entry,) = json.loads(out.read_text())["checks"]
    assert entry["status"] == "pass"
    rows = {row["check"].split(" (")[0]: row for row in entry["rows"]}
    assert "fallback" in rows["slide he_0.5mpp.tif"]["check"]
    assert "0.500 um/px" in rows["slide he_0.5mpp.tif"]["result"]
    assert entry["details"]["tiles"] == [4, 224, 224, 3]


def _context(gpu_check: ModuleType, tmp_path: Path) -> Any:
    import torch

    return gpu_check.Context(quick=True, device=torch.device("cpu"), workdir=tmp_path,
                             data_root=tmp_path, cuda=False)


def test_gpu_check_slides_runs_on_the_cpu_in_quick_mode(gpu_check: ModuleType,
                                                         tmp_path: Path) -> None:
    """The realistic-slide check, run directly on the CPU (its CUDA targets are then only
    reported): every row is there and the pipeline embedded the slide's tissue."""
    ctx = gpu_check.Context(quick=True, device=__import__("torch").device("cpu"),
                            workdir=tmp_path, data_root=gpu_check.default_data_root(),
                            cuda=False)
    rec = gpu_check.Recorder()
    gpu_check.check_slides(ctx, rec)
    checks = [row.check for row in rec.rows]
    assert len(checks) == 5, checks  # loader, two encoders, distill, views
    assert checks[0].startswith("realistic_40x_2048.svs: loader alone")
    assert all(row.status in ("pass", "info") for row in rec.rows[:3]), rec.rows
    details = rec.details
    assert details["loader_tiles_per_s"] > 0
    for model in ("equivit_disc_tiny_patch16_224", "kaiko-vits16"):
        assert details[model]["patches"] > 8 and details[model]["ratio"] > 0
    assert rec.rows[3].status == "pass"  # a student was written
    assert details["views"]["new_views_per_s"] > 0 and details["student_images_per_s"] > 0


def test_slide_read_quick_reports_loader_over_limit(tmp_path: Path) -> None:
    """``slide_read.py`` on a small realistic slide: the table and the JSON, a ratio per loader
    and worker count (values are measured, never asserted beyond being positive)."""
    result = _run_script("slide_read.py", "--quick", "--side", "2048", "--no-views",
                         "--workers", "0", "--cache", str(tmp_path / "cache"),
                         "--out", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "slide_read.json").read_text())
    names = [slide["slide"] for slide in report["slides"]]
    assert names == ["realistic_40x_2048.svs", "CMU-1-Small-Region.svs"]
    for slide in report["slides"]:
        assert set(slide["limits"]) == {"openslide", "tifffile"}
        loaders = {row["loader"] for row in slide["loaders"]}
        assert {"per-tile", "decode-once/openslide", "decode-once/tifffile"} <= loaders
        assert all(row["loader_over_limit"] > 0 for row in slide["loaders"])
        assert slide["fixed"]["beyond_mask_s"] >= 0
    assert report["slides"][0]["read_size"] == 448  # 40x read at 0.5 um/px: level 0, halved
    assert "loader / limit" in result.stdout


def test_gpu_check_reports_failures_errors_timeouts_and_budget(gpu_check: ModuleType,
                                                               tmp_path: Path) -> None:
    def passing(_ctx: Any, rec: Any, _cap: float) -> None:
        rec.judge("a", "1", "1", True)

    def failing(_ctx: Any, rec: Any, _cap: float) -> None:
        rec.info("number", "3")
        rec.judge("b", "2", "1", False)

    def raising(_ctx: Any, rec: Any, _cap: float) -> None:
        rec.judge("before", "ok", "ok", True)
        raise RuntimeError("boom")

    def slow(_ctx: Any, _rec: Any, _cap: float) -> None:
        time.sleep(30)

    make = gpu_check.Check
    checks = [make("ok", "1", "passes", passing, False, 10, 0, quick_cap_s=10),
              make("bad", "2", "fails", failing, False, 10, 0, quick_cap_s=10),
              make("boom", "3", "raises", raising, False, 10, 0, quick_cap_s=10),
              make("slow", "4", "too slow", slow, False, 10, 0, quick_cap_s=0.5),
              make("gpu", "5", "needs CUDA", passing, True, 10, 0),
              make("late", "6", "no time left", passing, False, 10, 1e6)]
    results = {r.id: r for r in gpu_check.run_checks(checks, _context(gpu_check, tmp_path), 60)}

    assert [results[i].status for i in ("ok", "bad", "boom", "slow", "gpu", "late")] == \
        ["pass", "fail", "error", "error", "skipped", "skipped"]
    assert [row.status for row in results["bad"].rows] == ["info", "fail"]
    assert results["boom"].message == "RuntimeError: boom" and len(results["boom"].rows) == 1
    assert "RuntimeError: boom" in results["boom"].details["traceback"]
    assert "timed out after its 0.5 s time cap" in results["slow"].message
    assert results["gpu"].message == gpu_check.NO_CUDA
    assert results["late"].message == gpu_check.NO_TIME
    assert gpu_check.exit_code(list(results.values())) == 1
    assert gpu_check.exit_code([results["ok"], results["gpu"], results["late"]]) == 0

    lines = gpu_check.table_rows(list(results.values()))
    assert lines[4][:4] == ["3 raises: (stopped)", "RuntimeError: boom", "-", "ERROR"]
    assert [line[3] for line in lines] == ["PASS", "INFO", "FAIL", "PASS", "ERROR", "ERROR",
                                           "SKIPPED", "SKIPPED"]


# ------------------------------------------------------------------------------ startup


def test_startup_quick_writes_the_expected_structure(tmp_path: Path) -> None:
    out = tmp_path / "startup.json"
    result = _run_script("startup.py", "--quick", "--repeats", "1", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads(out.read_text())
    assert set(report) == {"machine", "settings", "cases", "ratios", "targets", "wall_s"}
    assert report["settings"]["repeats"] == 1 and report["settings"]["quick"] is True
    assert list(report["cases"]) == ["import_timm", "import_equivit", "equivit_help"]
    for case_id, entry in report["cases"].items():
        assert entry["error"] is None, (case_id, entry["error"])
        assert len(entry["wall_s"]) == 1 and entry["median_s"] == entry["wall_s"][0] > 0
        assert set(entry["heavy_modules"]) <= {"torch", "timm", "monai", "tiatoolbox"}
        assert entry["n_modules"] > 0 and entry["top_imports"]
        assert set(entry["top_imports"][0]) == {"module", "cumulative_s", "self_s"}
    assert report["cases"]["equivit_help"]["command"][0].endswith("equivit")
    assert {"torch", "timm"} <= set(report["cases"]["import_timm"]["heavy_modules"])
    assert list(report["ratios"]) == ["import_equivit / import_timm"]
    assert [t["target"] for t in report["targets"]] == [
        "equivit --help", "import equivit_plugin / import timm",
        "import equivit_plugin imports monai / tiatoolbox"]
    assert all(set(t) == {"target", "limit", "measured", "pass"} and t["measured"]
               for t in report["targets"])
    assert "### Targets" in out.with_suffix(".md").read_text()


def test_startup_parses_importtime() -> None:
    startup = _bench_module("startup")
    stderr = "\n".join([
        "import time: self [us] | cumulative | imported package",
        "import time:       100 |        100 |   torch._C",
        "import time:      2000 |       2100 | torch",
        "import time:        50 |       2150 | timm",
        "import time:        30 |         30 |     monai.utils",
        "some other output",
    ])
    profile = startup.parse_importtime(stderr)
    assert profile.modules == ["torch._C", "torch", "timm", "monai.utils"]
    assert profile.heavy == ["torch", "timm", "monai"]
    assert profile.import_total_s == pytest.approx(0.00218)
    assert [t["module"] for t in profile.top][:2] == ["timm", "torch"]


def test_distillation_knn_and_probe_helpers_match_scikit_learn() -> None:
    from sklearn.neighbors import KNeighborsClassifier

    distillation = _bench_module("distillation")
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(60, 8)), rng.normal(size=(25, 8))
    train_y = (train[:, 0] + 0.3 * rng.normal(size=60) > 0).astype(int)
    test_y = (test[:, 0] > 0).astype(int)
    # Two classes and an odd k: no ties, so any correct majority vote agrees.
    expected = KNeighborsClassifier(n_neighbors=5, metric="cosine").fit(train, train_y)
    assert distillation.knn_accuracy(train, train_y, test, test_y, k=5) == pytest.approx(
        expected.score(test, test_y))
    assert distillation.cosine(train, train) == pytest.approx(1.0)
    assert distillation.cosine(train, -train) == pytest.approx(-1.0)
    shifted = train + 100.0
    assert distillation.cosine(shifted, shifted[::-1]) > 0.99  # the common component
    assert abs(distillation.cosine(shifted, shifted[::-1], shifted.mean(0))) < 0.5
    assert distillation.probe(train, train_y).score(train, train_y) > 0.8


def test_rotation_robustness_aggregates_seeds_per_source_and_checks_targets() -> None:
    robustness = _bench_module("rotation_robustness")

    def record(label: str, eight: float, per_source: dict[str, float]) -> dict[str, Any]:
        def summary(value: float) -> dict[str, float]:
            return {key: value for key, _ in robustness.METRICS} | {"shift_8_mutual_knn": value}
        return {"label": label.split("/")[-1], "source": label, "summary": summary(eight),
                "sources": {name: {"summary": summary(v)} for name, v in per_source.items()}}

    report = {"sources": [{"name": "slide"}, {"name": "tiles"}], "models": [
        record("vit_tiny/seed0", 0.5, {"slide": 0.5, "tiles": 0.9}),
        record("vit_tiny/seed1", 0.7, {"slide": 0.6, "tiles": 0.8}),
        record("equivit_disc_tiny/seed0", 0.8, {"slide": 0.95, "tiles": 0.95}),
        record("equivit_disc_tiny/seed1", 0.9, {"slide": 0.87, "tiles": 0.91}),
    ]}
    runs = {"vit_tiny": ["vit_tiny/seed0", "vit_tiny/seed1"],
            "equivit_disc_tiny": ["equivit_disc_tiny/seed0", "equivit_disc_tiny/seed1"]}
    table = robustness.aggregate(report, runs, {"vit_tiny": [0.8, 0.9],
                                                "equivit_disc_tiny": [0.9, 0.92]})
    assert list(table) == ["all", "slide", "tiles"]
    eight = table["slide"]["equivit_disc_tiny"]["shift_8_mutual_knn"]
    assert eight["values"] == [0.95, 0.87] and eight["mean"] == pytest.approx(0.91)
    assert eight["sd"] == pytest.approx(np.std([0.95, 0.87], ddof=1))
    assert table["all"]["vit_tiny"]["accuracy"]["mean"] == pytest.approx(0.85)
    got = robustness.targets(table, {"equivit_disc_tiny": 0.95}, "equivit_disc_tiny")
    # slide: 0.91 (>= 0.90, +0.36 over ViT); tiles: 0.93 but only +0.08 over ViT's 0.85
    assert got["shift_8_min"] == pytest.approx(0.91)
    assert got["shift_8_over_vit_min"] == pytest.approx(0.08)
    assert got["shift_8_at_least_0.90"] and not got["shift_8_vit_plus_0.10"]
    assert got["accuracy_not_below_vit"] and got["inference_at_least_0.90x"]
    text = robustness.render({
        "table": table, "candidates": list(runs), "machine": "cpu", "command": "python x",
        "seeds": {"vit_tiny": [0, 1], "equivit_disc_tiny": [0, 1]},
        "rotation_report": {"k": 10, "n_regions": 4, "sources": [
            {"name": "slide", "kind": "slide", "regions": 2},
            {"name": "tiles", "kind": "tiles", "regions": 2}]},
        "targets": {"equivit_disc_tiny": got}})
    slide_rows = text.split("## slide")[1].split("##")[0]
    assert "| 0, 1 |" in slide_rows and "0.910 ± 0.057" in slide_rows
    assert "| 0.910 (met) | +0.080 (missed) | yes | 0.950x |" in text
    # The reference encoder pools an ideal descriptor: a shift of the view by whole pixels
    # equals the descriptor map shifted, away from the border (no patch grid, no aliasing).
    reference = robustness.WindowedDescriptors("square", tile_size=32).eval()
    x = torch.rand(1, 3, 48, 48)
    with torch.no_grad():
        whole = reference.forward_features(x)
        assert torch.allclose(reference.forward_features(x[..., 4:36, 4:36])[..., 3:-3, 3:-3],
                              whole[..., 7:33, 7:33], atol=1e-5)
