"""``torchrun`` for feature extraction: the rank layout from the environment, the device of
each rank, and the process group (only when ``WORLD_SIZE > 1``).

Every rank resolves and sorts the same slide list and takes ``slides[rank::world_size]``, so
no two ranks write the same file; ranks meet only at the end, to gather their summaries.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from .config import ExtractionConfigError
from .summary import ExtractionSummary

__all__ = ["Ranks", "gather_summaries", "process_group", "ranks_from_env", "resolve_device"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in a ``torchrun`` job (``world_size == 1`` without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def ranks_from_env() -> Ranks:
    """Rank layout from ``torchrun``'s ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

    Raises:
        ExtractionConfigError: a variable that is not an integer.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as error:
        raise ExtractionConfigError(f"bad RANK/WORLD_SIZE/LOCAL_RANK environment: {error}",
                                    "environment") from error
    return Ranks(rank=rank, world_size=max(1, world), local_rank=local)


def resolve_device(device: str | torch.device, ranks: Ranks) -> torch.device:
    """``device`` checked (CUDA present, index visible); ``cuda:LOCAL_RANK`` under torchrun.

    Raises:
        ExtractionConfigError: not a device, or CUDA asked for but not there
            (``.argument == "device"``).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ExtractionConfigError(f"device={device!r} is not a device (cpu, cuda, cuda:N): "
                                    f"{error}", "device") from error
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ExtractionConfigError(f"device={str(device)!r}: CUDA is not available", "device")
    if ranks.world_size > 1:
        dev = torch.device("cuda", ranks.local_rank)  # one GPU per torchrun process
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ExtractionConfigError(f"device={str(dev)!r}: only {torch.cuda.device_count()} "
                                    f"CUDA device(s) visible", "device")
    dev = torch.device("cuda", index)
    torch.cuda.set_device(dev)
    return dev


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Start the process group for the block when ``world_size > 1`` and none exists (NCCL on
    CUDA, gloo otherwise); destroy it afterwards if this call started it."""
    import torch.distributed as dist

    created = False
    if ranks.world_size > 1 and not dist.is_initialized():
        # Ranks meet only at the end, after their share of slides: a share can take hours.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(hours=72))
        created = True
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def gather_summaries(summary: ExtractionSummary, ranks: Ranks) -> ExtractionSummary:
    """Wait for every rank, then combine their summaries (every rank gets the whole one)."""
    if ranks.world_size <= 1:
        return summary
    import torch.distributed as dist

    dist.barrier()
    parts: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(parts, summary)
    return ExtractionSummary.merge(parts)
