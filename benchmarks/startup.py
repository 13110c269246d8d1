"""Start-up time: imports, model creation and the ``equivit`` command, in fresh interpreters.

Each case runs in a new Python process (``subprocess``), from the repository root:

* first once with ``PYTHONPROFILEIMPORTTIME=1`` (``python -X importtime``): the modules it
  imports, the heavy ones among them (torch, timm, monai, tiatoolbox) and the imports with the
  largest cumulative time; this run is also the warm-up (file caches);
* then ``--repeats`` timed runs (wall time seen by the parent, interpreter start included),
  the cases taking turns round by round so drift hits them alike; the median is reported.

Cases: ``import timm``; ``import equivit_plugin``; creating ``equivit_ri_tiny_patch16_224`` vs
``vit_tiny_patch16_224`` (imports included); ``import equivit_plugin.networks`` (the MONAI
door); ``import equivit_plugin.tiatoolbox`` (the TIAToolbox door); ``equivit --help`` (the
console script next to ``sys.executable``) and ``python -m equivit_plugin.cli --help``.
Targets: ``equivit --help`` < 1 s; ``import equivit_plugin`` <= 1.1 x ``import timm``;
``import equivit_plugin`` imports neither monai nor tiatoolbox. Missed targets are reported
(MISS), not an error: the exit code is 0 unless a case could not run.

Results go to stdout (markdown) and to ``--out`` (default ``benchmarks/results/startup.json``)
and the same path with ``.md``::

    python benchmarks/startup.py                    # all cases, 5 timed runs each
    python benchmarks/startup.py --quick --repeats 1 --out /tmp/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
HEAVY = ("torch", "timm", "monai", "tiatoolbox")
TOP_IMPORTS = 6
HELP_MAX_S = 1.0  # equivit --help
IMPORT_RATIO_MAX = 1.1  # import equivit_plugin / import timm
CASE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Case:
    """One command to time: ``argv`` after the interpreter (``script`` for a console script)."""

    id: str
    label: str
    argv: tuple[str, ...]
    quick: bool = False  # part of the reduced --quick set
    script: str | None = None  # console script next to sys.executable, run instead of python

    def command(self, python: str) -> list[str] | None:
        """The full command line, or ``None`` when the console script does not exist."""
        if self.script is None:
            return [python, *self.argv]
        path = Path(python).parent / self.script
        return [str(path), *self.argv] if path.is_file() else None


CASES: tuple[Case, ...] = (
    Case("import_timm", "import timm", ("-c", "import timm"), quick=True),
    Case("import_equivit", "import equivit_plugin", ("-c", "import equivit_plugin"), quick=True),
    Case("create_equivit_ri", "import equivit_plugin; create equivit_ri_tiny_patch16_224",
         ("-c", "import equivit_plugin; import timm; "
                "timm.create_model('equivit_ri_tiny_patch16_224')")),
    Case("create_vit", "create vit_tiny_patch16_224",
         ("-c", "import timm; timm.create_model('vit_tiny_patch16_224')")),
    Case("import_networks", "import equivit_plugin.networks (MONAI door)",
         ("-c", "import equivit_plugin.networks")),
    Case("import_tiatoolbox_door", "import equivit_plugin.tiatoolbox (TIAToolbox door)",
         ("-c", "import equivit_plugin.tiatoolbox")),
    Case("equivit_help", "equivit --help (console script)", ("--help",), quick=True,
         script="equivit"),
    Case("cli_module_help", "python -m equivit_plugin.cli --help",
         ("-m", "equivit_plugin.cli", "--help")),
)


# --------------------------------------------------------------------------- running


@dataclass
class Profile:
    """What ``-X importtime`` says about one run."""

    modules: list[str]
    heavy: list[str]
    import_total_s: float
    top: list[dict[str, Any]]


def child_env(profile: bool) -> dict[str, str]:
    """The parent's environment, with the repository importable and import profiling on/off."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPROFILEIMPORTTIME"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if profile:
        env["PYTHONPROFILEIMPORTTIME"] = "1"
    return env


def run_once(command: list[str], profile: bool) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of one run (interpreter start to exit), and its completed process."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=child_env(profile), capture_output=True,
                          text=True, timeout=CASE_TIMEOUT_S, check=False)
    return time.perf_counter() - start, done


def parse_importtime(stderr: str) -> Profile:
    """Modules, heavy modules, total and top cumulative imports from ``-X importtime``."""
    entries = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        _, self_us, cumulative_us, name = (part.strip() for part in
                                           line.replace("import time:", "|", 1).split("|"))
        entries.append((name, int(self_us) / 1e6, int(cumulative_us) / 1e6))
    modules = [name for name, _, _ in entries]
    tops = {name.split(".")[0] for name in modules}
    top = sorted(entries, key=lambda entry: entry[2], reverse=True)[:TOP_IMPORTS]
    return Profile(
        modules=modules,
        heavy=[name for name in HEAVY if name in tops],
        import_total_s=sum(self_s for _, self_s, _ in entries),
        top=[{"module": name, "cumulative_s": cum, "self_s": own} for name, own, cum in top],
    )


def measure(cases: Sequence[Case], repeats: int, python: str) -> dict[str, dict[str, Any]]:
    """Profile run (also the warm-up) of every case, then ``repeats`` round-robin rounds."""
    results: dict[str, dict[str, Any]] = {}
    commands = {case.id: case.command(python) for case in cases}
    for case in cases:
        command = commands[case.id]
        entry: dict[str, Any] = {"label": case.label, "command": command, "wall_s": [],
                                 "error": None}
        results[case.id] = entry
        if command is None:
            entry["error"] = f"no console script {case.script!r} next to {python}"
            log(f"{case.label}: {entry['error']}")
            continue
        _, done = run_once(command, profile=True)
        if done.returncode != 0:
            entry["error"] = f"exit {done.returncode}: {done.stderr.strip()[-500:]}"
            log(f"{case.label}: {entry['error']}")
            continue
        profile = parse_importtime(done.stderr)
        entry.update(heavy_modules=profile.heavy, import_total_s=profile.import_total_s,
                     top_imports=profile.top, n_modules=len(profile.modules))
    runnable = [case for case in cases if results[case.id]["error"] is None]
    for round_ in range(repeats):
        shift = round_ % max(len(runnable), 1)
        for case in runnable[shift:] + runnable[:shift]:
            seconds, done = run_once(commands[case.id], profile=False)
            results[case.id]["wall_s"].append(seconds)
            if done.returncode != 0:
                results[case.id]["error"] = f"exit {done.returncode} in a timed run"
    for case_id, entry in results.items():
        if entry["wall_s"]:
            entry.update(median_s=statistics.median(entry["wall_s"]),
                         min_s=min(entry["wall_s"]), max_s=max(entry["wall_s"]))
        log(f"{case_id}: " + (f"median {entry['median_s']:.3f} s" if "median_s" in entry
                              else entry["error"] or "not timed"))
    return results


# --------------------------------------------------------------------------- report


def median(results: dict[str, dict[str, Any]], case_id: str) -> float | None:
    return results.get(case_id, {}).get("median_s")


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each case's median against its baseline (where both were timed)."""
    pairs = {"import_equivit / import_timm": ("import_equivit", "import_timm"),
             "create_equivit_ri / create_vit": ("create_equivit_ri", "create_vit"),
             "import_networks / import_timm": ("import_networks", "import_timm"),
             "import_tiatoolbox_door / import_timm": ("import_tiatoolbox_door", "import_timm")}
    out = {}
    for name, (case, base) in pairs.items():
        value, reference = median(results, case), median(results, base)
        if value is not None and reference:
            out[name] = value / reference
    return out


def targets(results: dict[str, dict[str, Any]],
            ratio: dict[str, float]) -> list[dict[str, Any]]:
    """The three targets, each with its measured value (``None`` when not measured)."""
    help_s = median(results, "equivit_help")
    heavy = results.get("import_equivit", {}).get("heavy_modules")
    doors = None if heavy is None else sorted({"monai", "tiatoolbox"} & set(heavy))
    rows = [
        {"target": "equivit --help", "limit": f"< {HELP_MAX_S:g} s",
         "measured": None if help_s is None else f"{help_s:.3f} s",
         "pass": None if help_s is None else help_s < HELP_MAX_S},
        {"target": "import equivit_plugin / import timm", "limit": f"<= {IMPORT_RATIO_MAX}x",
         "measured": (f"{ratio['import_equivit / import_timm']:.3f}x"
                      if "import_equivit / import_timm" in ratio else None),
         "pass": (ratio["import_equivit / import_timm"] <= IMPORT_RATIO_MAX
                  if "import_equivit / import_timm" in ratio else None)},
        {"target": "import equivit_plugin imports monai / tiatoolbox", "limit": "neither",
         "measured": None if doors is None else (", ".join(doors) or "neither"),
         "pass": None if doors is None else not doors},
    ]
    return rows


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def verdict(passed: bool | None) -> str:
    return "not measured" if passed is None else "PASS" if passed else "MISS"


def render(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    lines = [f"## Start-up time ({m['cpu_model']}, {m['cpu_cores']} cores)", "",
             f"Python {m['python']}, {s['python_executable']}; fresh interpreter per run, wall "
             f"time seen by the parent, median of {s['repeats']} round-robin run(s) after one "
             f"profiled warm-up run (`-X importtime`)."
             + (" Quick run: reduced set." if s["quick"] else ""), ""]
    rows = []
    for entry in report["cases"].values():
        if entry.get("median_s") is None:
            rows.append([entry["label"], "-", "-", "-", entry["error"] or "not timed"])
            continue
        top = ", ".join(f"{t['module']} {t['cumulative_s']:.2f}" for t in entry["top_imports"][:3])
        rows.append([entry["label"], f"{entry['median_s']:.3f}",
                     f"{entry['min_s']:.3f}-{entry['max_s']:.3f}",
                     ", ".join(entry["heavy_modules"]) or "none", top])
    lines += table(["case", "median s", "range s", "heavy modules imported",
                    "top cumulative imports (s, -X importtime)"], rows)
    if report["ratios"]:
        lines += ["", "Ratios of medians: " + "; ".join(
            f"{name} {value:.3f}x" for name, value in report["ratios"].items()) + "."]
    lines += ["", "### Targets", ""]
    lines += table(["target", "limit", "measured", "result"],
                   [[t["target"], t["limit"], t["measured"] or "-", verdict(t["pass"])]
                    for t in report["targets"]])
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--quick", action="store_true",
                        help="reduced set: import timm, import equivit_plugin, equivit --help")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "startup.json",
                        help="JSON path; the table goes next to it as .md")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter to measure (default: this one)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def write(path: Path, text: str) -> None:
    """Write through a temporary file and a rename (never a truncated result)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    cases = [case for case in CASES if case.quick or not args.quick]
    results = measure(cases, args.repeats, args.python)
    ratio = ratios(results)
    report = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpu_model": cpu_model(), "cpu_cores": os.cpu_count()},
        "settings": {"repeats": args.repeats, "quick": args.quick,
                     "python_executable": args.python, "cases": [c.id for c in cases]},
        "cases": results,
        "ratios": ratio,
        "targets": targets(results, ratio),
        "wall_s": time.perf_counter() - start,
    }
    markdown = render(report)
    print(markdown)
    write(args.out, json.dumps(report, indent=2) + "\n")
    write(args.out.with_suffix(".md"), markdown)
    log(f"wrote {args.out} and {args.out.with_suffix('.md').name}")
    return 1 if any(entry["error"] for entry in results.values()
                    if entry["command"] is not None) else 0


if __name__ == "__main__":
    sys.exit(main())
