"""The rotation report (equivit_plugin.robustness) on the real 20x slide, checked against
independent computations: a numpy bilinear rotation, a direct timm forward and a brute-force
mutual-kNN. Small models (112 px inputs), few regions and angles keep it quick on a CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch

from equivit_plugin.cli import main
from equivit_plugin.equivariance import region_views
from equivit_plugin.features import RandomWeightsWarning
from equivit_plugin.models import load_model
from equivit_plugin.robustness import (
    REPORT_JSON,
    REPORT_PNG,
    Regions,
    RotationReportError,
    TileRegions,
    rotation_report,
    rotation_report_figure,
    sample_regions,
    spread_quota,
    tile_regions,
)

TILE = 112
N_REGIONS = 16
K = 3


@pytest.fixture(scope="module")
def slide(shared_data: Path) -> Path:
    return shared_data / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def regions(slide: Path) -> Regions:
    return sample_regions(slide, tile_size=TILE, n_regions=N_REGIONS, seed=0)


@pytest.fixture(scope="module")
def crc_tiles(shared_data: Path) -> TileRegions:
    # Read for 224 px models: a 112 px model's 2T region is then the 224 px tile itself.
    return tile_regions(shared_data / "crc_tiles", tile_size=224, n_regions=6, seed=0)


@pytest.fixture(scope="module")
def vit() -> tuple:
    return load_model("vit_tiny_patch16_224", seed=0, img_size=TILE)


@pytest.fixture(scope="module")
def equivit_ri() -> tuple:
    return load_model("equivit_ri_tiny_patch16_224", seed=0, img_size=TILE)


# --- independent references -------------------------------------------------------------


def rotated_crop(image: np.ndarray, angle: float, tile: int) -> np.ndarray:
    """The central ``tile x tile`` of ``(C, S, S)`` rotated counter-clockwise as displayed
    about ``((S-1)/2, (S-1)/2)``.

    Each output pixel is mapped back to where it came from: in displayed coordinates (x
    right, y up) the rotation sends p to R(angle) p, so the output at p reads the input at
    R(-angle) p, interpolated bilinearly from its four neighbours."""
    size = image.shape[-1]
    centre, start = (size - 1) / 2, (size - tile) // 2
    rows, cols = np.mgrid[start:start + tile, start:start + tile].astype(np.float64)
    x, y = cols - centre, centre - rows  # displayed coordinates, y up
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    x_in, y_in = cos * x + sin * y, -sin * x + cos * y
    col, row = centre + x_in, centre - y_in
    for where in (col, row):  # every source point inside the region: no padding is read
        assert where.min() > -1e-9 and where.max() < size - 1 + 1e-9
    c0 = np.clip(np.floor(col).astype(int), 0, size - 2)
    r0 = np.clip(np.floor(row).astype(int), 0, size - 2)
    fc, fr = col - c0, row - r0
    img = image.astype(np.float64)
    return ((1 - fr) * (1 - fc) * img[:, r0, c0] + (1 - fr) * fc * img[:, r0, c0 + 1]
            + fr * (1 - fc) * img[:, r0 + 1, c0] + fr * fc * img[:, r0 + 1, c0 + 1])


def crop(image: np.ndarray, tile: int, shift: int = 0) -> np.ndarray:
    start = (image.shape[-1] - tile) // 2 + shift
    return image[..., start:start + tile, start:start + tile]


def view(region: np.ndarray, angle: float, shift: int = 0) -> np.ndarray:
    """Independent view of one ``(C, 2T, 2T)`` float region."""
    tile = region.shape[-1] // 2
    if angle % 90:
        assert shift == 0
        return rotated_crop(region, angle, tile)
    return crop(np.rot90(region, int(angle // 90), axes=(1, 2)), tile, shift)


def brute_mutual_knn(a: np.ndarray, b: np.ndarray, k: int) -> float:
    def cosine(u: np.ndarray, v: np.ndarray) -> float:
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    def neighbours(x: np.ndarray, i: int) -> set[int]:
        others = sorted((j for j in range(len(x)) if j != i),
                        key=lambda j: -cosine(x[i], x[j]))
        return set(others[:k])

    return float(np.mean([len(neighbours(a, i) & neighbours(b, i)) / k
                          for i in range(len(a))]))


def direct_features(net: torch.nn.Module, views: np.ndarray) -> np.ndarray:
    config = timm.data.resolve_data_config({}, model=net)
    mean = np.asarray(config["mean"]).reshape(1, 3, 1, 1)
    std = np.asarray(config["std"]).reshape(1, 3, 1, 1)
    x = torch.from_numpy(((views - mean) / std).astype(np.float32))
    with torch.inference_mode():
        return net.forward_head(net.forward_features(x), pre_logits=True).double().numpy()


def float_regions(regions: Regions | TileRegions, count: int | None = None) -> np.ndarray:
    pixels = regions.read(TILE)[:count]
    return pixels.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)


# --- tests --------------------------------------------------------------------------------


def test_regions_are_tissue_read_around_their_centres(regions: Regions, slide: Path) -> None:
    from tiatoolbox.wsicore.wsireader import WSIReader

    assert len(regions) == N_REGIONS and regions.slide_names == [slide.stem] * N_REGIONS
    pixels = regions.read(TILE)
    assert pixels.shape == (N_REGIONS, 2 * TILE, 2 * TILE, 3) and pixels.dtype == np.uint8
    reader = WSIReader.open(str(slide))
    mpp = reader.info.mpp[0]
    for index in (0, N_REGIONS - 1):
        top_left = np.rint(regions.centres[index] - TILE * 0.5 / mpp).astype(int)
        direct = reader.read_rect(tuple(int(v) for v in top_left), (2 * TILE, 2 * TILE),
                                  resolution=0.5, units="mpp")
        np.testing.assert_array_equal(pixels[index], np.asarray(direct)[..., :3])
    # H&E, not glass: most pixels of every region are darker than background.
    assert (pixels.mean(axis=-1) < 220).mean(axis=(1, 2)).min() > 0.3
    # Smaller tiles read around the same centres: the middle of the big region.
    small = regions.read(TILE // 2)
    np.testing.assert_array_equal(small[0], pixels[0, TILE // 2:-(TILE // 2),
                                                   TILE // 2:-(TILE // 2)])
    with pytest.raises(ValueError, match="at most 112"):
        regions.read(2 * TILE)


def test_sampling_is_seeded_and_spread_over_slides(slide: Path, regions: Regions) -> None:
    again = sample_regions(slide, tile_size=TILE, n_regions=N_REGIONS, seed=0)
    other = sample_regions(slide, tile_size=TILE, n_regions=N_REGIONS, seed=1)
    np.testing.assert_array_equal(again.centres, regions.centres)
    assert not np.array_equal(other.centres, regions.centres)
    assert spread_quota([5, 0, 2, 10], 9) == [4, 0, 2, 3]
    assert spread_quota([5, 0, 2, 10], 100) == [5, 0, 2, 10]
    assert spread_quota([3, 3], 5) == [3, 2]


def test_region_stride_sets_how_far_apart_candidate_regions_are(slide: Path) -> None:
    disjoint = sample_regions(slide, tile_size=224, n_regions=1000, region_stride=2.0)
    overlapping = sample_regions(slide, tile_size=224, n_regions=1000)  # default 0.5
    assert 5 < disjoint.candidates[0] < overlapping.candidates[0] / 4
    steps = np.diff(np.unique(overlapping.centres[:, 0]))
    level0_step = 112 * 0.5 / 0.499  # 0.5 x 224 px at 0.5 um/px, in level-0 pixels
    assert np.abs(steps - level0_step).max() < 1.0


def test_region_views_match_an_independent_rotation(regions: Regions) -> None:
    batch = float_regions(regions, 2)
    x = torch.from_numpy(batch)
    for index in range(2):
        # The reference itself turns the right way: at 90 degrees it is rot90.
        np.testing.assert_allclose(rotated_crop(batch[index], 90, TILE),
                                   crop(np.rot90(batch[index], 1, axes=(1, 2)), TILE),
                                   atol=1e-9)
    for angle in (30, 345):
        expected = np.stack([view(b, angle) for b in batch])
        # In float64 the two agree to rounding; in float32 (what the report runs) up to the
        # float32 sampling grid (about 1e-4 px over a 224 px region).
        exact = region_views(x.double(), angle, TILE).numpy()
        np.testing.assert_allclose(exact, expected, atol=1e-9, rtol=0)
        got = region_views(x, angle, TILE).numpy()
        assert got.shape == (2, 3, TILE, TILE) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=3e-5, rtol=0)
        assert np.abs(got - crop(batch, TILE)).max() > 0.1  # it did turn
    for angle, shift in ((90, 0), (270, 0), (0, 4), (0, 8), (90, 4), (90, 8)):
        got = region_views(x, angle, TILE, shift).numpy()
        expected = np.stack([view(b, angle, shift) for b in batch])
        assert np.array_equal(got, expected), (angle, shift)
    with pytest.raises(ValueError, match="padding"):
        region_views(x, 30, 2 * TILE - 24)


def test_report_numbers_equal_an_independent_computation(regions: Regions, vit: tuple) -> None:
    net, info = vit
    with pytest.warns(RandomWeightsWarning, match="RANDOM"):
        report = rotation_report([(net, info)], regions, angles=[0, 30, 90], shifts=[4], k=K,
                                 batch_size=8, progress=False)
    record = report["models"][0]
    assert set(record["angles"]) == {"30", "90"} and set(record["shifts"]) == {"4", "4+rot90"}
    batch = float_regions(regions)
    reference = direct_features(net, np.stack([view(b, 0) for b in batch]))
    for group, key, angle, shift in (("angles", "30", 30, 0), ("angles", "90", 90, 0),
                                     ("shifts", "4", 0, 4), ("shifts", "4+rot90", 90, 4)):
        features = direct_features(net, np.stack([view(b, angle, shift) for b in batch]))
        cosines = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
                   for a, b in zip(reference, features)]
        got = record[group][key]
        assert got["mutual_knn"] == pytest.approx(brute_mutual_knn(reference, features, K),
                                                  abs=1e-9), key
        assert got["mean_cosine"] == pytest.approx(float(np.mean(cosines)), abs=1e-6), key
    summary = record["summary"]
    assert summary["grid90_mutual_knn"] == record["angles"]["90"]["mutual_knn"]
    assert summary["off_grid_mean_cosine"] == record["angles"]["30"]["mean_cosine"]
    assert summary["shift_4_rot90_mutual_knn"] == record["shifts"]["4+rot90"]["mutual_knn"]
    assert record["data_config"]["input_size"] == [3, TILE, TILE]
    assert record["random_weights"] is True
    assert any("RANDOM" in note for note in report["warnings"])


def test_tile_regions_are_each_tile_inside_its_mirror_image(crc_tiles: TileRegions,
                                                            shared_data: Path) -> None:
    from PIL import Image

    assert len(crc_tiles) == 6 and crc_tiles.found == 41
    assert crc_tiles.source_names == ["crc_tiles"] * 6 and crc_tiles.name == "crc_tiles"
    assert all(path.parent.parent == (shared_data / "crc_tiles").resolve()
               for path in crc_tiles.files)
    contexts, tiles = crc_tiles.read(), crc_tiles.read(TILE)
    assert contexts.shape == (6, 448, 448, 3) and tiles.shape == (6, 224, 224, 3)
    for row, path in enumerate(crc_tiles.files):
        tile = np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_array_equal(tiles[row], tile)  # 224 px tiles are not resized
        np.testing.assert_array_equal(contexts[row], np.pad(tile, ((112, 112), (112, 112),
                                                                   (0, 0)), mode="reflect"))
    again = tile_regions(shared_data / "crc_tiles", tile_size=224, n_regions=6, seed=0)
    assert again.files == crc_tiles.files
    assert tile_regions(shared_data / "crc_tiles", tile_size=224, n_regions=6,
                        seed=1).files != crc_tiles.files
    listed = tile_regions(list(crc_tiles.files), tile_size=224, name="listed")
    assert listed.files == crc_tiles.files and listed.name == "listed"
    with pytest.raises(RotationReportError, match="no such folder") as error:
        tile_regions(shared_data / "no_such_folder", tile_size=224)
    assert error.value.argument == "tiles"
    with pytest.raises(ValueError, match="at most 224"):
        crc_tiles.read(448)


@pytest.mark.parametrize(("call", "argument", "message"), [
    (lambda d: tile_regions(d / "empty", tile_size=224), "tiles", r"empty: no image files"),
    (lambda d: tile_regions([], tile_size=224), "tiles", "no tile files given"),
    (lambda d: tile_regions([d / "gone.png"], tile_size=224), "tiles", r"gone\.png: no such file"),
    (lambda d: tile_regions(d, tile_size=0), "tile_size", "tile_size= must be a positive"),
    (lambda d: tile_regions(d, tile_size=224, n_regions=0), "n_regions",
     "n_regions= must be a positive integer or None, got 0"),
])
def test_tile_regions_name_the_bad_argument(tmp_path: Path, call, argument: str,
                                            message: str) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RotationReportError, match=message) as error:
        call(tmp_path)
    assert error.value.argument == argument


@pytest.mark.filterwarnings("ignore::equivit_plugin.features.RandomWeightsWarning")
def test_region_sets_that_cannot_be_compared_are_refused(
        regions: Regions, crc_tiles: TileRegions, vit: tuple) -> None:
    coarse = tile_regions(list(crc_tiles.files), tile_size=224, target_mpp=1.0)
    large = load_model("vit_tiny_patch16_224", seed=0)
    for slides, models, message in (
            ([], [vit], "give slides, tiles= or regions to measure on"),
            ([regions, coarse], [vit], r"several resolutions \(\[0.5, 1.0\] um/px\)"),
            ([regions], [large], "sampled for tiles of 112 px, but a model takes 224 px")):
        with pytest.raises(RotationReportError, match=message) as error:
            rotation_report(models, slides, angles=[0, 90], shifts=[], k=K, progress=False)
        assert error.value.argument == "slides"


@pytest.mark.filterwarnings("ignore::equivit_plugin.features.RandomWeightsWarning")
def test_several_sources_are_measured_together_and_each_alone(
        regions: Regions, crc_tiles: TileRegions, vit: tuple) -> None:
    report = rotation_report([vit], [regions, crc_tiles], angles=[0, 30], shifts=[4], k=K,
                             batch_size=8, progress=False)
    record = report["models"][0]
    assert [s["name"] for s in report["sources"]] == ["CMU-1-Small-Region", "crc_tiles"]
    assert [s["kind"] for s in report["sources"]] == ["slide", "tiles"]
    assert report["n_regions"] == N_REGIONS + 6
    assert report["regions"]["source"] == ["CMU-1-Small-Region"] * N_REGIONS + ["crc_tiles"] * 6
    assert report["regions"]["file"][-6:] == [str(path) for path in crc_tiles.files]
    assert set(record["sources"]) == {"CMU-1-Small-Region", "crc_tiles"}
    # Every number against features computed directly: pooled over all regions, and
    # neighbours found within each source.
    net = vit[0]
    batch = np.concatenate([float_regions(regions), float_regions(crc_tiles)])
    reference = direct_features(net, np.stack([view(b, 0) for b in batch]))
    rows = {"CMU-1-Small-Region": slice(0, N_REGIONS), "crc_tiles": slice(N_REGIONS, None)}
    for group, key, angle, shift in (("angles", "30", 30, 0), ("shifts", "4", 0, 4)):
        features = direct_features(net, np.stack([view(b, angle, shift) for b in batch]))
        assert record[group][key]["mutual_knn"] == pytest.approx(
            brute_mutual_knn(reference, features, K), abs=1e-9)
        for name, part in rows.items():
            got = record["sources"][name]
            assert got["n_regions"] == len(reference[part])
            assert got[group][key]["mutual_knn"] == pytest.approx(
                brute_mutual_knn(reference[part], features[part], K), abs=1e-9), (name, key)
    alone = rotation_report([vit], regions, angles=[0, 30], shifts=[4], k=K, batch_size=8,
                            progress=False)["models"][0]
    assert "sources" not in alone  # one source: the pooled numbers are its numbers
    assert alone["angles"] == record["sources"]["CMU-1-Small-Region"]["angles"]
    # A source with no more than k regions counts in the pooled numbers only, with a note.
    few = tile_regions(list(crc_tiles.files[:K]), tile_size=224, name="few")
    report = rotation_report([vit], [regions, few], angles=[0, 30], shifts=[], k=K,
                             progress=False)
    assert set(report["models"][0]["sources"]) == {"CMU-1-Small-Region"}
    assert any(note.startswith(f"few: {K} regions") for note in report["warnings"])
    fig = rotation_report_figure(rotation_report(
        [vit], [regions, crc_tiles], angles=[0, 30], shifts=[4], k=K, progress=False))
    source_ax = fig.axes[3]
    heights = [patch.get_height() for patch in source_ax.patches]
    assert len(heights) == 4 and all(0 <= h <= 1 for h in heights)


@pytest.mark.filterwarnings("ignore::equivit_plugin.features.RandomWeightsWarning")
def test_invariant_model_scores_one_at_exact_turns_and_vit_does_not(
        regions: Regions, vit: tuple, equivit_ri: tuple) -> None:
    report = rotation_report([equivit_ri, vit], regions, angles=[0, 30, 90, 180, 270],
                             shifts=[], k=K, progress=False)
    ri, plain = report["models"]
    for angle in ("90", "180", "270"):
        assert ri["angles"][angle]["mutual_knn"] == 1.0
        assert ri["angles"][angle]["mean_cosine"] > 1 - 1e-5
    assert ri["summary"]["grid90_mutual_knn"] == 1.0
    # A plain ViT is not invariant to exact turns: the test can fail.
    assert plain["angles"]["90"]["mutual_knn"] < 1.0
    assert plain["angles"]["90"]["mean_cosine"] < 1 - 1e-3
    averaged = rotation_report([vit], regions, angles=[0, 90], shifts=[], k=K,
                               d4_average=True, progress=False)
    assert averaged["d4_average"] is True
    assert averaged["models"][0]["angles"]["90"]["mutual_knn"] == 1.0
    assert averaged["models"][0]["angles"]["90"]["mean_cosine"] > 1 - 1e-5


def test_cli_writes_json_and_plot_with_models_side_by_side(
        slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    code = main(["rotation-report", "--model", "vit_tiny_patch16_224", "--model",
                 "equivit_ri_tiny_patch16_224", str(slide), "--out", str(out), "--regions",
                 "6", "--k", "3", "--angle-step", "90", "--shifts", "4", "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"report: {out / REPORT_JSON}" in printed.out
    assert "vit_tiny_patch16_224" in printed.out and "kNN 90/180/270" in printed.out
    assert "RANDOM" in printed.err
    assert (out / REPORT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / REPORT_JSON).read_text())
    for key in ("version", "date", "k", "angles", "shifts", "target_mpp", "tile_sizes",
                "n_regions", "slides", "seed", "d4_average", "regions", "models", "warnings"):
        assert key in report, key
    assert report["k"] == 3 and report["angles"] == [0.0, 90.0, 180.0, 270.0]
    assert report["n_regions"] == 6 and len(report["regions"]["centres_level0"]) == 6
    assert [m["label"] for m in report["models"]] == ["vit_tiny_patch16_224",
                                                      "equivit_ri_tiny_patch16_224"]
    for model in report["models"]:
        assert set(model["angles"]) == {"90", "180", "270"}
        assert set(model["shifts"]) == {"4", "4+rot90"}
        assert {"grid90_mutual_knn", "off_grid_mutual_knn", "all_angles_mutual_knn",
                "grid90_mean_cosine", "shift_4_mutual_knn",
                "shift_4_rot90_mutual_knn"} <= set(model["summary"])
        assert model["summary"]["off_grid_mutual_knn"] is None  # every angle is on the grid
        assert model["tile_size"] == 224 and model["random_weights"] is True
    assert report["models"][1]["summary"]["grid90_mutual_knn"] == 1.0

    # The plot draws exactly the JSON's numbers.
    fig = rotation_report_figure(report)
    knn_ax, cos_ax, shift_ax = fig.axes[:3]
    for ax, metric in ((knn_ax, "mutual_knn"), (cos_ax, "mean_cosine")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        for model in report["models"]:
            line = lines[model["label"]]
            assert list(line.get_xdata()) == [90.0, 180.0, 270.0]
            assert list(line.get_ydata()) == [model["angles"][a][metric]
                                              for a in ("90", "180", "270")]
    bars = {container.get_label(): container for container in shift_ax.containers}
    for model in report["models"]:
        heights = [patch.get_height() for patch in bars[model["label"]]]
        assert heights == [model["shifts"][key]["mutual_knn"] for key in ("4", "4+rot90")]


def test_cli_measures_tile_folders_per_source(slide: Path, shared_data: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    code = main(["rotation-report", "--model", "vit_tiny_patch16_224", str(slide), "--tiles",
                 str(shared_data / "crc_tiles"), "--out", str(out), "--regions", "6", "--k",
                 "3", "--angle-step", "90", "--shifts", "4", "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    lines = printed.out.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    assert "source" in header.split()
    assert any(line.split()[0] == "vit_tiny_patch16_224" and line.split()[1] == "all"
               for line in lines)
    assert sum(line.split()[:1] in (["CMU-1-Small-Region"], ["crc_tiles"])
               for line in lines) == 2
    report = json.loads((out / REPORT_JSON).read_text())
    assert [s["name"] for s in report["sources"]] == ["CMU-1-Small-Region", "crc_tiles"]
    assert report["sources"][1]["regions"] == 6 and report["sources"][1]["tiles_found"] == 41
    code = main(["rotation-report", "--out", str(tmp_path / "none"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "give SLIDES, --tiles DIR or both" in err[0]


@pytest.mark.parametrize(("arguments", "expected"), [
    (["{missing}"], "no such file"),
    (["{slide}", "--tiles", "{missing}"], "--tiles"),
    (["{slide}", "--model", "not_a_model"], "--model 'not_a_model' is neither a foundation model"),
    (["{slide}", "--regions", "5", "--k", "5"], "--k 5 must be smaller than the number of "
                                                 "regions (--regions 5)"),
    (["{slide}", "--regions", "40", "--k", "20", "--region-stride", "2"],
     "--k 20 needs at least 21 regions"),
    (["{slide}", "--region-stride", "3"], "--region-stride must be at most 2"),
    (["{slide}", "--angle-step", "25"], "--angle-step must divide 360"),
    (["{slide}", "--shifts", "112"], "--shifts 112 px must be smaller than half the tile size"),
])
def test_bad_input_is_one_line_and_exit_code_2(arguments: list[str], expected: str,
                                               slide: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.svs"
    argv = [a.format(slide=slide, missing=missing) for a in arguments]
    if "--model" not in argv:
        argv += ["--model", "vit_tiny_patch16_224"]
    code = main(["rotation-report", "--out", str(tmp_path / "out"), "--no-progress", *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("equivit rotation-report: error: "), err
    assert expected in lines[0] and "Traceback" not in err
    if arguments[0] == "{missing}":
        assert str(missing) in lines[0]
