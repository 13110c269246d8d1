"""Training support of the MONAI bundle: ignite handlers and helpers that ``train.json`` calls.

Everything is meant to be used from bundle configs through ``_target_`` or ``$`` expressions::

    "best_saver": {"_target_": "equivit_plugin.bundle.training.BestCheckpointSaver",
                   "path": "@ckpt_path", "network": "@network_def",
                   "model_name": "@network_name", "class_names": "@class_names",
                   "model_kwargs": "@model_kwargs", "metric_name": "val_acc"}

What lives here (and why it is code rather than config):

* :class:`BestCheckpointSaver` - evaluator handler writing ``models/model.pt`` with
  :func:`~equivit_plugin.models.save_checkpoint` (self-describing, atomic) whenever the key
  validation metric strictly improves. MONAI's ``CheckpointSaver`` writes non-atomically and
  stores a bare state dict without class names.
* :class:`TrainingStateSaver` - trainer handler writing the full training state (network,
  optimizer, scheduler, trainer epoch/iteration, best metric, metric history) atomically every
  epoch; MONAI's ``CheckpointLoader`` restores it for ``resume``.
* :class:`MetricsJSONWriter` - trainer handler keeping a per-epoch JSON record (loss, learning
  rate, train/validation metrics, time), rewritten atomically after every epoch.
* :func:`warmup_cosine_schedule` - linear warm-up then cosine decay, stepped per iteration.
* :func:`adamw_param_groups`, :func:`resolve_resume`, :func:`is_main_process` - small helpers
  for expressions.

Every file goes through :mod:`equivit_plugin.utils.atomic`: written under a temporary name,
fsynced, given normal permissions (``0666 & ~umask``) and renamed, never left truncated.

Only the main process (rank 0) should save or log in distributed training; the configs disable
those handlers elsewhere with ``"_disabled_": "$not @is_main_process"``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ..models import create_model, save_checkpoint
from ..utils.atomic import atomic_save, atomic_write_json

__all__ = [
    "BestCheckpointSaver",
    "MetricsJSONWriter",
    "TrainingStateSaver",
    "adamw_param_groups",
    "is_main_process",
    "resolve_resume",
    "warmup_cosine_schedule",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Helpers for config expressions
# --------------------------------------------------------------------------------------------


def is_main_process() -> bool:
    """``True`` outside distributed training and on rank 0 inside it.

    Evaluated lazily by the configs, i.e. after ``multi_gpu_train.json``'s ``initialize`` has
    created the process group.
    """
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


_FALSE_STRINGS = {"", "0", "false", "no", "none", "null"}


def resolve_resume(resume: bool | str | os.PathLike | None, default_path: str) -> str:
    """Turn the config's ``resume`` value into a training-state path (``""``: start fresh).

    Args:
        resume: ``False``/``None``/``""``: no resume; ``True`` (or ``"true"``): resume from
            ``default_path``; anything else: the path of a state written by
            :class:`TrainingStateSaver`.
        default_path: the state file the bundle writes every epoch
            (``models/checkpoint_last.pt``).

    Returns:
        ``""`` or an existing file path.

    Raises:
        FileNotFoundError: resuming was asked for but the file does not exist.
    """
    if resume is None or resume is False:
        return ""
    text = str(resume).strip()
    if text.lower() in _FALSE_STRINGS:
        return ""
    path = default_path if resume is True or text.lower() == "true" else text
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"resume={resume!r}: no training state at {path} (train.json writes one after every "
            f"epoch to models/checkpoint_last.pt; pass --resume false to start from scratch)"
        )
    return str(path)


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two parameter groups: decayed weights, and undecayed 1-D parameters and tokens.

    Biases, normalisation weights and the names in ``model.no_weight_decay()`` (timm ViTs:
    ``pos_embed``, ``cls_token``...) get no weight decay, as in the ViT/DeiT recipes.

    Args:
        model: the network (a ``DistributedDataParallel`` wrapper is unwrapped).
        weight_decay: decay of the first group.

    Returns:
        ``[{"params": [...], "weight_decay": weight_decay}, {"params": [...],
        "weight_decay": 0.0}]`` for ``torch.optim.AdamW``.
    """
    model = getattr(model, "module", model)
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in skip or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": float(weight_decay)},
            {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine_schedule(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0,
                           min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up to the base learning rate, then cosine decay, stepped every iteration.

    The factor applied to each group's base learning rate at optimizer step ``s`` (0-based) is
    ``(s + 1) / warmup_steps`` during warm-up, then
    ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2`` with
    ``p = (s - warmup_steps) / (total_steps - warmup_steps)`` clipped to ``[0, 1]``.

    Args:
        optimizer: the optimizer.
        total_steps: iterations of the whole run (``max_epochs * iterations_per_epoch``).
        warmup_steps: iterations of linear warm-up (0: none).
        min_lr_ratio: final learning rate as a fraction of the base one.

    Returns:
        A ``LambdaLR`` to step once per iteration (MONAI ``LrScheduleHandler`` with
        ``epoch_level=False``); its ``state_dict`` holds the step count, so a resumed run
        continues the same curve.
    """
    total, warmup, floor = int(total_steps), int(warmup_steps), float(min_lr_ratio)
    if total < 1 or not 0 <= warmup <= total:
        raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got "
                         f"total_steps={total_steps}, warmup_steps={warmup_steps}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------


def _float_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar entries of an engine's ``state.metrics`` as Python floats."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(key)] = float(value)
    return out


class BestCheckpointSaver:
    """Evaluator handler: save the network when the key validation metric strictly improves.

    At every ``EPOCH_COMPLETED`` of the evaluator it reads ``engine.state.metrics[metric_name]``;
    if it beats the best value so far (``mode="max"``: greater, ``"min"``: smaller; the first
    value always counts), the network is written to ``path`` with
    :func:`~equivit_plugin.models.save_checkpoint` - atomically, with ``model_name``,
    ``model_kwargs``, ``class_names``, ``epoch`` and ``metrics`` - so evaluation and inference
    rebuild the model and name its outputs without guessing. A NaN metric never counts.

    MONAI's ``SupervisedEvaluator.run(global_epoch)`` sets the evaluator's epoch to the trainer's,
    so ``epoch`` in the file is the training epoch.

    Before the first validation it builds ``create_model(model_name, **model_kwargs)`` once
    on the CPU and checks that its state-dict keys and shapes match the network's, so an
    architecture argument given to ``network_def`` but not to ``model_kwargs`` fails at the
    start of training rather than producing a ``model.pt`` that cannot be loaded.

    ``state_dict``/``load_state_dict`` carry the best value and epoch, so a resumed run (see
    :class:`TrainingStateSaver`) only overwrites ``model.pt`` with a better model.

    Args:
        path: output file, e.g. ``models/model.pt``.
        network: the trained network (a ``DistributedDataParallel`` wrapper is unwrapped).
        model_name: timm registry name the network was built from.
        class_names: label names in logit order (``None``: a feature model, no head).
        model_kwargs: :func:`~equivit_plugin.models.create_model` arguments that rebuild the
            architecture
            (``num_classes``, ``img_size`` and any other architecture argument).
        metric_name: key of the evaluator metric to track.
        mode: ``"max"`` or ``"min"``.
        half: store floating-point weights as float16.
        check_model_kwargs: do the architecture check described above.
        enabled: ``False`` (non-main ranks of distributed training): keep tracking the best value,
            so the training state is the same on every rank, but write nothing.
        extra: more entries for the checkpoint (JSON-able: what the model is, where from).
    """

    def __init__(self, path: str | os.PathLike, network: nn.Module, model_name: str,
                 class_names: Sequence[str] | None, model_kwargs: Mapping[str, Any] | None = None,
                 metric_name: str = "val_acc", mode: str = "max", half: bool = False,
                 check_model_kwargs: bool = True, enabled: bool = True,
                 extra: Mapping[str, Any] | None = None) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.path = Path(path)
        self.network = network
        self.model_name = str(model_name)
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        self.model_kwargs = dict(model_kwargs or {})
        self.model_kwargs.setdefault("num_classes", len(self.class_names or ()))
        self.extra = dict(extra or {})
        self.metric_name = metric_name
        self.mode = mode
        self.half = bool(half)
        self.check_model_kwargs = bool(check_model_kwargs)
        self.enabled = bool(enabled)
        self.best_metric: float | None = None
        self.best_epoch: int = 0
        self._checked = False

    def attach(self, engine: Engine) -> None:
        """Check the architecture when ``engine`` starts, save at each ``EPOCH_COMPLETED``."""
        engine.add_event_handler(Events.STARTED, self._check_architecture)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _check_architecture(self, _engine: Engine | None = None) -> None:
        if self._checked or not (self.check_model_kwargs and self.enabled):
            return
        network = getattr(self.network, "module", self.network)
        reference = create_model(self.model_name, **self.model_kwargs)
        ours = {k: tuple(v.shape) for k, v in network.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        if ours != theirs:
            differences = sorted(
                [f"{k}: network {ours.get(k)} vs rebuilt {theirs.get(k)}"
                 for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)]
            )
            raise ValueError(
                f"the network does not match create_model({self.model_name!r}, "
                f"**{self.model_kwargs}), which is how {self.path.name} will be rebuilt "
                f"({len(differences)} differing weights, e.g. {differences[:3]}); give every "
                f"architecture argument of network_def to model_kwargs too "
                f"(e.g. --network_def#depth 6 --model_kwargs#depth 6)"
            )
        self._checked = True

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_metric is None:
            return True
        return value > self.best_metric if self.mode == "max" else value < self.best_metric

    def __call__(self, engine: Engine) -> None:
        """Save the network if ``engine.state.metrics[metric_name]`` improved."""
        metrics = engine.state.metrics
        if self.metric_name not in metrics:
            raise KeyError(f"BestCheckpointSaver: metric {self.metric_name!r} not computed by the "
                           f"evaluator; it has {sorted(metrics)}")
        value = float(metrics[self.metric_name])
        epoch = int(engine.state.epoch)
        if not self._improves(value):
            logger.info("epoch %d: %s=%.4f, best stays %.4f (epoch %d)", epoch, self.metric_name,
                        value, self.best_metric if self.best_metric is not None else math.nan,
                        self.best_epoch)
            return
        if self.enabled:
            self._check_architecture()
            save_checkpoint(self.path, self.network, self.model_name, self.class_names,
                            self.model_kwargs, half=self.half, epoch=epoch,
                            metrics=_float_metrics(metrics), **self.extra)
            logger.info("epoch %d: %s=%.4f is the best so far, saved %s", epoch,
                        self.metric_name, value, self.path)
        self.best_metric, self.best_epoch = value, epoch

    def state_dict(self) -> dict[str, Any]:
        """Best value and epoch, for the training state."""
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch,
                "metric_name": self.metric_name}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        best = state_dict.get("best_metric")
        self.best_metric = None if best is None else float(best)
        self.best_epoch = int(state_dict.get("best_epoch", 0))


class TrainingStateSaver:
    """Trainer handler: write everything needed to resume, atomically, every ``interval`` epochs.

    The file is ``{name: obj.state_dict() for name, obj in save_dict.items()}`` plus the state of
    the engine it is attached to under ``engine_key`` (networks are unwrapped from
    ``DistributedDataParallel`` so the keys carry no ``module.`` prefix), written with
    :func:`~equivit_plugin.utils.atomic.atomic_save`. MONAI's ``CheckpointLoader`` with the
    same objects and ``{engine_key: trainer}`` restores it; for the trainer (an ignite ``Engine``)
    that restores the epoch and iteration, so training continues after the saved epoch. (The
    engine is taken at ``attach`` so that configs need no reference from the trainer's handler
    list back to the trainer, which would be circular.)

    Attach it after every other ``EPOCH_COMPLETED`` handler of the trainer (validation, learning
    rate, metric writers) so that the saved state includes their work for the epoch.

    Args:
        path: output file, e.g. ``models/checkpoint_last.pt``.
        save_dict: objects with ``state_dict()``: network, optimizer, scheduler, ...
        engine_key: key of the attached engine's own state (``None``: not saved).
        interval: save every this many epochs.
    """

    def __init__(self, path: str | os.PathLike, save_dict: Mapping[str, Any],
                 engine_key: str | None = "trainer", interval: int = 1) -> None:
        missing = [k for k, v in save_dict.items() if not hasattr(v, "state_dict")]
        if missing:
            raise TypeError(f"TrainingStateSaver: {missing} have no state_dict()")
        if engine_key is not None and engine_key in save_dict:
            raise ValueError(f"TrainingStateSaver: save_dict already has {engine_key!r}")
        self.path = Path(path)
        self.save_dict = dict(save_dict)
        self.engine_key = engine_key
        self.interval = int(interval)

    def attach(self, engine: Engine) -> None:
        """Save ``engine`` too, at every ``interval``-th ``EPOCH_COMPLETED`` of it."""
        if self.engine_key is not None:
            self.save_dict[self.engine_key] = engine
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        """Write the state file."""
        state = {name: getattr(obj, "module", obj).state_dict() if isinstance(obj, nn.Module)
                 else obj.state_dict() for name, obj in self.save_dict.items()}
        atomic_save(state, self.path)
        logger.info("epoch %d: training state saved to %s", engine.state.epoch, self.path)


class MetricsJSONWriter:
    """Trainer handler: per-epoch metrics as JSON, rewritten atomically after every epoch.

    The file is ``{"epochs": [record, ...]}`` with one record per completed epoch::

        {"epoch": 2, "iteration": 24, "train_loss": 0.61, "lr": 0.00049, "train_acc": 0.74,
         "val_acc": 0.81, "time_s": 35.2, "train_time_s": 33.0, "best_val_acc": 0.81}

    ``train_loss`` is the mean of the iteration losses of the epoch (of this process, i.e. of
    rank 0 in distributed training), ``lr`` the learning rate of the first parameter group at the
    epoch's last iteration, ``train_*`` the trainer's metrics, validation metrics are those of
    ``validator`` when it ran for this epoch, ``time_s`` the wall time from the start of the epoch
    to the end of its validation, and ``best_<metric>`` the best value so far of
    ``best_metric_name``. ``state_dict``/``load_state_dict`` carry the records, so a resumed run
    appends to the history of the run it continues.

    Attach it after the trainer's ``ValidationHandler``.

    Args:
        path: output ``.json`` file.
        validator: the evaluator run by the ``ValidationHandler`` (``None``: no validation).
        optimizer: the optimizer, for ``lr`` (``None``: not recorded).
        loss_transform: maps ``engine.state.output`` to the iteration loss.
        best_metric_name: validation metric whose best value is recorded (``None``: none).
        mode: ``"max"`` or ``"min"``, for ``best_metric_name``.
        enabled: ``False`` (non-main ranks): keep the records but write no file.
    """

    def __init__(self, path: str | os.PathLike, validator: Engine | None = None,
                 optimizer: Optimizer | None = None,
                 loss_transform: Callable[[Any], Any] | None = None,
                 best_metric_name: str | None = "val_acc", mode: str = "max",
                 enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = bool(enabled)
        self.validator = validator
        self.optimizer = optimizer
        self.loss_transform = loss_transform or from_engine(["loss"], first=True)
        self.best_metric_name = best_metric_name
        self.mode = mode
        self.history: list[dict[str, Any]] = []
        self._loss_sum = 0.0
        self._loss_count = 0
        self._lr: float | None = None
        self._epoch_start = 0.0

    def attach(self, engine: Engine) -> None:
        """Hook epoch start, every iteration and epoch end of ``engine``."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _epoch_started(self, _engine: Engine) -> None:
        self._loss_sum, self._loss_count, self._lr = 0.0, 0, None
        self._epoch_start = time.perf_counter()

    def _iteration_started(self, _engine: Engine) -> None:
        if self.optimizer is not None:  # the rate this iteration's optimizer step uses
            self._lr = float(self.optimizer.param_groups[0]["lr"])

    def _iteration_completed(self, engine: Engine) -> None:
        loss = self.loss_transform(engine.state.output)
        self._loss_sum += float(loss.item() if isinstance(loss, torch.Tensor) else loss)
        self._loss_count += 1

    def _best(self, record: Mapping[str, Any]) -> float | None:
        name = self.best_metric_name
        values = [r[name] for r in [*self.history, record]
                  if name in r and not math.isnan(r[name])]
        if not values:
            return None
        return max(values) if self.mode == "max" else min(values)

    def __call__(self, engine: Engine) -> None:
        """Append this epoch's record and rewrite the file."""
        epoch = int(engine.state.epoch)
        record: dict[str, Any] = {"epoch": epoch, "iteration": int(engine.state.iteration)}
        record["train_loss"] = self._loss_sum / self._loss_count if self._loss_count else None
        record["lr"] = self._lr
        record.update({f"train_{k}" if not k.startswith("train") else k: v
                       for k, v in _float_metrics(engine.state.metrics).items()})
        validator = self.validator
        if validator is not None and int(getattr(validator.state, "epoch", 0) or 0) == epoch:
            record.update(_float_metrics(validator.state.metrics))
        record["time_s"] = round(time.perf_counter() - self._epoch_start, 3)
        if self.best_metric_name:
            record[f"best_{self.best_metric_name}"] = self._best(record)
        self.history = [r for r in self.history if r["epoch"] < epoch] + [record]
        if self.enabled:
            atomic_write_json({"epochs": self.history}, self.path)

    def state_dict(self) -> dict[str, Any]:
        """The records so far, for the training state."""
        return {"history": [dict(r) for r in self.history]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.history = [dict(r) for r in state_dict.get("history", [])]
