"""A distillation run: teacher targets, then the student trained with MONAI's engines.

``equivit distill`` and the bundle's ``configs/distill.json`` both call :func:`distill`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from ignite.engine import Events
from ignite.handlers import ProgressBar
from ignite.metrics import Average
from monai.data import DistributedSampler
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import (
    CheckpointLoader,
    LrScheduleHandler,
    StatsHandler,
    TensorBoardStatsHandler,
    ValidationHandler,
    from_engine,
)
from torch import nn
from torch.utils.data import DataLoader

from ..bundle.training import (
    BestCheckpointSaver,
    MetricsJSONWriter,
    TrainingStateSaver,
    adamw_param_groups,
    warmup_cosine_schedule,
)
from ..features.config import ExtractionConfigError
from ..features.distributed import Ranks, process_group, ranks_from_env, resolve_device
from ..features.encoder import RandomWeightsWarning
from ..models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FoundationEncoder,
    ModelInfo,
    ModelLoadError,
    input_normalisation,
    is_encoder,
    load_model,
    unknown_source_reason,
)
from ..utils.atomic import atomic_write_json
from ..version import __version__
from .config import DEFAULT_STUDENT, DistillError, DistillSettings
from .loss import DistillationLoss, feature_cosine
from .student import build_student
from .targets import (
    Targets,
    default_targets_path,
    targets_fingerprint,
    teacher_identity,
    teacher_targets,
)
from .tiles import DistillTiles, collect_tiles
from .views import DistillationViews, largest_shift

__all__ = ["DistillResult", "distill"]

logger = logging.getLogger(__name__)

STATE_FILE = "checkpoint_last.pt"
METRICS_FILE = "distill_metrics.json"
SUMMARY_FILE = "distill_summary.json"


@dataclass(frozen=True)
class DistillResult:
    """What a run produced.

    Attributes:
        out: the student checkpoint (best fidelity on the held-out tiles).
        work_dir: targets, training state, metrics JSON, TensorBoard logs.
        targets_path: the teacher-target cache.
        n_train, n_val: tiles trained on and held out.
        unreadable: ``{tile key: reason}`` of tiles left out.
        fidelity: mean cosine between the student's features of held-out views and their
            targets, at the saved epoch (``None`` without held-out tiles).
        centred_fidelity: the same after subtracting the training targets' mean from both
            (what chooses the saved epoch: the raw cosine is near 1 for any features sharing
            the teacher's common component).
        epochs_run: epochs trained by this call (0 when a finished run was found).
        seconds: wall time of this call.
    """

    out: Path
    work_dir: Path
    targets_path: Path
    n_train: int
    n_val: int
    unreadable: dict[str, str]
    fidelity: float | None
    centred_fidelity: float | None
    epochs_run: int
    seconds: float


def _load_teacher(settings: DistillSettings) -> tuple[nn.Module, ModelInfo]:
    if not timm.is_model(settings.student):
        raise DistillError(f"student= {settings.student!r} is not a registered timm model (e.g. "
                           f"{DEFAULT_STUDENT})", "student")
    reason = unknown_source_reason(settings.teacher)
    if reason is not None:
        raise DistillError(f"teacher= {reason}", "teacher")
    weights = settings.teacher_weights
    if weights is not None and not is_encoder(settings.teacher):
        raise DistillError(f"teacher_weights= is for the foundation models of `equivit "
                           f"encoders` (uni_v1, kaiko-vits16...); teacher= "
                           f"{settings.teacher!r} is not one", "teacher_weights")
    try:
        teacher, info = load_model(settings.teacher, weights=weights, seed=settings.seed)
    except ModelLoadError as error:
        argument = "teacher_weights" if weights is not None else "teacher"
        raise DistillError(f"{argument}= {error}", argument) from error
    if info.random_weights:
        warnings.warn(f"teacher={info.name!r}: no checkpoint given, the teacher's weights are "
                      f"RANDOM (seed {settings.seed}); distil from a trained checkpoint for "
                      f"useful features", RandomWeightsWarning, stacklevel=3)
    if info.img_size % 2:
        raise DistillError(f"teacher= takes {info.img_size} px inputs; views are centred crops "
                           f"and need an even size", "teacher")
    if settings.max_shift > largest_shift(info.img_size):
        raise DistillError(f"max_shift= {settings.max_shift} px is too large for the teacher's "
                           f"{info.img_size} px tiles: a view turned by 45 degrees would leave "
                           f"the {2 * info.img_size} px context (at most "
                           f"{largest_shift(info.img_size)})", "max_shift")
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher.eval(), info


def _initial_blocks(teacher: nn.Module) -> nn.Module | None:
    """The timm ViT whose blocks can start the student: the teacher itself, a foundation
    model's timm backbone, or ``None`` (a ``transformers`` backbone: other parameter names)."""
    if isinstance(teacher, FoundationEncoder):
        backbone = teacher.timm_backbone
        if backbone is None:
            logger.info("the %s teacher is not a timm model: the student starts from random "
                        "weights", teacher.spec.name)
        return backbone
    return teacher


def _split(readable: np.ndarray, val_fraction: float, seed: int,
           max_tiles: int | None, world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(train rows, held-out rows)``: a seeded random split of the readable tiles, the same
    on every rank; at least one held-out tile per rank when any are held out."""
    usable = np.flatnonzero(readable)
    rng = np.random.default_rng(seed)
    usable = rng.permutation(usable)
    if max_tiles is not None:
        usable = usable[:max_tiles]
    n_val = int(round(val_fraction * len(usable)))
    if val_fraction > 0 and len(usable) > world_size:
        n_val = max(world_size, n_val)
    if len(usable) - n_val < 1:
        raise DistillError(f"tiles= only {len(usable)} readable tile(s): nothing left to train "
                           f"on after holding out {n_val}", "tiles")
    return np.sort(usable[n_val:]), np.sort(usable[:n_val])


def _finished_epochs(state_path: Path) -> int:
    if not state_path.is_file():
        return 0
    trainer = torch.load(state_path, map_location="cpu", weights_only=False).get("trainer", {})
    if "epoch" in trainer:
        return int(trainer["epoch"])
    # ignite keeps the iteration: whole epochs are iteration // epoch_length
    return int(trainer.get("iteration", 0)) // max(1, int(trainer.get("epoch_length") or 1))


def _loader(dataset: DistillationViews, settings: DistillSettings, ranks: Ranks, *,
            train: bool, device: torch.device) -> DataLoader:
    sampler = None
    if ranks.world_size > 1:
        sampler = DistributedSampler(dataset, even_divisible=train, shuffle=train,
                                     num_replicas=ranks.world_size, rank=ranks.rank,
                                     seed=settings.seed)
    return DataLoader(dataset, batch_size=settings.batch_size,
                      shuffle=train and sampler is None, sampler=sampler,
                      num_workers=settings.num_workers, drop_last=False,
                      pin_memory=device.type == "cuda",
                      persistent_workers=settings.num_workers > 0)


class _MeanCosine(Average):
    """ignite's per-sample ``Average`` of ``(B, 1)`` cosines, computed as a Python float (MONAI
    compares key metrics as scalars)."""

    def compute(self) -> float:
        return float(super().compute())


def _cosine_metric(centre: torch.Tensor | None, device: torch.device) -> Average:
    """The mean cosine of features and targets (centred on the training targets' mean when
    ``centre`` is given), averaged per sample by ignite's ``Average``."""
    def cosines(output: Any) -> torch.Tensor:
        pred, label = from_engine(["pred", "label"])(output)
        pred = torch.stack(pred) if isinstance(pred, list) else pred
        label = torch.stack(label) if isinstance(label, list) else label
        return feature_cosine(pred.detach(), label, centre).unsqueeze(1)

    return _MeanCosine(output_transform=cosines, device=device)


def distill(settings: DistillSettings | None = None, **kwargs: Any) -> DistillResult:
    """Distil a frozen teacher into an exactly rotation-invariant student.

    1. The teacher (a timm name, ``hf-hub:`` name or checkpoint) is loaded and frozen.
    2. Tiles are found in folders and/or sampled from slides' tissue
       (:func:`~equivit_plugin.distill.collect_tiles`).
    3. Each tile's target, the mean of the teacher's pooled embedding over the 8
       rotations/flips, is computed once into an HDF5 cache (resumable, shared by students).
    4. The student (:func:`~equivit_plugin.distill.build_student`: blocks from the teacher
       where shapes match, a projection when widths differ) is trained with MONAI's
       ``SupervisedTrainer`` on views turned by any angle and shifted by up to ``max_shift`` px
       (:class:`~equivit_plugin.distill.DistillationViews`; each batch's views are made on the
       device, batched, by its ``prepare_batch``) to reproduce the targets
       (:class:`~equivit_plugin.distill.DistillationLoss`), AdamW with warm-up and cosine
       decay. Every epoch a ``SupervisedEvaluator`` measures fidelity (mean cosine to the
       target, raw and centred) on held-out tiles, each at a fixed random view, and the student
       with the best centred fidelity is written
       to ``out`` (self-describing, atomic); the full training state goes to ``work_dir``
       every epoch, and a rerun continues from it.

    Under ``torchrun`` each rank computes a share of the targets and trains on a share of the
    tiles (``DistributedDataParallel``, NCCL on CUDA, gloo on CPU); rank 0 writes the files.

    Args:
        settings: a :class:`~equivit_plugin.distill.DistillSettings`, or its fields as keyword
            arguments.

    Returns:
        A :class:`DistillResult`.

    Raises:
        DistillError: a bad argument or input (``.argument`` names it).
    """
    start = time.perf_counter()
    if settings is None:
        settings = DistillSettings(**kwargs)
    elif kwargs:
        settings = dataclasses.replace(settings, **kwargs)
    ranks = ranks_from_env()
    try:
        device = resolve_device(settings.device or ("cuda" if torch.cuda.is_available()
                                                    else "cpu"), ranks)
    except ExtractionConfigError as error:
        raise DistillError(str(error), "device") from error
    amp = device.type == "cuda" if settings.amp is None else bool(settings.amp)
    main = ranks.rank == 0
    with process_group(ranks, device):
        teacher, info = _load_teacher(settings)
        tiles = collect_tiles(info.img_size, tiles=settings.tiles, slides=settings.slides,
                              target_mpp=settings.target_mpp, stride=settings.stride,
                              min_tissue=settings.min_tissue, tissue_mask=settings.tissue_mask,
                              slide_mpp=settings.slide_mpp, progress=settings.progress and main)
        fingerprint = targets_fingerprint(info, tiles, settings.seed)
        targets_path = settings.targets_cache or default_targets_path(settings.work_dir,
                                                                      fingerprint)
        teacher_mean, teacher_std = input_normalisation(info)
        targets = teacher_targets(
            teacher.to(device), info, tiles, targets_path, fingerprint=fingerprint,
            mean=teacher_mean, std=teacher_std, batch_size=settings.batch_size_targets,
            device=device, num_workers=settings.num_workers, amp=amp, ranks=ranks,
            progress=settings.progress)
        train_rows, val_rows = _split(targets.readable, settings.val_fraction, settings.seed,
                                      settings.max_tiles, ranks.world_size)
        torch.manual_seed(settings.seed)
        student, model_kwargs, report = build_student(
            settings.student, int(info.embed_dim), int(info.img_size),
            teacher=_initial_blocks(teacher.cpu()) if settings.init_from_teacher else None)
        del teacher
        if report is not None:
            logger.info("student initialised from the teacher: %d tensors loaded",
                        len(report.loaded))
        result = _train(settings, ranks, device, amp, main, info, tiles, targets, train_rows,
                        val_rows, student, model_kwargs)
        if ranks.world_size > 1:
            # Leave together: a rank that tears the group down while rank 0 still writes the
            # summary aborts gloo.
            torch.distributed.barrier()
    return dataclasses.replace(result, seconds=round(time.perf_counter() - start, 1))


def _train(settings: DistillSettings, ranks: Ranks, device: torch.device, amp: bool,
           main: bool, info: ModelInfo, tiles: DistillTiles, targets: Targets,
           train_rows: np.ndarray, val_rows: np.ndarray, student: nn.Module,
           model_kwargs: dict[str, Any]) -> DistillResult:
    work_dir = settings.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    state_path = work_dir / STATE_FILE
    done = _finished_epochs(state_path) if settings.resume else 0
    # The student is normalised as every checkpoint of this package is (ImageNet), whatever
    # its teacher's normalisation (that one is used for the targets and recorded in
    # distilled_from): so the bundle fine-tunes it with the inputs it was trained on.
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    views = {"max_shift": settings.max_shift, "mean": mean, "std": std}
    # The datasets only read contexts and draw view parameters (DataLoader workers); the
    # engines' prepare_batch makes and normalises each batch's views on the device, in one
    # pass, from the pinned uint8 contexts (copied non-blocking).
    train_set = DistillationViews(tiles, targets.values, train_rows, **views)
    val_set = DistillationViews(tiles, targets.values, val_rows, fixed_seed=settings.seed,
                                **views)
    train_loader = _loader(train_set, settings, ranks, train=True, device=device)
    student = student.to(device)
    network: nn.Module = student
    if ranks.world_size > 1:
        network = nn.parallel.DistributedDataParallel(
            student, device_ids=[device] if device.type == "cuda" else None)
    train_targets = torch.from_numpy(targets.values[train_rows]).double()
    centre = train_targets.mean(0)
    spread = train_targets.std(0) if len(train_rows) > 1 else torch.ones_like(centre)
    spread = spread.clamp_min(1e-3 * float(spread.mean()) + 1e-12)
    loss = DistillationLoss(settings.cosine_weight, settings.regression_weight,
                            centre.float(), spread.float()).to(device)
    centre = centre.float().to(device)
    optimizer = torch.optim.AdamW(adamw_param_groups(student, settings.weight_decay),
                                  lr=settings.lr, weight_decay=settings.weight_decay)
    steps = len(train_loader)
    scheduler = warmup_cosine_schedule(optimizer, total_steps=settings.epochs * steps,
                                       warmup_steps=min(settings.warmup_epochs,
                                                        settings.epochs) * steps)
    # Checkpoints are chosen by the centred cosine: the raw one is near 1 for any features
    # that share the teacher's common component.
    prefix = "val" if len(val_rows) else "train"
    metric = f"{prefix}_centred_cosine"
    metrics = {metric: _cosine_metric(centre, device),
               f"{prefix}_cosine": _cosine_metric(None, device)}
    extra = {"distilled_from": teacher_identity(info), "feature_space": "teacher",
             "targets": "mean over the 8 rotations/flips of the teacher's pooled embedding",
             "targets_fingerprint": targets.fingerprint, "mean": list(mean),
             "std": list(std), "max_shift": settings.max_shift,
             "equivit_plugin_version": __version__, **settings.extra}
    saver = BestCheckpointSaver(settings.out, student, settings.student, None, model_kwargs,
                                metric_name=metric, mode="max", enabled=main, extra=extra)
    metrics_writer = MetricsJSONWriter(work_dir / METRICS_FILE, optimizer=optimizer,
                                       best_metric_name=metric, enabled=main)
    tensorboard = work_dir / "tensorboard"
    evaluator = None
    if len(val_rows):
        val_handlers: list[Any] = [saver]
        if main:
            val_handlers.append(TensorBoardStatsHandler(log_dir=str(tensorboard),
                                                        iteration_log=False))
        evaluator = SupervisedEvaluator(
            device=device, val_data_loader=_loader(val_set, settings, ranks, train=False,
                                                   device=device),
            network=student, amp=amp, prepare_batch=val_set.prepare_batch(),
            non_blocking=True,
            key_val_metric={metric: metrics[metric]},
            additional_metrics={f"{prefix}_cosine": metrics[f"{prefix}_cosine"]},
            val_handlers=val_handlers)
        metrics_writer.validator = evaluator
    handlers: list[Any] = []
    if evaluator is not None:
        handlers.append(ValidationHandler(validator=evaluator, interval=1, epoch_level=True))
    handlers.append(LrScheduleHandler(lr_scheduler=scheduler, epoch_level=False,
                                      print_lr=False))
    if main:
        handlers += [StatsHandler(name=logger.name, iteration_log=False,
                                  tag_name="train_loss",
                                  output_transform=from_engine(["loss"], first=True)),
                     TensorBoardStatsHandler(log_dir=str(tensorboard), tag_name="train_loss",
                                             output_transform=from_engine(["loss"],
                                                                          first=True))]
    handlers.append(metrics_writer)
    on_train = evaluator is None
    trainer = SupervisedTrainer(
        device=device, max_epochs=settings.epochs, train_data_loader=train_loader,
        network=network, optimizer=optimizer, loss_function=loss, amp=amp,
        prepare_batch=train_set.prepare_batch(), non_blocking=True,
        key_train_metric={metric: metrics[metric]} if on_train else None,
        additional_metrics={f"{prefix}_cosine": metrics[f"{prefix}_cosine"]} if on_train
        else None, train_handlers=handlers)
    if evaluator is None:
        saver.attach(trainer)
    if main:
        TrainingStateSaver(state_path, {"network": student, "optimizer": optimizer,
                                        "lr_scheduler": scheduler, "best": saver,
                                        "metrics": metrics_writer}).attach(trainer)
        if settings.progress:
            ProgressBar(persist=False, desc="distilling").attach(
                trainer, output_transform=from_engine(["loss"], first=True))
    epochs_run = 0
    if done >= settings.epochs and Path(settings.out).is_file():
        logger.info("%s: all %d epochs were already trained (%s); nothing to do",
                    settings.out, done, state_path)
    else:
        if done:
            CheckpointLoader(load_path=str(state_path), map_location=device, load_dict={
                "network": student, "optimizer": optimizer, "lr_scheduler": scheduler,
                "best": saver, "metrics": metrics_writer, "trainer": trainer}).attach(trainer)
            logger.info("resuming after epoch %d from %s", done, state_path)
        if ranks.world_size > 1 and isinstance(train_loader.sampler, DistributedSampler):
            trainer.add_event_handler(Events.EPOCH_STARTED,
                                      lambda engine: train_loader.sampler.set_epoch(
                                          engine.state.epoch))
        trainer.run()
        epochs_run = settings.epochs - done
    best = next((r for r in metrics_writer.history if r["epoch"] == saver.best_epoch), {})
    result = DistillResult(out=Path(settings.out), work_dir=work_dir,
                           targets_path=targets.path, n_train=len(train_rows),
                           n_val=len(val_rows), unreadable=dict(targets.errors),
                           fidelity=best.get("val_cosine"),
                           centred_fidelity=best.get("val_centred_cosine"),
                           epochs_run=epochs_run, seconds=0.0)
    if main:
        summary = {k: str(v) if isinstance(v, Path) else v
                   for k, v in dataclasses.asdict(result).items() if k != "seconds"}
        summary["settings"] = json.loads(json.dumps(dataclasses.asdict(settings), default=str))
        atomic_write_json(summary, work_dir / SUMMARY_FILE)
    return result
