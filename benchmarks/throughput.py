"""Throughput of Equi-ViT next to timm ViT, ConvViT and the published per-patch embedding.

Measured side by side in one run, for every size in ``--sizes``:

* whole models: inference (``eval``, ``torch.inference_mode``) and one training step (forward,
  cross-entropy, backward, AdamW step), in images/s, for timm ViT (``vit_*``), Equi-ViT
  (``equivit_*``: GMR stem run as one composed 16x16 convolution), the off-grid-robust
  invariant variants (``equivit_rid_*``: distance attention bias; ``equivit_ric_*``: conv stem,
  distance bias, one block fewer), ConvViT (``convvit_*``) and
  "Equi-ViT, per-patch": the same Equi-ViT (same weights) whose ``patch_embed.proj`` is wrapped
  in :class:`~equivit_plugin.layers.reference.PerPatchProjection`, the published formulation
  (every 16x16 patch run through the 6x6 then 11x11 valid convolutions).
* the patch embedding alone: GMR composed vs GMR per-patch vs ``timm.layers.PatchEmbed``,
  inference and training (forward + backward).
* on every run, a correctness check: each model's output on ``--device`` (with the chosen
  autocast, memory format and compilation) against CPU float32 outputs of the same weights on
  the same images (max abs diff and cosine).

Timing: one first call per model (``torch.compile`` happens there: reported as compile time,
never timed), ``--warmup`` calls, then ``--repeats`` rounds in which the models take turns
(round-robin, starting point rotated every round) so drift hits all of them alike; each turn
times ``--iters`` calls between device synchronisations. The median over rounds is reported,
with ratios against timm ViT of the same size (embeddings: against the per-patch form).

Results go to stdout (markdown) and to ``--out`` as ``throughput_<device>.json`` and
``throughput_<device>.md`` (``_quick`` appended for ``--quick`` runs), written atomically.

Commands, from the repository root::

    # CPU, fp32 eager, batch 32, all cores (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/throughput.py
    # CPU smoke runs (the second exercises the GPU code path: compile, channels-last, autocast)
    .venv/bin/python benchmarks/throughput.py --quick
    .venv/bin/python benchmarks/throughput.py --quick --compile --channels-last --amp bf16
    # GPU, full comparison: bf16 autocast, channels-last, torch.compile, batch 128
    # (tiny and small; sized to finish within 8 minutes on one H100)
    .venv/bin/python benchmarks/throughput.py --device cuda
    # GPU, base too / fp32 eager
    .venv/bin/python benchmarks/throughput.py --device cuda --sizes tiny small base
    .venv/bin/python benchmarks/throughput.py --device cuda --amp none --no-compile

``--compile`` compiles the 12 transformer blocks of each model (``--compile-scope blocks``, the
default: the blocks of all models of one size share one compiled graph, so the first model of
a size carries the compile time; patch embedding, position embedding and head run eager) and
each embedding of the embedding-alone benchmark whole; ``--compile-scope model`` compiles every
whole network instead (one cold compile per model and mode: on a GPU this may take longer than
the 8-minute budget). With ``--amp none`` on CUDA, TF32 is switched off (true float32).
On a CPU without native bf16 (AVX2 only), ``--amp bf16`` runs eager convolutions through a slow
fallback: such numbers exercise the code path, they say nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch._dynamo
import torch._dynamo.utils
import torch.nn.functional as F
from per_patch import PerPatchProjection  # noqa: E402  (beside this script)
from timm.layers import PatchEmbed
from torch import nn

import equivit_plugin  # noqa: F401  (registers the equivit_* / convvit_* models in timm)
from equivit_plugin.layers import GMRPatchEmbed

Runner = Callable[[], None]

SIZES = ("tiny", "small", "base")
EMBED_DIMS = {"tiny": 192, "small": 384, "base": 768}
PATCH = 16
NUM_CLASSES = 1000

MODELS = {
    "vit": "timm ViT",
    "equivit": "Equi-ViT",
    "equivit_rid": "Equi-ViT-RID (distance attention bias)",
    "equivit_ric": "Equi-ViT-RIC (conv stem, distance bias, 1 block fewer)",
    "convvit": "ConvViT",
    "perpatch": "Equi-ViT, per-patch embed",
}
EMBEDS = {
    "composed": "GMR composed conv",
    "perpatch": "GMR per-patch (published)",
    "timm": "timm PatchEmbed",
}

TARGET_INFER = 0.95  # Equi-ViT inference >= 0.95x timm ViT
TARGET_TRAIN = 0.90  # Equi-ViT training step >= 0.90x timm ViT
TARGET_ROBUST = 0.90  # the off-grid-robust invariant variants >= 0.90x timm ViT
TARGET_EMBED = 5.0  # composed embedding >= 5x the per-patch formulation
COSINE_MIN = 0.999  # reduced precision (bf16/fp16) against CPU float32
FP32_MAX_ABS = 1e-3  # float32 against CPU float32
CHECK_ROWS = 8  # images of the benchmark batch compared against the CPU reference

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULTS = {  # device type -> defaults of the options left unset
    "cpu": {"batch_size": 32, "warmup": 1, "repeats": 5, "iters": 1,
            "amp": "none", "channels_last": False, "compile": False},
    "cuda": {"batch_size": 128, "warmup": 3, "repeats": 10, "iters": 10,
             "amp": "bf16", "channels_last": True, "compile": True},
}
QUICK = {"batch_size": 2, "warmup": 1, "repeats": 2, "iters": 1}

_START = time.perf_counter()


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Resolved options of one run."""

    device: str
    batch_size: int
    threads: int
    sizes: tuple[str, ...]
    repeats: int
    warmup: int
    iters: int
    img_size: int
    out: str
    quick: bool
    amp: str
    channels_last: bool
    compile: bool
    compile_scope: str

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.amp]

    @property
    def suffix(self) -> str:
        dev = self.torch_device
        name = dev.type if dev.index is None else f"{dev.type}{dev.index}"
        return f"{name}_quick" if self.quick else name


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, help="images per call (cpu 32, cuda 128)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"],
                        help="model sizes: tiny small base (space or comma separated)")
    parser.add_argument("--repeats", type=int, help="timed rounds, median reported")
    parser.add_argument("--warmup", type=int, help="untimed calls per model after the first")
    parser.add_argument("--iters", type=int, help="calls per timed turn (cpu 1, cuda 10)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                        help="output folder (default benchmarks/results)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batch 2, 1 warm-up, 2 repeats")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES),
                        help="torch.autocast dtype (cpu: none, cuda: bf16)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                        help="channels-last inputs and weights (cuda default: on)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="torch.compile (cuda default: on); compile time reported apart")
    parser.add_argument("--compile-scope", choices=("blocks", "model"), default="blocks",
                        help="compile the transformer blocks (default) or each whole model")
    return parser.parse_args(argv)


def resolve(ns: argparse.Namespace) -> Settings:
    """Fill the options left unset from the device's defaults (and ``--quick``)."""
    device = torch.device(ns.device)
    if device.type not in DEFAULTS:
        raise SystemExit(f"--device must be cpu, cuda or cuda:N, got {ns.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    defaults = {**DEFAULTS[device.type], **(QUICK if ns.quick else {})}

    def pick(name: str) -> Any:
        value = getattr(ns, name)
        return defaults[name] if value is None else value

    sizes = tuple(s for item in ns.sizes for s in item.split(",") if s)
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        raise SystemExit(f"--sizes must be among {SIZES}, got {ns.sizes}")
    settings = Settings(
        device=str(device), batch_size=pick("batch_size"), threads=ns.threads or cpu_count(),
        sizes=sizes, repeats=pick("repeats"), warmup=pick("warmup"), iters=pick("iters"),
        img_size=ns.img_size, out=ns.out, quick=ns.quick, amp=pick("amp"),
        channels_last=pick("channels_last"), compile=pick("compile"),
        compile_scope=ns.compile_scope,
    )
    if min(settings.batch_size, settings.repeats, settings.iters, settings.threads) < 1:
        raise SystemExit("--batch-size, --repeats, --iters and --threads must be >= 1")
    if settings.warmup < 0 or settings.img_size % PATCH:
        raise SystemExit(f"--warmup must be >= 0 and --img-size a multiple of {PATCH}")
    return settings


def configure_torch(settings: Settings) -> dict[str, Any]:
    """Global torch settings of the run; returns what was set (for the report)."""
    torch.set_num_threads(settings.threads)
    state: dict[str, Any] = {"num_threads": torch.get_num_threads()}
    if settings.torch_device.type == "cuda":
        if settings.torch_device.index is not None:
            torch.cuda.set_device(settings.torch_device)
        torch.backends.cudnn.benchmark = True
        # fp32 means fp32: no TF32, so the 1e-3 check against CPU float32 is meaningful.
        tf32 = settings.amp != "none"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        state.update(cudnn_benchmark=True, tf32=tf32)
    if settings.compile:
        # Every compiled module shares the code object of nn.Module._call_impl: give the
        # per-size, per-mode graphs room before dynamo falls back to eager.
        config = torch._dynamo.config
        for name, value in (("recompile_limit", 256), ("cache_size_limit", 256),
                            ("accumulated_recompile_limit", 4096),
                            ("accumulated_cache_size_limit", 4096)):
            if hasattr(config, name):
                setattr(config, name, value)
    return state


def compile_stats() -> dict[str, int]:
    """Dynamo's counters: graphs compiled, frames traced (shared graphs show up here)."""
    stats = torch._dynamo.utils.counters["stats"]
    return {name: int(stats[name]) for name in ("unique_graphs", "calls_captured")}


# --------------------------------------------------------------------------- machine info


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(settings: Settings) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "equivit_plugin": getattr(equivit_plugin, "__version__", "?"),
        "cpu_model": cpu_model(),
        "cpu_cores": cpu_count(),
        "threads": torch.get_num_threads(),
        "device": settings.device,
        "device_name": cpu_model(),
    }
    if settings.torch_device.type == "cuda":
        props = torch.cuda.get_device_properties(settings.torch_device)
        info.update(
            device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- modules


def build_model(kind: str, size: str, img_size: int) -> nn.Module:
    """A freshly initialised model on the CPU; ``equivit`` and ``perpatch`` share weights."""
    torch.manual_seed(0)
    family = "equivit" if kind == "perpatch" else kind
    model = timm.create_model(f"{family}_{size}_patch{PATCH}_224", img_size=img_size,
                              num_classes=NUM_CLASSES)
    if kind == "perpatch":
        # timm's PatchEmbed.forward calls proj, then flattens to (B, N, D): only proj changes.
        model.patch_embed.proj = PerPatchProjection(model.patch_embed.proj)
    return model


def build_embed(kind: str, size: str, img_size: int) -> nn.Module:
    """A patch embedding alone; ``composed`` and ``perpatch`` share weights."""
    torch.manual_seed(0)
    dim = EMBED_DIMS[size]
    if kind == "timm":
        return PatchEmbed(img_size=img_size, patch_size=PATCH, in_chans=3, embed_dim=dim)
    embed = GMRPatchEmbed(img_size=img_size, patch_size=PATCH, embed_dim=dim)
    if kind == "perpatch":
        embed.proj = PerPatchProjection(embed.proj)
    return embed


def prepare(module: nn.Module, settings: Settings) -> nn.Module:
    """Move to the device, set the memory format and compile (in place, same state_dict)."""
    module = module.to(settings.torch_device)
    if settings.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if settings.compile:
        blocks = getattr(module, "blocks", None)
        if settings.compile_scope == "blocks" and blocks is not None:
            for block in blocks:
                block.compile()
        else:
            module.compile()
    return module


def autocast(settings: Settings) -> contextlib.AbstractContextManager:
    if settings.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(settings.torch_device.type, dtype=settings.amp_dtype)


def make_batch(settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    shape = (settings.batch_size, 3, settings.img_size, settings.img_size)
    images = torch.randn(shape, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (settings.batch_size,), generator=gen)
    images = images.to(settings.torch_device)
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(settings.torch_device)


# --------------------------------------------------------------------------- runners


def inference_runner(model: nn.Module, images: torch.Tensor, settings: Settings) -> Runner:
    model.eval()

    def run() -> None:
        with torch.inference_mode(), autocast(settings):
            model(images)

    return run


def train_runner(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 settings: Settings) -> Runner:
    """One training step: forward, cross-entropy, backward, AdamW step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    scaler = (torch.amp.GradScaler(settings.torch_device.type)
              if settings.amp == "fp16" else None)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(settings):
            loss = F.cross_entropy(model(images), labels)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return run


def embed_train_runner(embed: nn.Module, images: torch.Tensor, settings: Settings) -> Runner:
    """Forward and backward of an embedding alone (gradients to its parameters)."""
    embed.train()

    def run() -> None:
        embed.zero_grad(set_to_none=True)
        with autocast(settings):
            tokens = embed(images)
        tokens.float().square().mean().backward()

    return run


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Images/s of one runner: one sample per round."""

    first_call_s: float
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Half the min-max range, relative to the median."""
        return (max(self.samples) - min(self.samples)) / 2 / self.median

    def to_json(self) -> dict[str, Any]:
        return {"median_img_s": self.median, "spread": self.spread, **asdict(self)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Runner, calls: int, device: torch.device) -> float:
    """Seconds taken by ``calls`` calls, between device synchronisations."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        run()
    synchronize(device)
    return time.perf_counter() - start


def round_robin(runners: dict[str, Runner], settings: Settings, what: str) -> dict[str, Timing]:
    """First call (compilation) and warm-up of each runner, then interleaved timed rounds."""
    device = settings.torch_device
    first: dict[str, float] = {}
    for name, run in runners.items():
        first[name] = timed(run, 1, device)
        log(f"{what}: {name} first call {first[name]:.2f}s")
    for _ in range(settings.warmup):
        for run in runners.values():
            run()
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    images = settings.batch_size * settings.iters
    for round_ in range(settings.repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(images / timed(runners[name], settings.iters, device))
    timings = {name: Timing(first[name], samples[name]) for name in names}
    log(f"{what}: " + ", ".join(f"{n} {t.median:.1f} img/s" for n, t in timings.items()))
    return timings


# --------------------------------------------------------------------------- correctness


def reference_outputs(kind: str, size: str, model: nn.Module, images: torch.Tensor,
                      settings: Settings) -> torch.Tensor:
    """CPU float32 outputs of a fresh model loaded with ``model``'s current weights."""
    reference = build_model(kind, size, settings.img_size)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    reference.load_state_dict(state)
    reference.eval()
    with torch.inference_mode():
        return reference(images.float().cpu().contiguous())


def compare(output: torch.Tensor, reference: torch.Tensor, amp: str) -> dict[str, Any]:
    output, reference = output.double().flatten(), reference.double().flatten()
    max_abs = (output - reference).abs().max().item()
    cosine = F.cosine_similarity(output, reference, dim=0).item()
    ok = cosine >= COSINE_MIN if amp != "none" else max_abs <= FP32_MAX_ABS
    ok = ok and bool(torch.isfinite(output).all())
    return {"max_abs_diff": max_abs, "cosine": cosine, "ok": ok}


def check_models(models: dict[str, nn.Module], size: str, images: torch.Tensor,
                 settings: Settings) -> dict[str, Any]:
    """Device outputs (full batch, as timed) against CPU float32, on the first images."""
    rows = min(CHECK_ROWS, images.shape[0])
    results: dict[str, Any] = {}
    references: dict[str, torch.Tensor] = {}
    for kind, model in models.items():
        model.eval()
        with torch.inference_mode(), autocast(settings):
            output = model(images)[:rows].float().cpu()
        references[kind] = reference_outputs(kind, size, model, images[:rows], settings)
        results[kind] = compare(output, references[kind], settings.amp)
    # Same weights, two formulations of the embedding: both CPU float32 outputs must agree.
    gap = (references["perpatch"] - references["equivit"]).abs().max().item()
    results["perpatch_vs_composed_cpu_fp32_max_abs"] = gap
    return results


# --------------------------------------------------------------------------- benchmark


def ratios(timings: dict[str, Timing], base: str) -> dict[str, float]:
    return {name: t.median / timings[base].median for name, t in timings.items()}


def bench_models(size: str, settings: Settings) -> dict[str, Any]:
    images, labels = make_batch(settings)
    models = {kind: prepare(build_model(kind, size, settings.img_size), settings)
              for kind in MODELS}
    infer = round_robin({k: inference_runner(m, images, settings) for k, m in models.items()},
                        settings, f"{size} inference")
    check = check_models(models, size, images, settings)
    train = round_robin(
        {k: train_runner(m, images, labels, settings) for k, m in models.items()},
        settings, f"{size} train step",
    )
    del models
    release_memory(settings)
    return {
        "models": {k: {"label": MODELS[k], "inference": infer[k].to_json(),
                       "train": train[k].to_json()} for k in MODELS},
        "ratio_vs_vit": {"inference": ratios(infer, "vit"), "train": ratios(train, "vit")},
        "check": check,
    }


def bench_embeds(size: str, settings: Settings) -> dict[str, Any]:
    images, _ = make_batch(settings)
    embeds = {kind: prepare(build_embed(kind, size, settings.img_size), settings)
              for kind in EMBEDS}
    infer = round_robin({k: inference_runner(m, images, settings) for k, m in embeds.items()},
                        settings, f"{size} embedding inference")
    train = round_robin({k: embed_train_runner(m, images, settings) for k, m in embeds.items()},
                        settings, f"{size} embedding train")
    del embeds
    release_memory(settings)
    return {
        "embeds": {k: {"label": EMBEDS[k], "inference": infer[k].to_json(),
                       "train": train[k].to_json()} for k in EMBEDS},
        "ratio_vs_perpatch": {"inference": ratios(infer, "perpatch"),
                              "train": ratios(train, "perpatch")},
        "ratio_vs_timm": {"inference": ratios(infer, "timm"), "train": ratios(train, "timm")},
    }


def release_memory(settings: Settings) -> None:
    if settings.torch_device.type == "cuda":
        torch.cuda.empty_cache()


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The PASS/MISS lines: Equi-ViT against timm ViT, composed against per-patch."""
    rows = []
    for size, res in results.items():
        model_ratio = res["ratio_vs_vit"]
        embed_ratio = res["ratio_vs_perpatch"]
        for name, value, target in (
            ("Equi-ViT inference / timm ViT", model_ratio["inference"]["equivit"], TARGET_INFER),
            ("Equi-ViT train step / timm ViT", model_ratio["train"]["equivit"], TARGET_TRAIN),
            *((f"{MODELS[kind].split(' (')[0]} {mode} / timm ViT", model_ratio[mode][kind],
               TARGET_ROBUST) for kind in ("equivit_rid", "equivit_ric")
              for mode in ("inference", "train")),
            ("GMR embedding inference / per-patch", embed_ratio["inference"]["composed"],
             TARGET_EMBED),
            ("GMR embedding train / per-patch", embed_ratio["train"]["composed"], TARGET_EMBED),
        ):
            rows.append({"size": size, "check": name, "value": value, "target": target,
                         "pass": value >= target})
    return rows


# --------------------------------------------------------------------------- report


def fmt_rate(timing: dict[str, Any]) -> str:
    rate = timing["median_img_s"]
    digits = f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 1 else f"{rate:.3g}"
    return f"{digits} ±{100 * timing['spread']:.0f}%"


def first_calls(entry: dict[str, Any]) -> str:
    return f"{entry['inference']['first_call_s']:.1f} / {entry['train']['first_call_s']:.1f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    mode = ", ".join([
        "fp32" if s["amp"] == "none" else f"{s['amp']} autocast",
        "channels-last" if s["channels_last"] else "contiguous",
        f"torch.compile ({s['compile_scope']})" if s["compile"] else "eager",
    ])
    first = ("compile" if s["compile"] else "first call") + " s (inference / train)"
    lines = [
        f"## Equi-ViT throughput: {m['device']} ({m['device_name']})",
        "",
        f"torch {m['torch']}, timm {m['timm']}, CPU {m['cpu_model']}, {m['threads']} threads; "
        f"batch {s['batch_size']}, {s['img_size']}px, {mode}. Images/s: median of "
        f"{s['repeats']} round-robin rounds of {s['iters']} call(s) after {s['warmup']} "
        f"warm-up call(s); ± is half the min-max range."
        + (" Quick smoke run: numbers are not meaningful." if s["quick"] else ""),
        "",
        "### Whole models",
        "",
    ]
    rows = []
    for size, res in report["results"].items():
        for kind, entry in res["models"].items():
            r = res["ratio_vs_vit"]
            rows.append([size, entry["label"], fmt_rate(entry["inference"]),
                         f"{r['inference'][kind]:.3f}x", fmt_rate(entry["train"]),
                         f"{r['train'][kind]:.3f}x", first_calls(entry)])
    lines += table(["size", "model", "inference img/s", "vs ViT", "train step img/s", "vs ViT",
                    first], rows)
    lines += ["", "### Patch embedding alone (train = forward + backward)", ""]
    rows = []
    for size, res in report["results"].items():
        for kind, entry in res["embeds"].items():
            p, t = res["ratio_vs_perpatch"], res["ratio_vs_timm"]
            rows.append([size, entry["label"], fmt_rate(entry["inference"]),
                         f"{p['inference'][kind]:.2f}x", f"{t['inference'][kind]:.2f}x",
                         fmt_rate(entry["train"]), f"{p['train'][kind]:.2f}x",
                         f"{t['train'][kind]:.2f}x"])
    lines += table(["size", "embedding", "inference img/s", "vs per-patch", "vs timm",
                    "train img/s", "vs per-patch", "vs timm"], rows)
    lines += ["", "### Targets", ""]
    lines += table(["size", "check", "measured", "target", "result"], [
        [t["size"], t["check"], f"{t['value']:.3f}x", f">= {t['target']}x",
         "PASS" if t["pass"] else "MISS"] for t in report["targets"]
    ])
    limit = f"cosine >= {COSINE_MIN}" if s["amp"] != "none" else f"max abs <= {FP32_MAX_ABS:g}"
    lines += ["", f"### Correctness: {m['device']} outputs vs CPU float32, same weights, "
              f"first {CHECK_ROWS} images ({limit})", ""]
    rows = []
    for size, res in report["results"].items():
        for kind, label in MODELS.items():
            c = res["check"][kind]
            rows.append([size, label, f"{c['max_abs_diff']:.2e}", f"{c['cosine']:.6f}",
                         "ok" if c["ok"] else "FLAG"])
    lines += table(["size", "model", "max abs diff", "cosine", "result"], rows)
    gaps = ", ".join(f"{size} {res['check']['perpatch_vs_composed_cpu_fp32_max_abs']:.1e}"
                     for size, res in report["results"].items())
    lines += ["", f"Per-patch vs composed embedding, whole model, CPU float32 max abs diff: "
              f"{gaps}. Wall time {report['wall_s']:.0f}s.", ""]
    if report["compile_stats"]:
        lines[-1:-1] = [f"Dynamo: {report['compile_stats']['unique_graphs']} graphs compiled."]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def publish(out_dir: Path, stem: str, report: dict[str, Any], markdown: str) -> None:
    """Print the markdown table; write ``<stem>.json`` and ``<stem>.md`` atomically."""
    print(markdown)
    write_atomic(out_dir / f"{stem}.json", json.dumps(report, indent=2, default=str) + "\n")
    write_atomic(out_dir / f"{stem}.md", markdown)


def main(argv: Sequence[str] | None = None) -> int:
    settings = resolve(parse_args(argv))
    torch_state = configure_torch(settings)
    log(f"settings: {settings}")
    results: dict[str, Any] = {}
    for size in settings.sizes:
        results[size] = {**bench_models(size, settings), **bench_embeds(size, settings)}
    report = {
        "machine": machine_info(settings),
        "settings": {**asdict(settings), "torch": torch_state},
        "results": results,
        "targets": targets(results),
        "compile_stats": compile_stats() if settings.compile else None,
        "wall_s": time.perf_counter() - _START,
    }
    out = Path(settings.out)
    publish(out, f"throughput_{settings.suffix}", report, render_markdown(report))
    log(f"wrote {out / f'throughput_{settings.suffix}'}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
