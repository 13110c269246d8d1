"""Whole cells for MIL: the context an ``equivit_disc`` encoder embeds around each grid cell.

A model that sees only its inscribed disc leaves the corners of a 224 px cell out of its
feature; by default the pipeline embeds the 320 px region centred on each cell instead
(``extract_features(context=...)``, ``--context``), while ``coords`` stay the cells'. CPU,
real H&E (the CMU-1 slide and TIAToolbox's packaged image), one-block tiny models.
"""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("tiatoolbox")

from tiatoolbox import data as tia_data  # noqa: E402
from tiatoolbox.wsicore.wsireader import WSIReader  # noqa: E402

from equivit_plugin.cli import main  # noqa: E402
from equivit_plugin.features import (  # noqa: E402
    ExtractionConfigError,
    TileDataset,
    extract_features,
    open_slide,
    read_features,
    tile_grid,
)
from equivit_plugin.features.encoder import automatic_context  # noqa: E402
from equivit_plugin.features.reader import read_as_embedded  # noqa: E402
from equivit_plugin.models import (  # noqa: E402
    create_model,
    load_model,
    normalise_tile,
    save_checkpoint,
)

DISC_TINY = "equivit_disc_tiny_patch16_224"
RI_TINY = "equivit_ri_tiny_patch16_224"
P, C = 224, 320  # the cell, and the automatic context of a disc model around it
CORNER = 24  # corner squares of a 224 px cell that a 224 px disc model cannot see (measured)

pytestmark = pytest.mark.filterwarnings(
    "ignore::equivit_plugin.features.RandomWeightsWarning")


@pytest.fixture(scope="module")
def svs(shared_data: Path) -> Path:
    path = shared_data / "slides" / "CMU-1-Small-Region.svs"
    assert path.is_file(), f"missing {path}"
    return path


@pytest.fixture(scope="module")
def he_crop() -> np.ndarray:
    """A 672 x 672 crop (3 x 3 cells) of TIAToolbox's packaged real H&E image, uint8."""
    return np.ascontiguousarray(np.asarray(tia_data.stain_norm_target())[100:772, 150:822])


@pytest.fixture(scope="module")
def he_png(tmp_path_factory: pytest.TempPathFactory, he_crop: np.ndarray) -> Path:
    path = tmp_path_factory.mktemp("png") / "he.png"
    Image.fromarray(he_crop).save(path)
    return path


@pytest.fixture(scope="module")
def disc_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-block ``equivit_disc_tiny`` checkpoint built at 224 px (a stand-in for a student)."""
    torch.manual_seed(5)
    kwargs = {"depth": 1, "num_classes": 0, "img_size": P}
    net = create_model(DISC_TINY, 0, depth=1)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "disc.pt", net, DISC_TINY,
                           model_kwargs=kwargs)


def _png_run(png: Path, out: Path, model: str | Path, **kwargs) -> tuple[np.ndarray, dict]:
    summary = extract_features([png], out, model=model, slide_mpp=0.5, tissue_mask="none",
                               workers=0, print_summary=False, **kwargs)
    assert summary.ok, summary.failed
    features, _, attrs = read_features(out / "h5_files" / f"{png.stem}.h5")
    return features, attrs


# -- the automatic context -------------------------------------------------------------------
def test_automatic_context_circumscribes_the_cell_for_disc_models_only() -> None:
    disc = create_model(DISC_TINY, 0, depth=1)
    assert automatic_context(disc, 224) == 320 >= math.ceil(224 * math.sqrt(2))
    assert automatic_context(disc, 112) == 160 and automatic_context(disc, 96) == 144
    assert automatic_context(create_model(RI_TINY, 0, depth=1), 224) == 224
    assert automatic_context(create_model("vit_tiny_patch16_224", 0, depth=1), 224) == 224


# -- reading ---------------------------------------------------------------------------------
def test_context_read_equals_a_direct_tiatoolbox_read_of_the_centred_region(svs: Path) -> None:
    opened = open_slide(svs)
    grid = tile_grid(opened, target_mpp=0.5, patch_size=P, stride=P, tissue_mask="none",
                     context_size=C)
    margin = round((C - P) / 2 * 0.5 / opened.level0_mpp[0])  # 48 target px at 0.499 um/px
    assert grid.context_size == C and grid.context_margin_level0 == margin == 48
    plain = tile_grid(opened, target_mpp=0.5, patch_size=P, stride=P, tissue_mask="none")
    np.testing.assert_array_equal(grid.coords, plain.coords)  # the cells do not move
    rows = [0, 1, len(grid.coords) // 2, len(grid.coords) - 1]  # (0, 0): padded past the border
    assert tuple(grid.coords[0]) == (0, 0)
    dataset = TileDataset(opened, grid.coords, P, 0.5, context_size=C,
                          context_margin_level0=grid.context_margin_level0)
    reader = WSIReader.open(svs)
    for row in rows:
        x, y = (int(v) for v in grid.coords[row])
        direct = np.asarray(reader.read_rect(location=(x - margin, y - margin), size=(C, C),
                                             resolution=0.5, units="mpp"))[..., :3]
        np.testing.assert_array_equal(dataset[row].numpy(), direct)
    padded = dataset[0].numpy()[:40, :40].reshape(-1, 3)  # past the border: TIAToolbox's
    assert len(np.unique(padded, axis=0)) == 1              # padding (white here), one colour


def test_context_on_a_plain_image_is_the_centred_square(he_png: Path,
                                                       he_crop: np.ndarray) -> None:
    opened = open_slide(he_png, 0.5)  # 0.5 um/px at 0.5 um/px: level-0 pixels are the pixels
    grid = tile_grid(opened, target_mpp=0.5, patch_size=P, stride=P, tissue_mask="none",
                     context_size=C)
    dataset = TileDataset(opened, grid.coords, P, 0.5, context_size=C,
                          context_margin_level0=grid.context_margin_level0)
    cell = TileDataset(opened, grid.coords, P, 0.5)
    reader = WSIReader.open(he_png, mpp=(0.5, 0.5))
    m = (C - P) // 2
    centre = int(np.flatnonzero((grid.coords == (P, P)).all(1))[0])  # fully inside the image
    x, y = (int(v) for v in grid.coords[centre])
    bounds = np.asarray(reader.read_bounds((x - m, y - m, x - m + C, y - m + C), resolution=0,
                                           units="level"))[..., :3]
    region = dataset[centre].numpy()
    np.testing.assert_array_equal(region, bounds)
    np.testing.assert_array_equal(region, he_crop[y - m:y - m + C, x - m:x - m + C])
    for row in range(len(grid.coords)):  # the cell is the context's centre
        np.testing.assert_array_equal(dataset[row].numpy()[m:m + P, m:m + P],
                                      cell[row].numpy())


# -- the pipeline ----------------------------------------------------------------------------
def test_disc_features_equal_a_forward_pass_on_the_context_read_back_from_coords(
        tmp_path: Path, svs: Path, disc_ckpt: Path) -> None:
    summary = extract_features([svs], tmp_path, model=disc_ckpt, workers=1, batch_size=32,
                               print_summary=False)
    assert summary.ok and summary.n_patches > 50
    features, coords, attrs = read_features(tmp_path / "h5_files" / "CMU-1-Small-Region.h5")
    assert attrs["patch_size"] == P and attrs["context_size"] == C
    assert attrs["patch_size_level0"] == 224 and attrs["context_margin_level0"] == 48
    reader = WSIReader.open(svs)
    size, margin = attrs["context_size"], attrs["context_margin_level0"]
    # What was embedded, read back from the coords: TIAToolbox's read_rect, within the
    # rounding of its uint8 resize (this 0.499 um/px slide is read 321 px wide and resized).
    embedded = [read_as_embedded(reader, (int(x) - margin, int(y) - margin), size,
                                 attrs["target_mpp"]) for x, y in coords]
    width, height = reader.slide_dimensions(resolution=0, units="level")
    inside = [row for row, (x, y) in enumerate(coords)
              if x - margin >= 0 and y - margin >= 0 and x - margin + size + 2 <= width
              and y - margin + size + 2 <= height]
    # (at the slide's border read_rect resizes before compositing the transparent outside over
    # white, the pipeline after: the border pixel differs; the regions inside are compared)
    assert len(inside) > 10
    for row in inside[::7]:
        x, y = coords[row]
        tia = reader.read_rect(location=(int(x) - margin, int(y) - margin), size=(size, size),
                               resolution=attrs["target_mpp"], units="mpp")
        assert np.abs(embedded[row] - tia).max() <= 0.5 + 1e-3
    regions = np.stack([normalise_tile(e) for e in embedded])
    # The checkpoint was built at 224 px; its state dict loads unchanged with
    # dynamic_img_size, and at 224 px both builds agree.
    net, info = load_model(disc_ckpt, dynamic_img_size=True)
    fixed, _ = load_model(disc_ckpt)
    assert info.img_size == P
    batch = torch.from_numpy(regions).permute(0, 3, 1, 2)
    with torch.no_grad():
        direct = net.forward_head(net.forward_features(batch), pre_logits=True).numpy()
        cells = batch[:4, :, 48:272, 48:272].contiguous()
        torch.testing.assert_close(
            net.forward_head(net.forward_features(cells), pre_logits=True),
            fixed.forward_head(fixed.forward_features(cells), pre_logits=True))
    np.testing.assert_allclose(features, direct, atol=1e-5, rtol=1e-5)
    # The cells are today's: same coords as the cell-only run.
    today = extract_features([svs], tmp_path / "today", model=disc_ckpt, context=P,
                             workers=0, print_summary=False)
    assert today.ok
    _, today_coords, today_attrs = read_features(
        tmp_path / "today" / "h5_files" / "CMU-1-Small-Region.h5")
    np.testing.assert_array_equal(today_coords, coords)
    assert today_attrs["context_size"] == P and today_attrs["context_margin_level0"] == 0


def test_the_cell_corners_reach_the_features_only_with_the_context(
        tmp_path: Path, he_crop: np.ndarray, disc_ckpt: Path) -> None:
    """The probe of the fix: rewrite each cell's four CORNER x CORNER corners (inside the
    cell, outside what a 224 px disc model sees). Today's 224 px input gives the same features;
    the automatic 320 px context changes every cell's."""
    changed = he_crop.copy()
    for y0 in range(0, 672, P):
        for x0 in range(0, 672, P):
            for dy in (0, P - CORNER):
                for dx in (0, P - CORNER):
                    block = changed[y0 + dy:y0 + dy + CORNER, x0 + dx:x0 + dx + CORNER]
                    block[...] = 255 - block  # real tissue, inverted
    folder = {}
    for name, image in (("before", he_crop), ("after", changed)):
        folder[name] = tmp_path / name
        folder[name].mkdir()
        Image.fromarray(image).save(folder[name] / "he.png")
    runs = {}
    for name in folder:
        for context in (None, P):
            runs[name, context] = _png_run(folder[name] / "he.png",
                                           tmp_path / f"out_{name}_{context}", disc_ckpt,
                                           context=context)
    before, attrs = runs["before", None]
    after, _ = runs["after", None]
    assert attrs["context_size"] == C and len(before) == 9
    moved = np.linalg.norm(after - before, axis=1) / np.linalg.norm(before, axis=1)
    assert (moved > 1e-3).all(), moved  # every cell: its corners now count
    np.testing.assert_allclose(runs["after", P][0], runs["before", P][0], atol=1e-6, rtol=0)
    assert runs["before", P][1]["context_size"] == P


def test_a_model_that_sees_the_whole_tile_keeps_the_cell(tmp_path: Path, he_png: Path) -> None:
    automatic, attrs = _png_run(he_png, tmp_path / "auto", RI_TINY, model_kwargs={"depth": 1})
    off, off_attrs = _png_run(he_png, tmp_path / "off", RI_TINY, model_kwargs={"depth": 1},
                              context=0)
    assert attrs["context_size"] == off_attrs["context_size"] == P
    assert attrs["context_margin_level0"] == 0
    np.testing.assert_array_equal(automatic, off)


def test_a_changed_context_is_not_silently_skipped(tmp_path: Path, he_png: Path,
                                                   disc_ckpt: Path) -> None:
    _png_run(he_png, tmp_path, disc_ckpt, context=P)
    h5_file = tmp_path / "h5_files" / "he.h5"
    with h5py.File(h5_file, "r+") as handle:  # as a file from before contexts existed
        del handle["coords"].attrs["context_size"]
        del handle["coords"].attrs["context_margin_level0"]
    common = dict(slide_mpp=0.5, tissue_mask="none", workers=0, print_summary=False)
    again = extract_features([he_png], tmp_path, model=disc_ckpt, **common)
    ((_, reason),) = again.failed
    assert "other settings" in reason and f"context_size {P} != {C}" in reason
    assert extract_features([he_png], tmp_path, model=disc_ckpt, context=P,
                            **common).skipped


# -- arguments -------------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "needle"), [
    (["--context", "100"], "--context 100 is smaller than the cell (--patch-size 224)"),
    (["--context", "250"], "--context 250: --model"),
])
def test_bad_context_exits_2_with_one_line(extra: list[str], needle: str, tmp_path: Path,
                                           he_png: Path, disc_ckpt: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    code = main(["extract-features", str(he_png), "--slide-mpp", "0.5", "--out",
                 str(tmp_path), "--model", str(disc_ckpt), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not list(tmp_path.rglob("*.h5"))


def test_bad_context_names_the_argument(tmp_path: Path, he_png: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    assert main(["extract-features", str(he_png), "--out", str(tmp_path), "--context",
                 "-1"]) == 2
    assert "--context" in capsys.readouterr().err
    for context in (-1, 1.5, 100):
        with pytest.raises(ExtractionConfigError, match="context=") as caught:
            extract_features([he_png], tmp_path, patch_size=P, context=context)
        assert caught.value.argument == "context"
