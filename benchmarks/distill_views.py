"""Distillation training views: the old per-view CPU path against the batched device path.

Side by side in one run, on real H&E (2T contexts cut from TIAToolbox's 1000 x 1000
stain-normalisation target), for the same view parameters (``random_view``):

* **old** (what ``DistillationViews.__getitem__`` did in the DataLoader workers, one view at a
  time): uint8 context -> float / 255 -> ``region_views`` (turn, shift, crop) -> mirror ->
  normalise, then the batch is stacked (the collate) and moved to the device.
* **new** (what a distillation run does now): the uint8 contexts are stacked as read (the
  collate), moved to the device non-blocking, and the engines' ``prepare_batch``
  (:class:`~equivit_plugin.distill.views.PrepareViews`) makes every view of the batch in one
  ``grid_sample`` and normalises it there.

Both produce the same normalised ``(B, 3, T, T)`` batch on the device (the largest difference
is reported). Batches alternate between the two paths so that drift hits both alike; one
warm-up batch each is not timed; CUDA is synchronised before every clock read. Reading the
tile (slide or file) is left out of both: it is the same work either way. On the CPU both
paths share the process's torch threads (``--threads 1``: what one DataLoader worker has);
on a shared machine, other processes' load moves the numbers, so compare within one run.

``measure_view_making`` has no side effects at import and is imported by other benchmarks
(``benchmarks/`` on ``sys.path``)::

    .venv/bin/python benchmarks/distill_views.py --quick      # CPU smoke run
    .venv/bin/python benchmarks/distill_views.py --device cuda
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["main", "measure_view_making", "render"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _tissue_contexts(tile_size: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` uint8 ``(2T, 2T, 3)`` contexts of real H&E at random places of TIAToolbox's
    stain-normalisation target (a 1000 x 1000 H&E image shipped with the package)."""
    from tiatoolbox.data import stain_norm_target

    image = np.asarray(stain_norm_target())
    side = 2 * tile_size
    height, width = image.shape[:2]
    if side > min(height, width):
        raise ValueError(f"a {side} px context does not fit the {width} x {height} px image")
    ys = rng.integers(0, height - side + 1, size=count)
    xs = rng.integers(0, width - side + 1, size=count)
    return [np.ascontiguousarray(image[y:y + side, x:x + side]) for y, x in zip(ys, xs)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_view_making(tile_size: int = 224, batch_size: int = 64, n_batches: int = 10,
                        device: str | torch.device = "cpu", max_shift: int = 8,
                        seed: int = 0, threads: int | None = None) -> dict[str, Any]:
    """Views/s of the old per-view CPU path and of the batched device path, measured together.

    Args:
        tile_size: the view side ``T`` (contexts are ``2T``).
        batch_size: views per batch.
        n_batches: timed batches per path (after one warm-up batch each).
        device: where the new path makes the views and where both batches end up.
        max_shift: largest view shift, px (a distillation run's default is 8).
        seed: view parameters and context placement.
        threads: torch CPU threads during the measurement (restored after); ``None``: as set.

    Returns:
        ``old_views_per_s``, ``new_views_per_s``, ``ratio`` (new / old), ``old_ms_per_view``,
        ``new_ms_per_batch`` with its ``new_host_ms_per_batch`` share (stack, pin on CUDA) and
        the rest (copy, views, normalise), ``max_abs_diff`` between the
        two paths' normalised batches, and the settings (device name, torch threads).
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(tile_size, batch_size, n_batches, torch.device(device), max_shift,
                        seed)
    finally:
        torch.set_num_threads(previous_threads)


def _measure(tile_size: int, batch_size: int, n_batches: int, device: torch.device,
             max_shift: int, seed: int) -> dict[str, Any]:
    from equivit_plugin.distill.views import PrepareViews, random_view
    from equivit_plugin.equivariance import region_views

    rng = np.random.default_rng(seed)
    pool = _tissue_contexts(tile_size, batch_size, rng)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    prepare = PrepareViews(tile_size, IMAGENET_MEAN, IMAGENET_STD)
    pin = device.type == "cuda"  # as the distillation DataLoaders do

    def old(contexts: Sequence[np.ndarray], views: Sequence[tuple]) -> torch.Tensor:
        batch = []
        for context, (angle, dx, dy, mirror) in zip(contexts, views):
            x = torch.from_numpy(context).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
            view = region_views(x, angle, tile_size, (dx, dy))[0]
            if mirror:
                view = view.flip(-1)
            batch.append((view - mean) / std)
        stacked = torch.stack(batch)
        return (stacked.pin_memory() if pin else stacked).to(device, non_blocking=True)

    def new(contexts: Sequence[np.ndarray], views: Sequence[tuple]) -> tuple[torch.Tensor,
                                                                             float]:
        stacked = torch.stack([torch.from_numpy(c) for c in contexts])  # the collate
        batch = {"context": stacked.pin_memory() if pin else stacked,
                 "angle": torch.tensor([v[0] for v in views], dtype=torch.float64),
                 "shift": torch.tensor([(v[1], v[2]) for v in views], dtype=torch.int64),
                 "mirror": torch.tensor([v[3] for v in views]),
                 "label": torch.zeros(len(views), 1)}
        host_done = time.perf_counter()
        images, _ = prepare(batch, device, non_blocking=True)
        return images, host_done

    times: dict[str, list[float]] = {"old": [], "new": [], "new_host": []}
    max_diff = 0.0
    for step in range(n_batches + 1):  # step 0: warm-up, not timed
        order = rng.permutation(batch_size)
        contexts = [pool[i] for i in order]
        views = [random_view(rng, max_shift) for _ in range(batch_size)]
        paths = ("old", "new") if step % 2 == 0 else ("new", "old")
        results = {}
        for path in paths:
            _sync(device)
            start = time.perf_counter()
            if path == "old":
                results[path] = old(contexts, views)
            else:
                results[path], host_done = new(contexts, views)
            _sync(device)
            if step:
                times[path].append(time.perf_counter() - start)
                if path == "new":
                    times["new_host"].append(host_done - start)
        max_diff = max(max_diff, float((results["old"] - results["new"]).abs().max()))
    views_timed = batch_size * n_batches
    old_s, new_s = sum(times["old"]), sum(times["new"])
    return {
        "tile_size": tile_size, "batch_size": batch_size, "n_batches": n_batches,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "old_views_per_s": views_timed / old_s,
        "new_views_per_s": views_timed / new_s,
        "ratio": old_s / new_s,
        "old_ms_per_view": 1000 * old_s / views_timed,
        "old_ms_per_batch": 1000 * old_s / n_batches,
        "new_ms_per_batch": 1000 * new_s / n_batches,
        "new_host_ms_per_batch": 1000 * sum(times["new_host"]) / n_batches,
        "max_abs_diff": max_diff,
    }


def render(result: dict[str, Any]) -> str:
    """A small markdown table of :func:`measure_view_making`'s result."""
    return "\n".join([
        f"Distillation views, {result['tile_size']} px from {2 * result['tile_size']} px real "
        f"H&E contexts, batches of {result['batch_size']} x {result['n_batches']}, device "
        f"{result['device']} ({result['device_name']}), {result['torch_threads']} torch "
        f"threads", "",
        "| path | views/s | ms per batch |",
        "|---|---|---|",
        f"| old: per view on the CPU (float, region_views, mirror, normalise) | "
        f"{result['old_views_per_s']:.0f} | {result['old_ms_per_batch']:.1f} |",
        f"| new: uint8 batch to {result['device']}, batched views, normalise | "
        f"{result['new_views_per_s']:.0f} | {result['new_ms_per_batch']:.1f} (host "
        f"{result['new_host_ms_per_batch']:.1f}) |",
        "",
        f"new / old: **{result['ratio']:.2f}x**; largest difference between the two batches: "
        f"{result['max_abs_diff']:.1e} (normalised units)",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="where the new path runs (cpu, cuda)")
    parser.add_argument("--quick", action="store_true", help="3 batches instead of 20")
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=None, help="timed batches per path")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: as set; 1 = one DataLoader worker)")
    args = parser.parse_args(argv)
    n_batches = args.batches or (3 if args.quick else 20)
    print(render(measure_view_making(args.tile_size, args.batch_size, n_batches,
                                     args.device, threads=args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
