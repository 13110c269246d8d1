"""Distillation views made on the device, batched: ``batched_region_views`` equals the per-view
``region_views`` (+ mirror) at any angle and bitwise on the 90-degree grid, the dataset draws
the same view parameters as before, and the images that reach the network through the
engines' ``prepare_batch`` equal the old CPU path's normalised views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator
from tiatoolbox.data import stain_norm_target
from torch.utils.data import DataLoader

from equivit_plugin.distill import DistillationViews, DistillTiles, collect_tiles
from equivit_plugin.distill.views import random_view
from equivit_plugin.equivariance import batched_region_views, region_views
from equivit_plugin.models import IMAGENET_MEAN, IMAGENET_STD

TILE = 224


@pytest.fixture(scope="module")
def contexts() -> torch.Tensor:
    """Eight real H&E ``2T`` contexts, ``(8, 3, 448, 448)`` uint8, cut from TIAToolbox's
    1000 x 1000 stain-normalisation target at spread-out corners."""
    image = torch.from_numpy(np.ascontiguousarray(stain_norm_target())).permute(2, 0, 1)
    corners = [(0, 0), (552, 0), (0, 552), (552, 552), (276, 276), (100, 400), (400, 100),
               (300, 500)]
    return torch.stack([image[:, y:y + 2 * TILE, x:x + 2 * TILE] for x, y in corners])


def _per_view(regions: torch.Tensor, angles: np.ndarray, shifts: np.ndarray,
              mirror: np.ndarray) -> torch.Tensor:
    """The reference: ``region_views`` one view at a time, mirrored with ``flip(-1)``."""
    views = []
    for n in range(len(angles)):
        view = region_views(regions[n:n + 1], float(angles[n]), TILE,
                            (int(shifts[n, 0]), int(shifts[n, 1])))[0]
        views.append(view.flip(-1) if mirror[n] else view)
    return torch.stack(views)


def _random_parameters(count: int, seed: int, max_shift: int = 8
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    draws = [random_view(rng, max_shift) for _ in range(count)]
    angles = np.array([d[0] for d in draws])
    shifts = np.array([(d[1], d[2]) for d in draws], dtype=np.int64)
    mirror = np.array([d[3] for d in draws])
    mirror[:2] = (True, False)  # both kinds in every batch
    return angles, shifts, mirror


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_batched_views_equal_per_view_region_views(contexts: torch.Tensor, dtype: torch.dtype,
                                                   atol: float) -> None:
    regions = contexts.to(dtype) / 255
    angles, shifts, mirror = _random_parameters(len(regions), seed=1)
    assert not (angles % 90 == 0).any()  # all off the grid: the grid_sample path
    got = batched_region_views(regions, torch.from_numpy(angles), torch.from_numpy(shifts),
                               torch.from_numpy(mirror), TILE)
    assert got.shape == (8, 3, TILE, TILE) and got.dtype == dtype
    expected = _per_view(regions, angles, shifts, mirror)
    assert (got - expected).abs().max().item() < atol
    # The parameters matter: each view is its own, not a neighbour's or its mirror image.
    assert (got[0] - expected[0].flip(-1)).abs().max() > 0.1
    assert (got[2] - regions[2, :, 112:336, 112:336]).abs().max() > 0.1
    # Sequences are accepted as well as tensors, and the same values come out.
    again = batched_region_views(regions, angles.tolist(), shifts.tolist(), mirror.tolist(),
                                 TILE)
    assert torch.equal(again, got)


def test_batched_views_from_uint8_equal_the_scaled_float_views(contexts: torch.Tensor) -> None:
    angles, shifts, mirror = _random_parameters(len(contexts), seed=2)
    angles[3] = 180.0  # one exact view in the batch
    # Channels last, as the DataLoader hands the contexts over (a permuted view, no copy).
    channels_last = contexts.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    got = batched_region_views(channels_last, angles, shifts, mirror, TILE)
    assert got.dtype == torch.float32
    expected = _per_view(contexts.double() / 255, angles, shifts, mirror)
    assert (got.double() / 255 - expected).abs().max().item() < 1e-5
    exact = _per_view(contexts[3:4], angles[3:4], shifts[3:4], mirror[3:4])  # uint8 rot90
    assert torch.equal(got[3], exact[0].float())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_views_are_bitwise_rot90_crops_on_the_grid(contexts: torch.Tensor,
                                                           dtype: torch.dtype) -> None:
    regions = contexts.to(dtype) / 255
    # Exact angles (any sign, any number of turns) mixed with off-grid ones in one batch, with
    # shifts larger than an off-grid view may have (a permutation never reads padding).
    angles = np.array([0.0, 90.0, 180.0, 270.0, -90.0, 450.0, 33.3, 301.7])
    shifts = np.array([(5, -3), (-8, 8), (0, 7), (60, -100), (1, 1), (-2, 0), (4, -4),
                       (0, 0)])
    mirror = np.array([False, True, False, True, True, False, True, False])
    got = batched_region_views(regions, angles, shifts, mirror, TILE)
    expected = _per_view(regions, angles, shifts, mirror)
    for n in range(6):
        assert torch.equal(got[n], expected[n]), angles[n]
    assert (got[6:] - expected[6:]).abs().max().item() < 1e-4
    # 90 really is rot90 of the region, then the crop and the mirror (independent of
    # region_views).
    x0, y0 = 112 - 8, 112 + 8
    turned = torch.rot90(regions[1], 1, dims=(-2, -1))[:, y0:y0 + TILE, x0:x0 + TILE]
    assert torch.equal(got[1], turned.flip(-1))
    # An all-exact batch takes the gather alone.
    only = batched_region_views(regions[:4], angles[:4], shifts[:4], mirror[:4], TILE)
    assert torch.equal(only, expected[:4])


def test_out_of_range_shifts_are_refused(contexts: torch.Tensor) -> None:
    regions = contexts[:2].float() / 255
    mirror = [False, True]
    with pytest.raises(ValueError, match=r"crop shifted by \(0, 113\) px leaves the 448 px "
                                         r"region \(view 1\)"):
        batched_region_views(regions, [0.0, 90.0], [(0, 0), (0, 113)], mirror, TILE)
    # 47 px is past largest_shift(224) = 46: turned by 45 degrees the crop would read padding.
    with pytest.raises(ValueError, match="would bring padding"):
        batched_region_views(regions, [10.0, 45.0], [(0, 0), (47, 47)], mirror, TILE)
    with pytest.raises(ValueError, match="would bring padding"):  # the per-view rule agrees
        region_views(regions[1:], 45.0, TILE, (47, 47))
    # On the grid the same shift only permutes pixels, as region_views allows.
    batched_region_views(regions, [0.0, 90.0], [(0, 0), (47, 47)], mirror, TILE)
    with pytest.raises(ValueError, match="cannot be centred"):
        batched_region_views(regions, [0.0, 0.0], [(0, 0), (0, 0)], mirror, TILE + 1)
    with pytest.raises(ValueError, match="shifts of shape"):
        batched_region_views(regions, [0.0, 0.0], [(0, 0)], mirror, TILE)


# ------------------------------------------------------------------------------ the dataset


@pytest.fixture()
def tiles(shared_data: Path) -> DistillTiles:
    return collect_tiles(TILE, tiles=[shared_data / "crc_tiles"])


def _old_view(context: np.ndarray, angle: float, dx: int, dy: int,
              mirror: bool) -> torch.Tensor:
    """The old CPU path of ``DistillationViews``, one view: float, region_views, mirror,
    normalise."""
    x = torch.from_numpy(np.ascontiguousarray(context)).permute(2, 0, 1).unsqueeze(0)
    view = region_views(x.float().div_(255.0), angle, TILE, (dx, dy))[0]
    view = view.flip(-1) if mirror else view
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return (view - mean) / std


class _Recorder(torch.nn.Module):
    """Keeps every input it is given; answers zeros of the target width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return x.new_zeros(x.shape[0], self.width)


def test_dataset_draws_the_same_views_and_the_network_gets_the_old_images(
        tiles: DistillTiles) -> None:
    rows = [0, 3, 5, 9, 11]
    targets = np.random.default_rng(0).normal(size=(len(tiles), 4)).astype(np.float32)
    views = DistillationViews(tiles, targets, rows, max_shift=8, mean=IMAGENET_MEAN,
                              std=IMAGENET_STD, fixed_seed=7)
    drawn = []
    for item, index in enumerate(rows):
        sample = views[item]
        angle, dx, dy, mirror = random_view(np.random.default_rng([7, index]), 8)
        assert sample["angle"].dtype == torch.float64 and sample["angle"].item() == angle
        assert sample["shift"].tolist() == [dx, dy]
        assert sample["mirror"].item() is mirror
        assert sample["context"].dtype == torch.uint8
        assert torch.equal(sample["context"], torch.from_numpy(tiles.context(index)))
        np.testing.assert_array_equal(sample["label"].numpy(), targets[index])
        assert views[item]["angle"].item() == angle  # validation: fixed per tile
        drawn.append((angle, dx, dy, mirror))
    assert len({d[0] for d in drawn}) == len(rows)

    # Through MONAI's evaluator, exactly as distill() wires it: the images the network sees.
    network = _Recorder(targets.shape[1])
    evaluator = SupervisedEvaluator(device=torch.device("cpu"),
                                    val_data_loader=DataLoader(views, batch_size=2),
                                    network=network, prepare_batch=views.prepare_batch(),
                                    non_blocking=True)
    labels: list[torch.Tensor] = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED,  # outputs are decollated
                                lambda engine: labels.extend(o["label"]
                                                             for o in engine.state.output))
    evaluator.run()
    seen = torch.cat(network.seen)
    assert seen.shape == (len(rows), 3, TILE, TILE) and seen.dtype == torch.float32
    expected = torch.stack([_old_view(tiles.context(index), *view)
                            for index, view in zip(rows, drawn)])
    assert (seen - expected).abs().max().item() < 1e-4
    np.testing.assert_array_equal(torch.stack(labels).numpy(), targets[rows])


def test_training_views_follow_torch_seeding_as_before(tiles: DistillTiles) -> None:
    targets = np.zeros((len(tiles), 2), dtype=np.float32)
    views = DistillationViews(tiles, targets, [1, 2], max_shift=8, mean=IMAGENET_MEAN,
                              std=IMAGENET_STD)
    torch.manual_seed(11)
    got = [views[0], views[0], views[1]]
    torch.manual_seed(11)
    for sample in got:  # the old rule: a generator seeded from torch's at every access
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        angle, dx, dy, mirror = random_view(rng, 8)
        assert (sample["angle"].item(), *sample["shift"].tolist(), sample["mirror"].item()) \
            == (angle, dx, dy, mirror)
    assert got[0]["angle"].item() != got[1]["angle"].item()  # fresh per access
