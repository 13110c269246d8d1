"""Every GPU check of the project in one run: one table, one JSON, exit code 0 when all pass.

Sized for 8 minutes on one H100/H200 (``--budget``, default 420 s for the checks). Checks, in
the order they run (the number is the one of the issue that lists them):

* ``data``: the slide and tiles of ``$EQUIVIT_DATA`` (default ``../shared/data``), or, where
  absent, a 0.5 um/px pyramidal TIFF written from TIAToolbox's packaged H&E image
  (``tiatoolbox.data.stain_norm_target()``) and tiles cut from it (CPU);
* ``cpu_d4``: D4 invariance of Equi-ViT-RI on the CPU, a sanity check of the machinery (CPU);
* ``parity`` (1): CUDA vs CPU float32 (TF32 off) logits and pooled features of
  ``equivit_ri``/``equivit``/``convvit``/``vit`` (same weights, real tiles), and D4 invariance
  of ``equivit_ri`` on CUDA;
* ``autocast`` (3): bf16 and fp16 autocast against float32 (cosine), for the models and for
  the TIAToolbox adapters' ``autocast="bf16"`` option;
* ``engines`` (2): TIAToolbox's ``PatchPredictor`` and ``DeepFeatureExtractor`` with the
  adapters on CUDA (as TIAToolbox runs them: it compiles the model itself on V100/A100/H100/H200)
  in patch mode (uint8 NHWC tiles) and WSI mode (the slide), against a CPU float32 direct
  forward pass on the same tiles;
* ``pipeline`` (6): ``extract_features`` (slide -> HDF5) on CUDA in bf16 against the model-only
  forward pass on the same tiles (``benchmarks/slide_throughput.py``'s runners), on a cohort of
  copies of the slide; the features against a CPU float32 forward pass;
* ``slides`` (17): the realistic 40x slide of ``benchmarks/slide_read.py`` (written there):
  the loader alone with the default workers, then ``extract_features`` (bf16) against the lesser
  of the encoder's model-only rate and that loader ceiling, for ``equivit_disc`` and the UNI
  architecture (ViT-L/16, random weights); a short ``distill`` on CUDA (AMP, one process) and
  the device-made views (``benchmarks/distill_views.py``) against the student's training step;
* ``bundle`` (7): ``torchrun --nproc_per_node 1`` of the MONAI bundle's
  ``train.json + quick_train.json + multi_gpu_train.json`` (NCCL), 2 short epochs into a
  temporary folder: backend, exit code, a loadable checkpoint;
* ``compile`` (4): ``torch.compile`` (inductor) of a whole Equi-ViT-RI: graph breaks, parity
  with eager, speed-up (bf16 autocast, channels-last, batch 128);
* ``throughput`` (5): inference images/s of ``equivit_ri``/``equivit``/``convvit`` against
  timm's ViT of the same size, eager and compiled, all side by side in one round-robin
  (``benchmarks/throughput.py``'s builders, runners and timing).

Each check runs under a time cap (SIGALRM) and inside a try block: a failure or a timeout is a
row of the table and the next check runs. A check that needs CUDA on a machine without it is
one row, ``skipped: CUDA not available``; a check that would start with less than its minimum
time left is ``skipped: time budget``. Exit code 1 when a check that ran failed (or raised),
else 0. ``info`` rows report numbers without a target (the pipeline ratio on a GPU).

Commands, from the repository root::

    python benchmarks/gpu_check.py                  # all checks -> benchmarks/results/gpu_check.*
    python benchmarks/gpu_check.py --quick          # tiny models, few repeats (any machine)
    python benchmarks/gpu_check.py --checks parity engines --out /tmp/gpu_check.json
    bash benchmarks/gpu_check.sh                    # on the GPU machine: wheels, then this
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch._dynamo
import torch._dynamo.utils
import torch.nn.functional as F
from torch import nn

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import throughput as tp  # noqa: E402  (reused: model builders, runners, timing, comparisons)

import equivit_plugin  # noqa: E402
import equivit_plugin.models  # noqa: E402, F401  (registers the models in timm)
from equivit_plugin.equivariance import feature_invariance  # noqa: E402
from equivit_plugin.utils.demo_data import demo_he_image  # noqa: E402

PASS, FAIL, INFO, SKIP, ERROR = "pass", "fail", "info", "skipped", "error"
NO_CUDA = "skipped: CUDA not available"
NO_TIME = "skipped: time budget"
KINDS = ("equivit_ri", "equivit", "convvit", "vit")  # timm names: f"{kind}_{size}_patch16_224"
PATCH = 224
MPP = 0.5
D4_MAX_ABS = 1e-4  # logits/features under the 8 rotations/flips (as the CPU tests)
PROB_MAX_ABS = 1e-4  # engine probabilities on CUDA vs CPU float32
SPEEDUP_MIN = 1.0  # torch.compile must not be slower than eager
PIPELINE_CPU_TARGET = 0.90  # pipeline / model-only on the CPU (no target on a GPU: reported)
SLIDE_NAME = "CMU-1-Small-Region.svs"
TRAIN_FOLDER = "lc25000_lung_train"
BUNDLE = ROOT / "monai_bundle"
BUNDLE_CONFIGS = ["configs/train.json", "configs/quick_train.json",
                  "configs/multi_gpu_train.json"]
DEFAULT_BUDGET_S = 420.0


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the table."""

    check: str
    result: str
    target: str
    status: str
    seconds: float


@dataclass
class CheckResult:
    """What one check reported: its status, its rows and machine-readable details."""

    id: str
    number: str
    title: str
    status: str
    seconds: float
    message: str = ""
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class Recorder:
    """Collects the rows of one check, each stamped with the seconds since the previous one."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.details: dict[str, Any] = {}
        self._last = time.perf_counter()

    def add(self, check: str, result: str, target: str, status: str) -> None:
        now = time.perf_counter()
        self.rows.append(Row(check, result, target, status, now - self._last))
        self._last = now
        tp.log(f"  {status.upper():5s} {check}: {result}")

    def judge(self, check: str, result: str, target: str, ok: bool) -> None:
        self.add(check, result, target, PASS if ok else FAIL)

    def info(self, check: str, result: str, target: str = "-") -> None:
        self.add(check, result, target, INFO)


def overall_status(rows: Sequence[Row]) -> str:
    """``fail`` if any row failed, else ``pass`` if any passed, else ``info``."""
    statuses = {row.status for row in rows}
    return FAIL if FAIL in statuses else PASS if PASS in statuses else INFO


# --------------------------------------------------------------------------- data


@dataclass
class DataPaths:
    """The inputs of the checks, from the shared data folder or written as fallbacks."""

    root: Path | None
    slide: Path
    slide_source: str
    tiles: np.ndarray  # (N, 224, 224, 3) uint8
    tiles_source: str
    train_dir: Path  # one sub-folder per class, for the bundle
    train_source: str


def default_data_root() -> Path:
    return Path(os.environ.get("EQUIVIT_DATA", ROOT.parent / "shared" / "data"))


def write_fallback_slide(path: Path, image: np.ndarray, mpp: float = MPP) -> Path:
    """A tiled pyramidal TIFF with its resolution (levels halved down to <= 256 px), zlib-
    compressed: tifffile writes and reads it without imagecodecs."""
    from equivit_plugin.features.demo import write_pyramid_tiff

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_pyramid_tiff(image, mpp, path, smallest_level=256, compression="zlib")


def crops(image: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` non-overlapping 224x224 crops of ``image``, row by row."""
    height, width = image.shape[:2]
    boxes = [(y, x) for y in range(0, height - PATCH + 1, PATCH)
             for x in range(0, width - PATCH + 1, PATCH)][:count]
    return np.stack([image[y:y + PATCH, x:x + PATCH] for y, x in boxes])


def read_tiles(files: Sequence[Path]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((PATCH, PATCH)))
                     for f in files])


def write_fallback_classes(folder: Path, image: np.ndarray, classes: int = 3) -> Path:
    """A class-per-folder set of the crops of ``image`` (labels are arbitrary: the bundle
    check is about the mechanics of distributed training, not accuracy)."""
    from PIL import Image

    for i, tile in enumerate(crops(image, 16)):
        target = folder / f"class_{i % classes}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tile).save(target / f"tile_{i:02d}.png")
    return folder


def resolve_data(root: Path, workdir: Path, n_tiles: int) -> DataPaths:
    """The slide, ``n_tiles`` uint8 tiles and a training folder: from ``root`` where present,
    else written into ``workdir`` from TIAToolbox's packaged H&E image."""
    present = root.is_dir()
    slide = root / "slides" / SLIDE_NAME
    slide_source = "shared data"
    if not slide.is_file():
        slide = write_fallback_slide(workdir / "fallback" / "he_0.5mpp.tif", demo_he_image())
        slide_source = "fallback: TIAToolbox stain_norm_target() as a 0.5 um/px TIFF"
    files = sorted((root / TRAIN_FOLDER).glob("*/*.jpeg"))[:n_tiles]
    if files:
        tiles, tiles_source = read_tiles(files), f"{TRAIN_FOLDER} JPEG tiles"
    else:
        tiles = crops(demo_he_image(), n_tiles)
        tiles_source = "fallback: crops of TIAToolbox stain_norm_target()"
    train_dir = root / TRAIN_FOLDER
    train_source = "shared data"
    if not train_dir.is_dir():
        train_dir = write_fallback_classes(workdir / "fallback" / "train", demo_he_image())
        train_source = "fallback: 16 crops of stain_norm_target() in 3 folders"
    return DataPaths(root if present else None, slide, slide_source, tiles, tiles_source,
                     train_dir, train_source)


def nhwc(images: torch.Tensor) -> np.ndarray:
    """Normalised NCHW tensor -> the engines' float32 NHWC batch."""
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def read_patches(slide: Path, boxes: np.ndarray) -> torch.Tensor:
    """The engine's patches (``(x0, y0, x1, y1)`` boxes at 0.5 um/px) re-read with WSIReader,
    normalised, ``(N, 3, 224, 224)``."""
    from tiatoolbox.wsicore.wsireader import WSIReader

    reader = WSIReader.open(slide)
    tiles = [reader.read_bounds(tuple(int(v) for v in box), resolution=MPP, units="mpp",
                                pad_constant_values=255, coord_space="resolution")
             for box in boxes]
    return normalise(np.stack(tiles))


def normalise(tiles: np.ndarray) -> torch.Tensor:
    """uint8 NHWC tiles -> ImageNet-normalised float32 NCHW, as the models are trained
    (:func:`equivit_plugin.models.normalise_batch`)."""
    from equivit_plugin.models import normalise_batch

    return normalise_batch(torch.from_numpy(np.ascontiguousarray(tiles))).contiguous()


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """What every check may use: options, device, a scratch folder, the data (lazily)."""

    quick: bool
    device: torch.device
    workdir: Path
    data_root: Path
    cuda: bool
    _data: DataPaths | None = None

    @property
    def size(self) -> str:
        """Model size of the checks: ``small`` as issued, ``tiny`` in quick runs."""
        return "tiny" if self.quick else "small"

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    def data(self) -> DataPaths:
        if self._data is None:
            self._data = resolve_data(self.data_root, self.workdir, self.pick(8, 4))
        return self._data

    def throughput_settings(self) -> tp.Settings:
        """``throughput.py``'s CUDA defaults: bf16 autocast, channels-last, compile, batch 128
        (its ``--quick`` sizes in quick runs)."""
        argv = ["--device", str(self.device), "--sizes", self.size,
                "--out", str(self.workdir)] + (["--quick"] if self.quick else [])
        return tp.resolve(tp.parse_args(argv))


def mode_label(settings: tp.Settings) -> str:
    """``bf16 autocast, channels-last, batch 128`` for a throughput.py Settings."""
    amp = "fp32" if settings.amp == "none" else f"{settings.amp} autocast"
    layout = "channels-last" if settings.channels_last else "contiguous"
    return f"{amp}, {layout}, batch {settings.batch_size}"


def model_name(kind: str, size: str) -> str:
    return f"{kind}_{size}_patch{tp.PATCH}_224"


@contextlib.contextmanager
def torch_flags(*, tf32: bool | None = None) -> Iterator[None]:
    """Restore TF32 / cuDNN flags on exit; with ``tf32=False`` float32 means float32."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    try:
        if tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def logits_and_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """Logits and pooled features (``forward_head(..., pre_logits=True)``), float32, CPU."""
    tokens = model.forward_features(images)
    features = model.forward_head(tokens, pre_logits=True)
    return model.forward_head(tokens).float().cpu(), features.float().cpu()


def min_cosine(output: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    """Smallest per-sample cosine similarity of two ``(N, ...)`` batches."""
    a = torch.as_tensor(np.asarray(output)).double().flatten(1)
    b = torch.as_tensor(np.asarray(reference)).double().flatten(1)
    return F.cosine_similarity(a, b, dim=1).min().item()


def max_abs(output: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    return float(np.abs(np.asarray(output, dtype=np.float64)
                        - np.asarray(reference, dtype=np.float64)).max())


def d4_worst(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Largest change of logits and features over the 7 non-trivial rotations/flips
    (:func:`equivit_plugin.equivariance.feature_invariance`)."""
    with torch.inference_mode():
        result = feature_invariance(model, images)
    return {"logits": max(s["max_abs_diff"] for s in result["logits"].values()),
            "features": max(s["max_abs_diff"] for s in result["pooled"].values())}


def record_d4(rec: Recorder, name: str, device: torch.device, worst: dict[str, float]) -> None:
    rec.judge(f"{name}: D4 invariance on {device.type} (fp32, 7 rotations/flips)",
              f"max|Δ| logits {worst['logits']:.1e}, features {worst['features']:.1e}",
              f"≤ {D4_MAX_ABS:g}", max(worst.values()) <= D4_MAX_ABS)


def dynamo_counts() -> dict[str, int]:
    """Graphs compiled and graph breaks so far (dynamo's global counters)."""
    counters = torch._dynamo.utils.counters
    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


# --------------------------------------------------------------------------- CPU checks


def check_data(ctx: Context, rec: Recorder) -> None:
    """The inputs exist and read: slide (resolution, a tile), tiles, training folder."""
    from tiatoolbox.wsicore.wsireader import WSIReader

    data = ctx.data()
    rec.info("data folder", str(data.root) if data.root else
             f"{ctx.data_root} absent: fallbacks written")
    reader = WSIReader.open(data.slide)
    mpp = float(reader.info.mpp[0])
    width, height = reader.slide_dimensions(resolution=MPP, units="mpp")
    tile = reader.read_rect((0, 0), (PATCH, PATCH), resolution=MPP, units="mpp")
    rec.judge(f"slide {data.slide.name} ({data.slide_source})",
              f"{type(reader).__name__}, {mpp:.3f} um/px, {width}x{height} px at {MPP} um/px",
              "opens, 0.2-1 um/px, reads 224x224 RGB",
              0.2 < mpp < 1.0 and tile.shape == (PATCH, PATCH, 3))
    rec.judge(f"patch-mode tiles ({data.tiles_source})",
              f"{data.tiles.shape} {data.tiles.dtype}", "(N, 224, 224, 3) uint8",
              data.tiles.dtype == np.uint8 and data.tiles.shape[1:] == (PATCH, PATCH, 3))
    classes = sorted(p.name for p in data.train_dir.iterdir() if p.is_dir())
    count = sum(1 for c in classes for _ in (data.train_dir / c).iterdir())
    rec.judge(f"bundle training tiles ({data.train_source})",
              f"{len(classes)} classes, {count} tiles", ">= 2 classes",
              len(classes) >= 2 and count >= 2 * len(classes))
    rec.details.update(slide=str(data.slide), slide_mpp=mpp, tiles=list(data.tiles.shape),
                       train_dir=str(data.train_dir), classes=classes)


def check_cpu_d4(ctx: Context, rec: Recorder) -> None:
    """The D4 machinery of the CUDA check, on the CPU with the smallest model (quick: on the
    central 64x64 pixels of a tile, at img_size 64)."""
    pixels = ctx.pick(PATCH, 64)
    name = model_name("equivit_ri", "tiny") + ("" if pixels == PATCH else f", img_size {pixels}")
    model = tp.build_model("equivit_ri", "tiny", pixels).eval()
    start = (PATCH - pixels) // 2
    tiles = ctx.data().tiles[:ctx.pick(2, 1), start:start + pixels, start:start + pixels]
    worst = d4_worst(model, normalise(tiles))
    record_d4(rec, name, torch.device("cpu"), worst)
    rec.details[name] = worst


# --------------------------------------------------------------------------- 1 parity


def check_parity(ctx: Context, rec: Recorder) -> None:
    """CUDA vs CPU float32 (TF32 off), same weights, real tiles; D4 of equivit_ri on CUDA."""
    images = normalise(ctx.data().tiles)
    with torch_flags(tf32=False):
        for kind in KINDS:
            name = model_name(kind, ctx.size)
            cpu_model = tp.build_model(kind, ctx.size, PATCH).eval()
            cuda_model = copy.deepcopy(cpu_model).to(ctx.device)
            with torch.inference_mode():
                cpu_logits, cpu_features = logits_and_features(cpu_model, images)
                cuda_logits, cuda_features = logits_and_features(cuda_model,
                                                                 images.to(ctx.device))
            logits = tp.compare(cuda_logits, cpu_logits, "none")
            features = tp.compare(cuda_features, cpu_features, "none")
            rec.judge(f"{name}: CUDA vs CPU fp32, logits / pooled features ({len(images)} tiles)",
                      f"max|Δ| {logits['max_abs_diff']:.1e} / {features['max_abs_diff']:.1e}, "
                      f"cos {min(logits['cosine'], features['cosine']):.7f}",
                      f"max|Δ| ≤ {tp.FP32_MAX_ABS:g}", logits["ok"] and features["ok"])
            rec.details[name] = {"logits": logits, "features": features}
            if kind == "equivit_ri":
                worst = d4_worst(cuda_model, images.to(ctx.device))
                record_d4(rec, name, ctx.device, worst)
                rec.details[name]["d4_cuda"] = worst
            del cpu_model, cuda_model
            release(ctx)


# --------------------------------------------------------------------------- 3 autocast


AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_autocast(ctx: Context, rec: Recorder) -> None:
    """bf16/fp16 autocast vs float32 on CUDA: models, then the TIAToolbox adapters."""
    images = normalise(ctx.data().tiles).to(ctx.device)
    for kind in KINDS:
        name = model_name(kind, ctx.size)
        model = tp.build_model(kind, ctx.size, PATCH).eval().to(ctx.device)
        with torch_flags(tf32=False), torch.inference_mode():
            reference = logits_and_features(model, images)
        for amp, dtype in AMP.items():
            with torch.inference_mode(), torch.autocast(ctx.device.type, dtype=dtype):
                output = logits_and_features(model, images)
            cosines = [min_cosine(o, r) for o, r in zip(output, reference)]
            ok = min(cosines) >= tp.COSINE_MIN and all(bool(torch.isfinite(o).all())
                                                       for o in output)
            rec.judge(f"{name}: {amp} autocast vs fp32, logits / features",
                      f"min cos {cosines[0]:.5f} / {cosines[1]:.5f}", f"≥ {tp.COSINE_MIN}", ok)
            rec.details[f"{name}/{amp}"] = cosines
        del model
        release(ctx)
    check_adapter_autocast(ctx, rec)


def check_adapter_autocast(ctx: Context, rec: Recorder) -> None:
    """``adapter_kwargs={"autocast": "bf16", "channels_last": True}`` vs the float32 adapter,
    through ``infer_batch`` (what the engines call) on CUDA."""
    from equivit_plugin.tiatoolbox import EquiViTClassifier, EquiViTEncoder

    name = model_name("equivit_ri", ctx.size)
    batch = nhwc(normalise(ctx.data().tiles))
    for adapter, classes in ((EquiViTClassifier, 3), (EquiViTEncoder, 0)):
        torch.manual_seed(0)
        reference = adapter.from_name(name, num_classes=classes)
        fast = adapter.from_name(name, num_classes=classes,
                                 adapter_kwargs={"autocast": "bf16", "channels_last": True})
        fast.net.load_state_dict(reference.net.state_dict())
        with torch_flags(tf32=False):
            expected = np.asarray(adapter.infer_batch(reference.to(ctx.device), batch,
                                                      device=str(ctx.device)))
        got = np.asarray(adapter.infer_batch(fast.to(ctx.device), batch, device=str(ctx.device)))
        cosine = min_cosine(got, expected)
        rec.judge(f"{adapter.__name__}({name}, autocast='bf16', channels_last) vs fp32",
                  f"min cos {cosine:.5f}, {got.dtype}", f"≥ {tp.COSINE_MIN}, float32",
                  cosine >= tp.COSINE_MIN and got.dtype == np.float32)
        rec.details[adapter.__name__] = cosine
        del reference, fast
        release(ctx)


# --------------------------------------------------------------------------- 2 engines


def build_adapters(size: str) -> tuple[Any, Any, str]:
    """Classifier and encoder: the bundle's trained demo checkpoint where it exists (real
    weights), else a registered name with random weights."""
    from equivit_plugin.tiatoolbox import EquiViTClassifier, EquiViTEncoder

    checkpoint = BUNDLE / "models" / "model.pt"
    if checkpoint.is_file():
        return (EquiViTClassifier.from_checkpoint(checkpoint),
                EquiViTEncoder.from_checkpoint(checkpoint), f"checkpoint {checkpoint.name}")
    name = model_name("equivit_ri", size)
    torch.manual_seed(0)
    return (EquiViTClassifier.from_name(name, num_classes=3),
            EquiViTEncoder.from_name(name, num_classes=0), f"{name}, random weights")


def direct_probabilities(net: nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(net(images), dim=-1).numpy()


def direct_features(net: nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return net.forward_head(net.forward_features(images), pre_logits=True).numpy()


def check_engines(ctx: Context, rec: Recorder) -> None:
    """PatchPredictor / DeepFeatureExtractor on CUDA, patch and WSI mode, vs CPU fp32 direct."""
    import zarr
    from tiatoolbox.models.architecture.utils import is_torch_compile_compatible
    from tiatoolbox.models.engine.deep_feature_extractor import DeepFeatureExtractor
    from tiatoolbox.models.engine.patch_predictor import PatchPredictor

    from equivit_plugin.tiatoolbox import make_ioconfig

    classifier, encoder, source = build_adapters(ctx.size)
    cpu_classifier, cpu_encoder = copy.deepcopy(classifier.net), copy.deepcopy(encoder.net)
    data, device = ctx.data(), str(ctx.device)
    tiles = normalise(data.tiles)
    batch = ctx.pick(32, 4)
    rec.details.update(model=source, engine_compiles=is_torch_compile_compatible(),
                       dynamo_before=dynamo_counts())
    with torch_flags(tf32=False):
        out = PatchPredictor(model=classifier, batch_size=len(tiles), device=device).run(
            images=data.tiles, patch_mode=True, ioconfig=make_ioconfig(),
            return_probabilities=True, device=device)
        record_probabilities(rec, f"PatchPredictor, patch mode, {len(tiles)} tiles",
                             np.asarray(out["probabilities"]),
                             direct_probabilities(cpu_classifier, tiles))
        out = DeepFeatureExtractor(model=encoder, batch_size=len(tiles), device=device).run(
            images=data.tiles, patch_mode=True, ioconfig=make_ioconfig(), device=device)
        record_features(rec, f"DeepFeatureExtractor, patch mode, {len(tiles)} tiles",
                        np.asarray(out["features"]), direct_features(cpu_encoder, tiles))

        slide = data.slide
        result = DeepFeatureExtractor(model=encoder, batch_size=batch, device=device).run(
            images=[slide], patch_mode=False, ioconfig=make_ioconfig(),
            save_dir=ctx.workdir / "engine_features", output_type="zarr", auto_get_mask=True,
            device=device)
        group = zarr.open(str(result[slide]), mode="r")
        boxes = np.asarray(group["coordinates"])
        patches = read_patches(slide, boxes)
        record_features(rec, f"DeepFeatureExtractor, WSI mode, {slide.name}, {len(boxes)} patches",
                        np.asarray(group["features"]), direct_features(cpu_encoder, patches))

        result = PatchPredictor(model=classifier, batch_size=batch, device=device).run(
            images=[slide], patch_mode=False, ioconfig=make_ioconfig(),
            save_dir=ctx.workdir / "engine_predictions", output_type="zarr",
            return_probabilities=True, device=device)
        group = zarr.open(str(result[slide]), mode="r")
        patches = read_patches(slide, np.asarray(group["coordinates"]))
        record_probabilities(rec, f"PatchPredictor, WSI mode, {slide.name}, "
                             f"{len(patches)} patches", np.asarray(group["probabilities"]),
                             direct_probabilities(cpu_classifier, patches))
    counts = {k: v - rec.details["dynamo_before"][k] for k, v in dynamo_counts().items()}
    rec.details["dynamo_in_engines"] = counts
    rec.info("engines' own torch.compile (TIAToolbox, errors suppressed)",
             f"{'on' if rec.details['engine_compiles'] else 'off'} for this GPU: "
             f"{counts['unique_graphs']} graphs, {counts['graph_breaks']} graph breaks")


def record_probabilities(rec: Recorder, what: str, probs: np.ndarray,
                         expected: np.ndarray) -> None:
    same_shape = probs.shape == expected.shape and len(probs) > 0
    diff = max_abs(probs, expected) if same_shape else float("inf")
    agree = int((probs.argmax(-1) == expected.argmax(-1)).sum()) if same_shape else 0
    rec.judge(f"{what}: probabilities, CUDA vs CPU fp32 direct",
              f"max|Δ| {diff:.1e}, argmax {agree}/{len(expected)}, shape {probs.shape}",
              f"max|Δ| ≤ {PROB_MAX_ABS:g}", same_shape and diff <= PROB_MAX_ABS)


def record_features(rec: Recorder, what: str, features: np.ndarray,
                    expected: np.ndarray) -> None:
    same_shape = features.shape == expected.shape and len(features) > 0
    diff = max_abs(features, expected) if same_shape else float("inf")
    cosine = min_cosine(features, expected) if same_shape else float("nan")
    rec.judge(f"{what}: features, CUDA vs CPU fp32 direct",
              f"max|Δ| {diff:.1e}, min cos {cosine:.7f}, shape {features.shape}",
              f"max|Δ| ≤ {tp.FP32_MAX_ABS:g}", same_shape and diff <= tp.FP32_MAX_ABS)


# --------------------------------------------------------------------------- 6 pipeline


def write_checkpoint(name: str, path: Path) -> Path:
    """A self-describing checkpoint of ``name`` with seeded random weights, so the pipeline
    and the direct forward pass load the same weights."""
    from equivit_plugin.models import save_checkpoint

    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=3, img_size=PATCH)
    return Path(save_checkpoint(path, net, name, class_names=["a", "b", "c"],
                                model_kwargs={"num_classes": 3, "img_size": PATCH}))


def cohort(slide: Path, folder: Path, copies: int) -> list[Path]:
    """``copies`` copies of ``slide`` under distinct names: a small cohort."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{slide.stem}_{i}{slide.suffix}" for i in range(copies)]
    for path in paths:
        shutil.copyfile(slide, path)
    return paths


def pipeline_tiles(out_dir: Path, slides: Sequence[Path]) -> tuple[torch.Tensor, np.ndarray]:
    """The tiles the pipeline embedded (re-read at its level-0 coordinates, normalised) and
    its stored features, over all slides."""
    from tiatoolbox.wsicore.wsireader import WSIReader

    from equivit_plugin.features import read_features

    tiles, features = [], []
    for slide in slides:
        (h5,) = out_dir.rglob(f"{slide.stem}.h5")
        stored, coords, _ = read_features(h5)
        reader = WSIReader.open(slide)
        tiles += [reader.read_rect(tuple(int(v) for v in xy), (PATCH, PATCH), resolution=MPP,
                                   units="mpp") for xy in coords]
        features.append(np.asarray(stored, dtype=np.float32))
    return normalise(np.stack(tiles)), np.concatenate(features)


def check_pipeline(ctx: Context, rec: Recorder) -> None:
    """extract_features (slide -> h5) on CUDA bf16 vs the model-only forward, same tiles."""
    import slide_throughput as st

    from equivit_plugin.tiatoolbox import EquiViTEncoder

    name = model_name("equivit_ri", ctx.size)
    checkpoint = write_checkpoint(name, ctx.workdir / "pipeline_model.pt")
    slides = cohort(ctx.data().slide, ctx.workdir / "cohort", ctx.pick(4, 1))
    args = st.parse_args(["--slides", *map(str, slides), "--models", str(checkpoint),
                          "--device", str(ctx.device), "--amp", "bf16",
                          "--batch-size", str(ctx.pick(128, 8)),
                          "--workers", str(ctx.pick(4, 0)), "--repeats", str(ctx.pick(3, 1)),
                          "--out", str(ctx.workdir)])
    workdir = ctx.workdir / "pipeline_run"
    run_pipeline = st.pipeline_runner(str(checkpoint), args, workdir)  # runs once (warm-up)
    tiles, stored = pipeline_tiles(workdir / "pipeline", slides)
    encoder = EquiViTEncoder.from_checkpoint(checkpoint)
    with torch_flags(tf32=False):
        expected = direct_features(copy.deepcopy(encoder.net).eval(), tiles)
    run_model = st.model_only_runner(encoder, tiles, args)
    timings = st.round_robin({"model-only": run_model, "pipeline": run_pipeline}, args.repeats)
    pipeline, model = timings["pipeline"], timings["model-only"]
    rec.judge(f"{len(slides)} slide(s): tiles embedded by the pipeline = model-only tiles",
              f"{pipeline['patches']} / {model['patches']}", "equal, > 0",
              pipeline["patches"] == model["patches"] == len(tiles) > 0)
    cosine = min_cosine(stored, expected) if stored.shape == expected.shape else float("nan")
    rec.judge(f"{name}: pipeline bf16 features (h5) vs CPU fp32 direct, same tiles",
              f"min cos {cosine:.5f}", f"≥ {tp.COSINE_MIN}", cosine >= tp.COSINE_MIN)
    ratio = pipeline["patches_per_s"] / model["patches_per_s"]
    rec.info(f"{name}: pipeline / model-only patches/s (bf16, batch {args.batch_size}, "
             f"{args.workers} workers)",
             f"{ratio:.3f} ({pipeline['patches_per_s']:.0f} vs {model['patches_per_s']:.0f} "
             f"patches/s)", f"reported (CPU target ≥ {PIPELINE_CPU_TARGET})")
    rec.details.update(timings=timings, ratio=ratio, cohort=len(slides),
                       settings={k: str(v) for k, v in vars(args).items()})


# --------------------------------------------------------------------------- 17 slides


def loader_ceiling(slide: Path, workers: int) -> tuple[float, int]:
    """Tiles/s of the pipeline's loader alone (no model) on ``slide`` with ``workers``."""
    from equivit_plugin.features.loader import make_loader, received, slide_chunks
    from equivit_plugin.features.reader import decoder_for, plan_read
    from equivit_plugin.features.slides import open_slide
    from equivit_plugin.features.tiles import tile_grid

    opened = open_slide(slide)
    grid = tile_grid(opened, target_mpp=MPP, patch_size=PATCH, stride=PATCH)
    plan = plan_read(opened.reader, PATCH, MPP)
    chunks = slide_chunks(0, slide, None, decoder_for(opened.reader), plan, grid.coords,
                          workers)
    start, n = time.perf_counter(), 0
    loader = make_loader(lambda: chunks, workers=workers, pin_memory=False)
    for item in loader:
        n += len(received(loader, item))
    return n / (time.perf_counter() - start), n


def model_only_rate(model: str, weights: str | None, n: int, ctx: Context,
                    batch_size: int) -> tuple[float, int]:
    """Patches/s of the pipeline's own encoder (bf16 autocast on CUDA) on ``n`` uint8 regions
    of its context side, pinned in host memory as the loader hands them over."""
    from equivit_plugin.features.encoder import automatic_context, build_encoder
    from equivit_plugin.models import normalise_batch

    encoder, info = build_encoder(model, weights=weights, context=None)
    side = automatic_context(encoder.net, info.img_size)
    encoder = encoder.to(ctx.device).eval()
    regions = torch.randint(0, 256, (batch_size, side, side, 3), dtype=torch.uint8)
    regions = regions.pin_memory() if ctx.cuda else regions

    def run(count: int) -> None:
        with torch.inference_mode(), torch.autocast(ctx.device.type, dtype=torch.bfloat16,
                                                    enabled=ctx.cuda):
            for _ in range(-(-count // batch_size)):
                x = regions.to(ctx.device, non_blocking=True)
                encoder(normalise_batch(x, info.mean, info.std)).float().cpu()
        if ctx.cuda:
            torch.cuda.synchronize(ctx.device)

    run(batch_size)  # warm-up
    start = time.perf_counter()
    run(n)
    return n / (time.perf_counter() - start), side


def check_slides(ctx: Context, rec: Recorder) -> None:
    """The realistic 40x slide (``benchmarks/slide_read.py``): the pipeline against the lesser
    of the model-only rate and the loader's ceiling, for an Equi-ViT disc model and the UNI
    architecture (random weights); a short distillation on the device with its views made
    there, and whether the views keep up with the student's training step."""
    import slide_read as sr
    from distill_views import measure_view_making

    from equivit_plugin.distill import distill
    from equivit_plugin.features import extract_features
    from equivit_plugin.features.config import default_workers

    data = ctx.data()
    slide = sr.realistic_slide(ctx.workdir / "slides", ctx.pick(20480, 2048),
                               source=data.slide)
    workers = default_workers(ctx.device)
    ceiling, n_tiles = loader_ceiling(slide, workers)
    rec.info(f"{slide.name}: loader alone, {workers} workers (no model)",
             f"{ceiling:.0f} tiles/s ({n_tiles} tissue tiles)")
    batch = ctx.pick(256, 16)
    encoders = [(model_name("equivit_disc", ctx.size), None),
                ctx.pick(("uni_v1", "random"), ("kaiko-vits16", "random"))]
    details: dict[str, Any] = {"loader_tiles_per_s": ceiling, "workers": workers}
    for model, weights in encoders:
        label = model if weights is None else f"{model} (random weights)"
        model_rate, side = model_only_rate(model, weights, n_tiles, ctx, batch)
        options = {"model": model, "weights": weights, "device": str(ctx.device),
                   "batch_size": batch, "precision": "bf16" if ctx.cuda else "fp32",
                   "overwrite": True, "print_summary": False}
        out = ctx.workdir / f"slides_{model}"
        extract_features([slide], out, **options)  # warm-up: kernels, caches
        start = time.perf_counter()
        summary = extract_features([slide], out, **options)
        seconds = time.perf_counter() - start
        pipeline = summary.n_patches / seconds
        bound = min(model_rate, ceiling)
        ratio = pipeline / bound
        rec.judge(f"{label}: pipeline / min(model-only, loader), {side} px regions",
                  f"{ratio:.3f} ({pipeline:.0f} vs model {model_rate:.0f}, loader "
                  f"{ceiling:.0f} patches/s)", "≥ 0.8" if ctx.cuda else "reported",
                  summary.ok and (ratio >= 0.8 or not ctx.cuda))
        details[model] = {"pipeline": pipeline, "model_only": model_rate, "ratio": ratio,
                          "patches": summary.n_patches, "seconds": seconds}
    tiles = ctx.workdir / "distill_tiles"  # a subset: the teacher's targets cover them all
    images = sorted(p for p in data.train_dir.rglob("*")
                    if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif"))
    for path in images[:ctx.pick(90, 12)]:
        (tiles / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, tiles / path.parent.name / path.name)
    start = time.perf_counter()
    result = distill(teacher=model_name("vit", ctx.size), out=ctx.workdir / "student.pt",
                     student=model_name("equivit_disc", ctx.size), tiles=(tiles,),
                     epochs=ctx.pick(2, 1), batch_size=ctx.pick(64, 8),
                     device=str(ctx.device), amp=ctx.cuda,
                     num_workers=min(4, workers), progress=False)
    rec.judge(f"equivit distill on {ctx.device.type} (AMP {ctx.cuda}, one process)",
              f"{result.epochs_run} epochs in {time.perf_counter() - start:.1f} s, centred "
              f"fidelity {result.centred_fidelity}", "a student checkpoint",
              Path(result.out).is_file() and result.epochs_run > 0)
    views = measure_view_making(device=ctx.device, batch_size=ctx.pick(64, 8),
                                n_batches=ctx.pick(10, 2))
    step = student_step_rate(model_name("equivit_disc", ctx.size), ctx, ctx.pick(64, 8))
    rec.judge("distillation views made on the device vs the student's training step",
              f"{views['new_views_per_s']:.0f} views/s vs {step:.0f} images/s trained (old "
              f"CPU path {views['old_views_per_s']:.0f} views/s)", "views ≥ training",
              views["new_views_per_s"] >= step)
    details.update(views=views, student_images_per_s=step)
    rec.details.update(details)


def student_step_rate(name: str, ctx: Context, batch_size: int, steps: int = 5) -> float:
    """Images/s of the student's training step (forward, backward, AdamW; AMP on CUDA)."""
    net = timm.create_model(name, num_classes=0).to(ctx.device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, PATCH, PATCH, device=ctx.device)

    def step() -> None:
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.cuda):
            loss = net(x).float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
    return steps * batch_size / (time.perf_counter() - start)


# --------------------------------------------------------------------------- 7 bundle


def probe_config(path: Path, out: Path) -> Path:
    """A config override whose ``finalize`` records the process group (``torch.save`` of a
    dict: MONAI parses an expression containing the word "import" as an import statement),
    then destroys it."""
    record = ("$torch.save({'backend': dist.get_backend(), 'world': dist.get_world_size(), "
              "'device': str(@device), 'network': type(@network).__name__}, "
              + repr(str(out)) + ")")
    path.write_text(json.dumps({"finalize": [
        record, "$dist.is_initialized() and dist.destroy_process_group()"]}))
    return path


def run_process_group(command: list[str], cwd: Path, env: dict[str, str],
                      timeout: float) -> tuple[int, str]:
    """Run ``command`` in its own session; on timeout (or any interruption) kill the whole
    group, torchrun and its workers. Returns (exit code, combined output); -9 for a timeout."""
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as proc:
        try:
            output, _ = proc.communicate(timeout=timeout)
            return proc.returncode, output
        except subprocess.TimeoutExpired:
            kill_group(proc)
            output, _ = proc.communicate()
            return -9, f"{output}\n[killed after {timeout:.0f} s]"
        except BaseException:
            kill_group(proc)
            raise


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def load_bundle_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a bundle checkpoint with timm alone (the documented format: weights under
    ``model``, ``model_name``, ``model_kwargs``, ``class_names``)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    net = timm.create_model(payload["model_name"], **payload["model_kwargs"])
    net.load_state_dict({k: v.float() for k, v in payload["model"].items()})
    return net.eval(), payload


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def check_bundle(ctx: Context, rec: Recorder, timeout: float) -> None:
    """One-process torchrun of the bundle's multi-GPU training (NCCL), into a temp folder."""
    data = ctx.data()
    root = ctx.workdir / "bundle"
    root.mkdir(parents=True, exist_ok=True)
    probe_out = root / "process_group.pt"
    configs = [*BUNDLE_CONFIGS, str(probe_config(root / "probe.json", probe_out))]
    epochs = ctx.pick(2, 1)
    overrides = {"bundle_root": root, "dataset_dir": data.train_dir.resolve(),
                 "ckpt_path": root / "models" / "model.pt", "max_epochs": epochs,
                 "epoch_length": ctx.pick(3, 1), "val_epoch_length": ctx.pick(2, 1),
                 "batch_size": 8, "cache_rate": 0.0, "num_workers": ctx.pick(2, 0)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=1", "-m", "monai.bundle", "run", "--config_file", str(configs)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "4",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    repo_model = BUNDLE / "models" / "model.pt"
    before = sha256(repo_model)
    start = time.perf_counter()
    code, output = run_process_group(command, BUNDLE, env, timeout)
    rec.details.update(command=command, exit_code=code, log_tail=output[-4000:])
    rec.judge(f"torchrun --nproc_per_node 1, {epochs} epoch(s), quick_train data",
              f"exit {code} after {time.perf_counter() - start:.0f} s", "exit 0", code == 0)
    group = torch.load(probe_out, weights_only=True) if probe_out.is_file() else {}
    rec.judge("process group", ", ".join(f"{k} {v}" for k, v in group.items()) or "not recorded",
              "backend nccl, world 1, DistributedDataParallel",
              group.get("backend") == "nccl" and group.get("world") == 1
              and group.get("network") == "DistributedDataParallel")
    checkpoint = root / "models" / "model.pt"
    result, ok = "missing", False
    if checkpoint.is_file():
        net, payload = load_bundle_checkpoint(checkpoint)
        size = int(payload["model_kwargs"].get("img_size", PATCH))
        with torch.inference_mode():
            logits = net(torch.randn(2, 3, size, size))
        classes = len(payload.get("class_names") or [])
        ok = logits.shape == (2, classes) and bool(torch.isfinite(logits).all())
        result = (f"{payload['model_name']}, epoch {payload.get('epoch')}, "
                  f"{classes} classes, logits {tuple(logits.shape)}")
    rec.judge("checkpoint in the temporary bundle_root", result,
              "loads into timm, finite (2, classes) logits", ok)
    rec.judge("repository's monai_bundle/models/model.pt", "unchanged"
              if sha256(repo_model) == before else "CHANGED", "unchanged",
              sha256(repo_model) == before)


# --------------------------------------------------------------------------- 4 compile


def check_compile(ctx: Context, rec: Recorder) -> None:
    """Whole-model torch.compile (inductor): graph breaks, parity with eager, speed-up."""
    settings = ctx.throughput_settings()
    compiled_settings = dataclasses.replace(settings, compile=True, compile_scope="model")
    eager_settings = dataclasses.replace(settings, compile=False)
    name = model_name("equivit_ri", ctx.size)
    images, _ = tp.make_batch(settings)
    with torch_flags(), torch._dynamo.config.patch(suppress_errors=False):
        tp.configure_torch(settings)
        torch._dynamo.reset()
        before = dynamo_counts()
        eager = tp.prepare(tp.build_model("equivit_ri", ctx.size, PATCH), eager_settings)
        compiled = tp.prepare(tp.build_model("equivit_ri", ctx.size, PATCH), compiled_settings)
        timings = tp.round_robin({"eager": tp.inference_runner(eager, images, eager_settings),
                                  "compiled": tp.inference_runner(compiled, images,
                                                                  compiled_settings)},
                                 settings, f"compile check {name}")
        with torch.inference_mode(), tp.autocast(settings):
            parity = tp.compare(compiled(images).float().cpu(), eager(images).float().cpu(),
                                settings.amp)
        counts = {k: v - before[k] for k, v in dynamo_counts().items()}
    mode = mode_label(settings)
    rec.judge(f"{name}: torch.compile(model) graphs / graph breaks",
              f"{counts['unique_graphs']} / {counts['graph_breaks']}, compile "
              f"{timings['compiled'].first_call_s:.0f} s", "≥ 1 graph, 0 breaks",
              counts["unique_graphs"] >= 1 and counts["graph_breaks"] == 0)
    rec.judge(f"{name}: compiled vs eager outputs ({mode})",
              f"cos {parity['cosine']:.6f}, max|Δ| {parity['max_abs_diff']:.1e}",
              f"cos ≥ {tp.COSINE_MIN}", parity["ok"])
    speedup = timings["compiled"].median / timings["eager"].median
    rec.judge(f"{name}: compiled / eager inference img/s ({mode})",
              f"{speedup:.2f}x ({timings['compiled'].median:.0f} vs "
              f"{timings['eager'].median:.0f} img/s)", f"≥ {SPEEDUP_MIN:g}x",
              speedup >= SPEEDUP_MIN)
    rec.details.update(settings=dataclasses.asdict(settings), dynamo=counts, parity=parity,
                       timings={k: t.to_json() for k, t in timings.items()}, speedup=speedup)


# --------------------------------------------------------------------------- 5 throughput


def check_throughput(ctx: Context, rec: Recorder) -> None:
    """Equi-ViT(-RI) and ConvViT vs timm ViT, eager and block-compiled, one round-robin."""
    settings = ctx.throughput_settings()
    modes = {"eager": dataclasses.replace(settings, compile=False), "compiled": settings}
    images, _ = tp.make_batch(settings)
    runners: dict[str, tp.Runner] = {}
    with torch_flags(), torch._dynamo.config.patch(suppress_errors=False):
        tp.configure_torch(settings)
        torch._dynamo.reset()
        for kind in ("vit", "equivit_ri", "equivit", "convvit"):
            for mode, mode_settings in modes.items():
                model = tp.prepare(tp.build_model(kind, ctx.size, PATCH), mode_settings)
                runners[f"{kind}/{mode}"] = tp.inference_runner(model, images, mode_settings)
        timings = tp.round_robin(runners, settings, f"{ctx.size} inference, eager and compiled")
        compile_stats = tp.compile_stats()
    runners.clear()
    release(ctx)
    how = mode_label(settings)
    for mode in modes:
        base = timings[f"vit/{mode}"].median
        for kind in ("equivit_ri", "equivit", "convvit"):
            rate = timings[f"{kind}/{mode}"].median
            rec.judge(f"{model_name(kind, ctx.size)} / {model_name('vit', ctx.size)} "
                      f"inference, {mode} ({how})",
                      f"{rate / base:.3f}x ({rate:.0f} vs {base:.0f} img/s)",
                      f"≥ {tp.TARGET_INFER}x", rate / base >= tp.TARGET_INFER)
    for kind in ("vit", "equivit_ri"):
        eager, compiled = timings[f"{kind}/eager"], timings[f"{kind}/compiled"]
        rec.info(f"{model_name(kind, ctx.size)}: compiled / eager",
                 f"{compiled.median / eager.median:.2f}x ({compiled.median:.0f} vs "
                 f"{eager.median:.0f} img/s; first compiled call {compiled.first_call_s:.0f} s)")
    rec.details.update(settings=dataclasses.asdict(settings), compile_stats=compile_stats,
                       timings={k: t.to_json() for k, t in timings.items()})


# --------------------------------------------------------------------------- running


class CheckTimeout(Exception):
    """A check ran past its time cap."""


@contextlib.contextmanager
def time_cap(seconds: float) -> Iterator[None]:
    """Raise :class:`CheckTimeout` in the main thread after ``seconds`` (SIGALRM, POSIX)."""
    if not hasattr(signal, "setitimer") or seconds <= 0:
        yield
        return

    def expire(_signum: int, _frame: Any) -> None:
        raise CheckTimeout(f"timed out after its {seconds:.3g} s time cap")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass(frozen=True)
class Check:
    """One part of the run: an id, the issue's number, a title, its needs and time caps."""

    id: str
    number: str
    title: str
    run: Callable[[Context, Recorder, float], None]
    cuda: bool
    cap_s: float  # longest it may take (full run)
    min_s: float  # not started with less than this left
    quick_cap_s: float = 60.0


def _plain(fn: Callable[[Context, Recorder], None]) -> Callable[[Context, Recorder, float],
                                                                None]:
    """A check function that does not need its time cap."""
    return lambda ctx, rec, _cap: fn(ctx, rec)


CHECKS: tuple[Check, ...] = (
    Check("data", "-", "data: slide and tiles", _plain(check_data), False, 60, 2),
    Check("cpu_d4", "-", "CPU sanity: D4 invariance", _plain(check_cpu_d4), False, 60, 2),
    Check("parity", "1", "CUDA vs CPU parity", _plain(check_parity), True, 90, 15),
    Check("autocast", "3", "bf16 / fp16 autocast", _plain(check_autocast), True, 60, 10),
    Check("engines", "2", "TIAToolbox engines on CUDA", _plain(check_engines), True, 180, 30,
          quick_cap_s=120),
    Check("pipeline", "6", "slide -> h5 pipeline vs model-only", _plain(check_pipeline), True,
          100, 20),
    Check("slides", "17", "realistic 40x slide: pipeline, loader, distillation",
          _plain(check_slides), True, 200, 60, quick_cap_s=200),
    Check("bundle", "7", "MONAI bundle, torchrun NCCL", check_bundle, True, 120, 40,
          quick_cap_s=120),
    Check("compile", "4", "torch.compile", _plain(check_compile), True, 100, 40,
          quick_cap_s=120),
    Check("throughput", "5", "throughput vs timm ViT", _plain(check_throughput), True, 160, 60,
          quick_cap_s=120),
)
CHECK_IDS = tuple(check.id for check in CHECKS)


def release(ctx: Context) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def run_check(check: Check, ctx: Context, deadline: float) -> CheckResult:
    """Run one check under its time cap; any exception becomes an ``error`` result."""
    result = CheckResult(check.id, check.number, check.title, SKIP, 0.0)
    left = deadline - time.monotonic()
    if check.cuda and not ctx.cuda:
        result.message = NO_CUDA
    elif left < check.min_s:
        result.message = NO_TIME
        result.details["seconds_left"] = round(left, 1)
    if result.message:
        tp.log(f"[{check.id}] {check.title}: {result.message}")
        return result
    cap = min(check.quick_cap_s if ctx.quick else check.cap_s, left)
    tp.log(f"[{check.id}] {check.title} (cap {cap:.0f} s)")
    rec = Recorder()
    start = time.perf_counter()
    try:
        with time_cap(cap):
            check.run(ctx, rec, max(cap - 10.0, 1.0))
        result.status = overall_status(rec.rows)
    except Exception as error:  # noqa: BLE001  (every failure is a row; the run goes on)
        result.status = ERROR
        result.message = f"{type(error).__name__}: {error}".strip()[:500]
        result.details["traceback"] = traceback.format_exc()[-4000:]
        tp.log(result.details["traceback"])
    finally:
        release(ctx)
    result.seconds = time.perf_counter() - start
    result.rows, result.details = rec.rows, {**rec.details, **result.details}
    tp.log(f"[{check.id}] {result.status.upper()} in {result.seconds:.1f} s"
           + (f": {result.message}" if result.message else ""))
    return result


def run_checks(checks: Sequence[Check], ctx: Context, budget_s: float) -> list[CheckResult]:
    deadline = time.monotonic() + budget_s
    return [run_check(check, ctx, deadline) for check in checks]


def exit_code(results: Sequence[CheckResult]) -> int:
    return 1 if any(r.status in (FAIL, ERROR) for r in results) else 0


# --------------------------------------------------------------------------- report


def machine_info(cuda: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "timm": timm.__version__,
        "equivit_plugin": getattr(equivit_plugin, "__version__", "?"),
        "cpu_model": tp.cpu_model(), "cpu_cores": tp.cpu_count(), "cuda_available": cuda,
        "device_name": tp.cpu_model(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    device_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def table_rows(results: Sequence[CheckResult]) -> list[list[str]]:
    """One line per row of each check; a check without rows is one line with its message."""
    lines = []
    for r in results:
        label = f"{r.number} {r.title}" if r.number != "-" else r.title
        if not r.rows:
            lines.append([label, r.message or "-", "-", r.status.upper(), f"{r.seconds:.1f}"])
        for row in r.rows:
            lines.append([f"{label}: {row.check}", row.result, row.target, row.status.upper(),
                          f"{row.seconds:.1f}"])
        if r.rows and r.status == ERROR:
            lines.append([f"{label}: (stopped)", r.message, "-", "ERROR", f"{r.seconds:.1f}"])
    return lines


def render_markdown(report: dict[str, Any], results: Sequence[CheckResult]) -> str:
    m, s = report["machine"], report["settings"]
    counts = report["summary"]
    lines = [
        f"## GPU checks: {m['device_name']}" + (" (quick)" if s["quick"] else ""),
        "",
        f"torch {m['torch']}, timm {m['timm']}, Python {m['python']}, "
        f"CPU {m['cpu_model']} ({m['cpu_cores']} cores); budget {s['budget_s']:.0f} s.",
        "",
    ]
    lines += tp.table(["check", "result", "target", "pass/fail", "seconds"], table_rows(results))
    plural = "" if len(results) == 1 else "s"
    lines += ["", f"{counts['passed']} passed, {counts['failed']} failed, "
              f"{counts['errors']} errors, {counts['skipped']} skipped "
              f"({len(results)} check{plural}); wall time {report['wall_s']:.0f} s; "
              f"exit code {counts['exit_code']}.", ""]
    return "\n".join(lines)


def build_report(results: Sequence[CheckResult], ctx: Context, args: argparse.Namespace,
                 wall_s: float) -> dict[str, Any]:
    statuses = [r.status for r in results]
    return {
        "machine": machine_info(torch.cuda.is_available()),
        "settings": {"quick": ctx.quick, "budget_s": args.budget, "device": str(ctx.device),
                     "checks": [r.id for r in results], "data_root": str(ctx.data_root)},
        "checks": [dataclasses.asdict(r) for r in results],
        "summary": {"passed": statuses.count(PASS) + statuses.count(INFO),
                    "failed": statuses.count(FAIL), "errors": statuses.count(ERROR),
                    "skipped": statuses.count(SKIP), "exit_code": exit_code(results)},
        "wall_s": wall_s,
    }


def publish(report: dict[str, Any], markdown: str, out: Path) -> None:
    """Print the table; write the JSON and a ``.md`` copy of the table next to it."""
    print(markdown)
    tp.write_atomic(out, json.dumps(report, indent=2, default=str) + "\n")
    tp.write_atomic(out.with_suffix(".md"), markdown)
    tp.log(f"wrote {out} and {out.with_suffix('.md').name}")


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, few tiles and repeats (a smoke run on any machine)")
    parser.add_argument("--out", type=Path,
                        help="JSON path (default benchmarks/results/gpu_check[_quick].json); "
                             "the table goes next to it as .md")
    parser.add_argument("--checks", nargs="+", choices=CHECK_IDS, metavar="ID",
                        help=f"run only these, in the usual order: {' '.join(CHECK_IDS)}")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for all checks (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--device", default="cuda", help="CUDA device (default cuda)")
    parser.add_argument("--data", type=Path, default=default_data_root(),
                        help="shared data folder (default $EQUIVIT_DATA or ../shared/data)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    out = args.out or BENCH / "results" / f"gpu_check{'_quick' if args.quick else ''}.json"
    cuda = torch.cuda.is_available()
    checks = [c for c in CHECKS if args.checks is None or c.id in args.checks]
    tp.log(f"gpu_check: {len(checks)} checks, CUDA {'available' if cuda else 'not available'}, "
           f"budget {args.budget:.0f} s, data {args.data}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Context(quick=args.quick, device=torch.device(args.device), workdir=Path(tmp),
                      data_root=args.data.resolve(), cuda=cuda)
        results = run_checks(checks, ctx, args.budget)
        report = build_report(results, ctx, args, time.perf_counter() - start)
    publish(report, render_markdown(report, results), out)
    return report["summary"]["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
