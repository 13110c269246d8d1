"""The decode-once reader (:mod:`equivit_plugin.features.reader`) and the run's loader
(:mod:`equivit_plugin.features.loader`): regions equal TIAToolbox's reads, each stored tile is
decoded once, the work items of a slide are dealt to the workers in bands, and the pipeline's
features on a 40x slide equal a forward pass on the regions read back from the coords."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from tiatoolbox.wsicore.wsireader import WSIReader

from equivit_plugin.features import extract_features, open_slide, read_features, tile_grid
from equivit_plugin.features.config import ExtractionConfig, default_workers
from equivit_plugin.features.demo import write_aperio_svs
from equivit_plugin.features.h5 import FeatureWriter
from equivit_plugin.features.loader import make_loader, received, slide_chunks
from equivit_plugin.features.reader import (
    RegionReader,
    decoder_for,
    open_tiles,
    plan_read,
    read_as_embedded,
    resize_regions,
)
from equivit_plugin.models import load_model, normalise_tile
from equivit_plugin.utils.demo_data import demo_he_image

DATA = Path(os.environ.get("EQUIVIT_DATA", Path(__file__).resolve().parents[2] / "shared"
                           / "data"))
SVS_20X = DATA / "slides" / "CMU-1-Small-Region.svs"
TINY = "equivit_ric_tiny_patch16_224"


@pytest.fixture(scope="module")
def svs_40x(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40x Aperio-layout slide (0.25 um/px, JPEG 240 px tiles, levels 1x and 4x) of real
    tissue: TIAToolbox's H&E image and the shared 20x slide side by side."""
    he = demo_he_image()
    scan = WSIReader.open(SVS_20X).read_bounds((0, 0, 1000, 1000), resolution=0,
                                               units="level")[..., :3]
    row = np.concatenate([he, scan, he[::-1]], axis=1)
    image = np.concatenate([row, row[::-1, ::-1]], axis=0)  # 2000 x 3000 px
    return write_aperio_svs(np.ascontiguousarray(image), 0.25,
                            tmp_path_factory.mktemp("svs") / "slide_40x.svs",
                            smallest_level=800)


def _grid(path: Path, size: int = 224, context: int | None = None):
    opened = open_slide(path)
    return opened, tile_grid(opened, target_mpp=0.5, patch_size=size, stride=size,
                             context_size=context)


@pytest.mark.parametrize("decoder", ["openslide", "tifffile"])
def test_regions_equal_tiatoolbox_reads_and_each_stored_tile_is_decoded_once(
        decoder: str) -> None:
    opened, grid = _grid(SVS_20X, context=320)  # contexts reach past the slide's border
    plan = plan_read(opened.reader, grid.context_size, 0.5)
    level0 = grid.coords - grid.context_margin_level0
    corners = plan.corners(level0)
    source = open_tiles(opened.reader, SVS_20X, plan, decoder)
    reader = RegionReader(opened.reader, plan, source)
    regions = reader.regions(corners)
    assert regions.shape == (len(corners), plan.read_size, plan.read_size, 3)
    for row in range(len(corners)):
        expected = opened.reader.read_rect(location=tuple(int(v) for v in level0[row]),
                                           size=(plan.read_size,) * 2,
                                           resolution=plan.level, units="level")[..., :3]
        np.testing.assert_array_equal(regions[row], expected, err_msg=f"region {row}")
    tw, th = source.tile_size
    width, height = plan.level_dimensions
    touched = {(r, c) for x, y in corners
               if x >= 0 and y >= 0 and x + plan.read_size <= width
               and y + plan.read_size <= height
               for r in range(y // th, (y + plan.read_size - 1) // th + 1)
               for c in range(x // tw, (x + plan.read_size - 1) // tw + 1)}
    assert reader.decoded == len(touched)  # once each, the regions read in grid order


def test_tifffile_and_openslide_decode_the_same_pixels() -> None:
    opened, grid = _grid(SVS_20X)
    plan = plan_read(opened.reader, 224, 0.5)
    corners = plan.corners(grid.coords)
    read = {d: RegionReader(opened.reader, plan, open_tiles(opened.reader, SVS_20X, plan, d))
            .regions(corners) for d in ("openslide", "tifffile")}
    np.testing.assert_array_equal(read["openslide"], read["tifffile"])


def test_decoder_choice_follows_tiatoolbox_and_refuses_a_mismatch(tmp_path: Path) -> None:
    svs = WSIReader.open(SVS_20X)
    assert decoder_for(svs) == "openslide"
    assert decoder_for(svs, "tifffile") == "tifffile"
    png = tmp_path / "tile.png"
    cv2.imwrite(str(png), np.full((300, 300, 3), 200, np.uint8))
    plain = WSIReader.open(png, mpp=(0.5, 0.5))
    assert decoder_for(plain) == "rect"
    with pytest.raises(ValueError, match="decoder='openslide'"):
        decoder_for(plain, "openslide")
    with pytest.raises(ValueError, match="decoder must be one of"):
        decoder_for(svs, "pyvips")


@pytest.mark.parametrize("size_in,size_out", [(448, 224), (321, 320), (500, 224)])
def test_device_resize_is_opencv_area_in_floating_point(size_in: int, size_out: int) -> None:
    image = np.random.default_rng(size_in).integers(0, 256, (size_in, size_in, 3), np.uint8)
    expected = cv2.resize(image, (size_out, size_out), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    out = resize_regions(x, size_out)[0].permute(1, 2, 0).numpy()
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() <= 0.5 + 1e-3  # OpenCV rounds to uint8
    assert resize_regions(x, size_in) is x


def test_chunks_are_dealt_to_workers_in_bands_of_consecutive_rows() -> None:
    opened, grid = _grid(SVS_20X)
    plan = plan_read(opened.reader, 224, 0.5)
    for workers in (0, 1, 2, 3):
        items = slide_chunks(7, SVS_20X, None, "openslide", plan, grid.coords, workers,
                             chunk_tiles=4)
        bands = max(1, workers)
        assert len(items) % bands == 0 and {i.slide for i in items} == {7}
        rows = np.concatenate([np.arange(i.start, i.start + len(i.corners)) for i in items])
        assert sorted(rows.tolist()) == list(range(len(grid.coords)))  # each tile once
        for w in range(bands):  # worker w's items: consecutive, in grid order
            starts = [i.start for i in items[w::bands] if len(i.corners)]
            assert starts == sorted(starts)
        for item in items:  # one grid row per item, at most chunk_tiles regions
            assert len(item.corners) <= 4 and len(set(item.corners[:, 1].tolist())) <= 1


def test_one_loader_serves_several_slides_and_reports_a_bad_one(tmp_path: Path,
                                                                svs_40x: Path) -> None:
    broken = tmp_path / "broken.svs"
    broken.write_bytes(SVS_20X.read_bytes()[:400_000])  # header intact, tiles cut off
    items, expected = [], {}
    for seq, path in enumerate([SVS_20X, svs_40x, broken]):
        opened, grid = _grid(path if path != broken else SVS_20X)
        plan = plan_read(opened.reader, 224, 0.5)
        items += slide_chunks(seq, path, None, "openslide", plan, grid.coords, 2)
        if path != broken:
            expected[seq] = [opened.reader.read_rect(
                location=tuple(int(v) for v in xy), size=(plan.read_size,) * 2,
                resolution=plan.level, units="level")[..., :3] for xy in grid.coords]
    errors, seen = set(), []
    loader = make_loader(lambda: items * 3, workers=2, pin_memory=False)  # buffers reused
    for item in loader:
        if item["error"]:
            errors.add(item["slide"])
            continue
        regions = received(loader, item)  # a copy: the worker's buffer goes back
        seen.append(item["buffer"])
        for k, region in enumerate(regions.numpy()):
            if item["slide"] in expected:
                np.testing.assert_array_equal(region, expected[item["slide"]][item["start"] + k])
    assert errors == {2}
    assert max(seen) < loader.prefetch_factor + 2  # each worker cycled through its own pool


def test_pipeline_on_a_40x_slide_embeds_the_regions_read_back_from_its_coords(
        tmp_path: Path, svs_40x: Path) -> None:
    summary = extract_features([svs_40x], tmp_path, model=TINY, workers=2, batch_size=16,
                               print_summary=False)
    assert summary.ok and summary.n_patches > 15
    features, coords, attrs = read_features(tmp_path / "h5_files" / "slide_40x.h5")
    assert attrs["patch_size_level0"] == 448 and attrs["level0_mpp"] == pytest.approx(0.25)
    reader = WSIReader.open(svs_40x)
    embedded = np.stack([read_as_embedded(reader, xy, 224, 0.5) for xy in coords])
    for row in (0, len(coords) // 2, len(coords) - 1):  # within OpenCV's rounding of read_rect
        tia = reader.read_rect(location=tuple(int(v) for v in coords[row]), size=(224, 224),
                               resolution=0.5, units="mpp")
        assert np.abs(embedded[row] - tia).max() <= 0.5 + 1e-3
    net, _ = load_model(TINY, num_classes=0, seed=0)
    x = torch.from_numpy(np.stack([normalise_tile(e) for e in embedded])).permute(0, 3, 1, 2)
    with torch.no_grad():
        direct = net.eval().forward_head(net.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_allclose(features, direct, atol=1e-5, rtol=1e-5)
    # the same with the tifffile decoder and without workers
    again = extract_features([svs_40x], tmp_path / "tifffile", model=TINY, workers=0,
                             decoder="tifffile", print_summary=False)
    assert again.ok
    other, other_coords, _ = read_features(tmp_path / "tifffile" / "h5_files" / "slide_40x.h5")
    np.testing.assert_array_equal(other_coords, coords)
    np.testing.assert_allclose(other, features, atol=1e-5, rtol=1e-5)


def test_writer_puts_rows_delivered_out_of_order_in_place(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    features = np.arange(20, dtype=np.float32).reshape(10, 2)
    coords = np.arange(20, dtype=np.int64).reshape(10, 2) * 7
    with FeatureWriter(path, 2) as writer:
        for rows in ([5, 6, 7], [0, 1], [9, 8], [2, 3, 4]):
            writer.write_rows(np.asarray(rows), features[rows], coords[rows])
        assert writer.n == 10
        writer.commit()
    got, got_coords, _ = read_features(path)
    np.testing.assert_array_equal(got, features)
    np.testing.assert_array_equal(got_coords, coords)


def test_default_workers_follow_the_device_and_the_cores(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers("cuda") == 15 and default_workers("cpu") == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: four GPUs share the node
    assert default_workers("cuda:0") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert default_workers("cpu") == 0
    config = ExtractionConfig(slides=[SVS_20X], out_dir=tmp_path, device="cpu")
    assert config.workers == 0 and config.decoder == "auto"


def test_distillation_targets_of_slide_tiles_are_read_as_the_pipeline_reads(
        tmp_path: Path, svs_40x: Path) -> None:
    """Teacher targets of slide tiles come through the decode-once loader: each equals an
    independent D4 average of the teacher on the centre of its context read back with
    ``read_as_embedded`` (a 40x slide: level 0 read, halved on the device)."""
    import copy

    from equivit_plugin.distill import collect_tiles
    from equivit_plugin.distill.targets import targets_fingerprint, teacher_targets
    from equivit_plugin.models import IMAGENET_MEAN, IMAGENET_STD, pooled_embedding

    teacher, info = load_model("vit_tiny_patch16_224", num_classes=0, seed=0)
    tiles = collect_tiles(224, slides=[svs_40x], stride=448, min_tissue=0.5)
    assert len(tiles) >= 4
    targets = teacher_targets(teacher.eval(), info, tiles, tmp_path / "t.h5",
                              fingerprint=targets_fingerprint(info, tiles), mean=IMAGENET_MEAN,
                              std=IMAGENET_STD, num_workers=1)
    assert targets.readable.all()
    reader = WSIReader.open(svs_40x)
    reference_net = copy.deepcopy(teacher).double().eval()
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    for index in range(len(tiles)):
        context = read_as_embedded(reader, tiles.context_xy[index], 448, 0.5)
        tile = context[112:336, 112:336].astype(np.float64)
        views = []
        for k in range(4):
            turned = np.rot90(tile, k, axes=(0, 1))
            views += [turned, turned[:, ::-1]]
        x = torch.from_numpy(np.stack(views) / 255.0).permute(0, 3, 1, 2)
        with torch.no_grad():
            reference = pooled_embedding(reference_net, (x - mean) / std).mean(0).numpy()
        np.testing.assert_allclose(targets.values[index], reference, atol=2e-5, rtol=1e-4)


def test_tifffile_decoder_on_a_slide_that_is_not_a_tiff_fails_that_slide_alone(
        tmp_path: Path) -> None:
    png = tmp_path / "plain.png"
    cv2.imwrite(str(png), demo_he_image()[:448, :448, ::-1])
    summary = extract_features([png, SVS_20X], tmp_path / "out", model=TINY, slide_mpp=0.5,
                               decoder="tifffile", workers=0, print_summary=False)
    assert [Path(p).name for p in summary.done] == [SVS_20X.name]
    (failed,) = summary.failed
    assert "decoder='tifffile'" in failed[1] and "plain.png" in failed[0]


def test_an_unknown_decoder_is_refused_naming_the_argument(tmp_path: Path) -> None:
    from equivit_plugin.features import ExtractionConfigError

    with pytest.raises(ExtractionConfigError, match=r"decoder= must be one of") as error:
        ExtractionConfig(slides=[SVS_20X], out_dir=tmp_path, decoder="pyvips")
    assert error.value.argument == "decoder"
