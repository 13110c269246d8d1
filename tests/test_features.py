"""MIL feature extraction (``equivit_plugin.features``), in process: file layout, exactness,
rotation invariance, failures, resolving inputs. CPU, real H&E (the CMU-1 slide and
TIAToolbox's packaged image), tiny models."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("tiatoolbox")

from tiatoolbox import data as tia_data  # noqa: E402
from tiatoolbox.wsicore.wsireader import WSIReader  # noqa: E402

import equivit_plugin  # noqa: E402
from equivit_plugin.cli import cli_message, main  # noqa: E402
from equivit_plugin.equivariance import mutual_knn_similarity  # noqa: E402
from equivit_plugin.features import (  # noqa: E402
    ExtractionConfig,
    ExtractionConfigError,
    FeatureWriter,
    NoTissueWarning,
    extract_features,
    read_features,
    resolve_slides,
)
from equivit_plugin.features.slides import quiet_tiatoolbox  # noqa: E402
from equivit_plugin.models import (  # noqa: E402
    create_model,
    load_model,
    normalise_tile,
    save_checkpoint,
)

RI_TINY = "equivit_ri_tiny_patch16_224"
VIT_TINY = "vit_tiny_patch16_224"
P = 224

# Random weights are what these tests want (the warning is tested through the CLI).
pytestmark = pytest.mark.filterwarnings(
    "ignore::equivit_plugin.features.RandomWeightsWarning")


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def svs(shared_data: Path) -> Path:
    path = shared_data / "slides" / "CMU-1-Small-Region.svs"
    assert path.is_file(), f"missing {path}"
    return path


@pytest.fixture(scope="module")
def he_image() -> np.ndarray:
    """TIAToolbox's packaged real H&E image, ``(1000, 1000, 3)`` uint8."""
    return np.asarray(tia_data.stain_norm_target())


@pytest.fixture(scope="module")
def he_png(tmp_path_factory: pytest.TempPathFactory, he_image: np.ndarray) -> Path:
    path = tmp_path_factory.mktemp("png") / "he.png"
    Image.fromarray(he_image).save(path)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-block Equi-ViT-RI tiny checkpoint (a stand-in for trained weights)."""
    torch.manual_seed(3)
    kwargs = {"depth": 1, "num_classes": 0, "img_size": P}
    net = create_model(RI_TINY, 0, depth=1)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", net, RI_TINY,
                           model_kwargs=kwargs)


@pytest.fixture(scope="module")
def svs_run(tmp_path_factory: pytest.TempPathFactory, svs: Path, tiny_ckpt: Path):
    """The real slide through the checkpoint, 2 DataLoader workers, with ``.pt`` files."""
    out = tmp_path_factory.mktemp("svs_out")
    summary = extract_features([svs], out, model=tiny_ckpt, workers=2, batch_size=32,
                               also_pt=True, print_summary=False)
    return out, summary


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# -- layout ----------------------------------------------------------------------------------
def test_h5_layout_and_attributes(svs_run, tiny_ckpt: Path) -> None:
    out, summary = svs_run
    assert summary.ok and len(summary.done) == 1 and summary.n_patches > 0
    h5_file = out / "h5_files" / "CMU-1-Small-Region.h5"
    with h5py.File(h5_file, "r") as f:  # plain h5py, as CLAM/TRIDENT read it
        assert set(f.keys()) == {"features", "coords"}
        features, coords = f["features"], f["coords"]
        n = features.shape[0]
        assert 60 <= n <= 100, n  # ~80 tissue tiles of 224 px at 0.5 um/px
        assert features.shape == (n, 192) and features.dtype == np.float32
        assert coords.shape == (n, 2) and coords.dtype == np.int64
        ca, fa = dict(coords.attrs), dict(features.attrs)
        xy = coords[()]
    assert ca["patch_size"] == 224 and ca["patch_size_level0"] == 224  # 224 * 0.5 / 0.499
    assert (ca["level0_width"], ca["level0_height"]) == (2220, 2967)
    assert ca["target_mpp"] == 0.5 and ca["target_magnification"] == 20
    assert ca["level0_mpp"] == pytest.approx(0.499)
    assert ca["overlap"] == 0 and ca["name"] == "CMU-1-Small-Region"
    assert fa["encoder"] == RI_TINY
    assert fa["checkpoint_sha256"] == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    assert fa["package_version"] == equivit_plugin.__version__
    assert fa["precision"] == "fp32" and not fa["d4_average"]
    # Level-0 top-left corners of whole tiles inside the slide, no duplicates.
    assert (xy >= 0).all() and (xy[:, 0] + 224 <= 2220 + 1).all()
    assert (xy[:, 1] + 224 <= 2967 + 1).all()
    assert len(np.unique(xy, axis=0)) == n
    pt = torch.load(out / "pt_files" / "CMU-1-Small-Region.pt", weights_only=True)
    feats, xy2, attrs = read_features(h5_file)
    np.testing.assert_array_equal(pt.numpy(), feats)
    np.testing.assert_array_equal(xy2, xy)
    assert attrs["encoder"] == RI_TINY and attrs["patch_size_level0"] == 224
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp"))


def test_features_equal_direct_forward(svs_run, svs: Path, tiny_ckpt: Path) -> None:
    out, _ = svs_run
    features, coords, _ = read_features(out / "h5_files" / "CMU-1-Small-Region.h5")
    reader = WSIReader.open(svs)
    tiles = np.stack([
        normalise_tile(reader.read_rect(location=(int(x), int(y)), size=(P, P),
                                         resolution=0.5, units="mpp"))
        for x, y in coords])
    net, _ = load_model(tiny_ckpt)
    with torch.no_grad():
        batch = torch.from_numpy(tiles).permute(0, 3, 1, 2)
        direct = net.forward_head(net.forward_features(batch), pre_logits=True).numpy()
    np.testing.assert_allclose(features, direct, atol=1e-5, rtol=1e-5)


# -- rotation --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rotated_pair(tmp_path_factory: pytest.TempPathFactory, he_image: np.ndarray):
    """The packaged image cropped to 896 x 896 (4 x 4 tiles) and its 90-degree rotation."""
    folder = tmp_path_factory.mktemp("rot")
    crop = he_image[:896, :896]
    Image.fromarray(crop).save(folder / "upright.png")
    Image.fromarray(np.ascontiguousarray(np.rot90(crop))).save(folder / "rotated.png")
    return folder / "upright.png", folder / "rotated.png"


def _paired_features(pair, out: Path, **kwargs):
    """Features of the upright tiles and of the same tiles in the rotated slide, row-aligned."""
    summary = extract_features(list(pair), out, slide_mpp=0.5, tissue_mask="none", workers=0,
                               print_summary=False, **kwargs)
    assert summary.ok and len(summary.done) == 2
    f0, c0, _ = read_features(out / "h5_files" / "upright.h5")
    f1, c1, _ = read_features(out / "h5_files" / "rotated.h5")
    assert len(c0) == len(c1) == 16
    # np.rot90 (counter-clockwise) moves the tile at (x, y) to (y, W - x - P).
    mapped = np.stack([c0[:, 1], 896 - c0[:, 0] - P], axis=1)
    index = {tuple(xy): i for i, xy in enumerate(c1.tolist())}
    order = [index[tuple(xy)] for xy in mapped.tolist()]
    return f0, f1[order]


def test_rotation_invariant_model_gives_rotation_invariant_features(rotated_pair,
                                                                    tmp_path: Path) -> None:
    f0, f1 = _paired_features(rotated_pair, tmp_path / "ri", model=RI_TINY)
    cos = _cos(f0, f1)
    assert cos.min() >= 0.9999, cos.min()
    assert mutual_knn_similarity(f0, f1, k=5) == 1.0

    g0, g1 = _paired_features(rotated_pair, tmp_path / "vit", model=VIT_TINY)
    vit_cos = _cos(g0, g1)
    knn = mutual_knn_similarity(g0, g1, k=5)
    print(f"plain ViT-tiny under 90-degree rotation: cosine min {vit_cos.min():.4f} "
          f"mean {vit_cos.mean():.4f}, mutual-kNN {knn:.3f}; Equi-ViT-RI: {cos.min():.6f}")
    assert vit_cos.min() < 0.999  # measurably not invariant
    assert np.abs(g0 - g1).max() > 100 * np.abs(f0 - f1).max()


def test_d4_average_makes_any_model_invariant(rotated_pair, tmp_path: Path) -> None:
    f0, f1 = _paired_features(rotated_pair, tmp_path / "d4", model=VIT_TINY,
                              model_kwargs={"depth": 1}, d4_average=True)
    assert _cos(f0, f1).min() >= 0.9999
    np.testing.assert_allclose(f0, f1, atol=1e-4)
    _, _, attrs = read_features(tmp_path / "d4" / "h5_files" / "upright.h5")
    assert attrs["d4_average"] is True and attrs["encoder"] == VIT_TINY


# -- failures --------------------------------------------------------------------------------
def test_bad_slides_are_reported_and_the_run_goes_on(tmp_path: Path, svs: Path, he_png: Path,
                                                     tiny_ckpt: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "truncated.svs").write_bytes(svs.read_bytes()[: svs.stat().st_size // 2])
    (slides / "text.svs").write_text("this is not a slide\n")
    shutil.copy(he_png, slides / "good.png")
    code = main(["extract-features", str(slides), str(tmp_path / "missing.svs"), "--out",
                 str(tmp_path / "out"),
                 "--model", str(tiny_ckpt), "--slide-mpp", "0.5", "--workers", "0"])
    assert code == 1
    printed = capsys.readouterr().out
    assert (tmp_path / "out" / "h5_files" / "good.h5").is_file()
    for name in ("truncated", "text", "missing"):
        assert not (tmp_path / "out" / "h5_files" / f"{name}.h5").exists()
        line = next(line for line in printed.splitlines() if f"{name}.svs" in line)
        assert "FAILED" in line, line
    assert "cannot open slide" in printed and "no such file" in printed
    assert "1 done" in printed and "3 failed" in printed

    summary = extract_features([slides], tmp_path / "out", model=tiny_ckpt, slide_mpp=0.5,
                               workers=0, print_summary=False)
    assert [Path(s).name for s, _ in summary.skipped] == ["good.png"]
    reasons = dict(summary.failed)
    assert {Path(s).name for s in reasons} == {"text.svs", "truncated.svs"}
    assert all("cannot open slide" in r for r in reasons.values())


def test_no_tissue_gives_empty_valid_file_and_warning(tmp_path: Path, tiny_ckpt: Path) -> None:
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((600, 600, 3), 255, np.uint8)).save(blank)
    with pytest.warns(NoTissueWarning, match="blank.png"):
        summary = extract_features([blank], tmp_path / "out", model=tiny_ckpt, slide_mpp=0.5,
                                   workers=0, print_summary=False)
    assert summary.ok and summary.done == [str(blank)] and summary.warnings
    features, coords, _ = read_features(tmp_path / "out" / "h5_files" / "blank.h5")
    assert features.shape == (0, 192) and features.dtype == np.float32
    assert coords.shape == (0, 2) and coords.dtype == np.int64


def test_slide_without_resolution_needs_slide_mpp(tmp_path: Path, he_png: Path,
                                                  tiny_ckpt: Path) -> None:
    summary = extract_features([he_png], tmp_path / "out", model=tiny_ckpt, workers=0,
                               print_summary=False)
    assert not summary.ok and not summary.done
    ((slide, reason),) = summary.failed
    assert slide == str(he_png)
    assert "no resolution metadata" in reason and "--slide-mpp" in reason


def test_changed_settings_are_not_silently_skipped(tmp_path: Path, he_png: Path,
                                                   tiny_ckpt: Path) -> None:
    common = dict(slide_mpp=0.5, workers=0, print_summary=False, tissue_mask="none")
    extract_features([he_png], tmp_path, model=tiny_ckpt, **common)
    other = extract_features([he_png], tmp_path, model=VIT_TINY, model_kwargs={"depth": 1},
                             **common)
    ((_, reason),) = other.failed
    assert "other settings" in reason and "--overwrite" in reason
    forced = extract_features([he_png], tmp_path, model=VIT_TINY, model_kwargs={"depth": 1},
                              overwrite=True, dtype="float16", **common)
    assert forced.ok and forced.done
    features, _, attrs = read_features(tmp_path / "h5_files" / "he.h5")
    assert features.dtype == np.float16 and attrs["encoder"] == VIT_TINY
    assert json.loads(attrs["model_kwargs"]) == {"depth": 1}


def test_reduced_precision_and_leftover_temporary_files(tmp_path: Path, he_png: Path,
                                                        tiny_ckpt: Path) -> None:
    common = dict(model=tiny_ckpt, slide_mpp=0.5, workers=0, print_summary=False,
                  tissue_mask="none")
    extract_features([he_png], tmp_path / "fp32", **common)
    leftover = tmp_path / "bf16" / "h5_files" / ".he.h5.partial"  # as a killed run leaves it
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half-written")
    pt_leftover = tmp_path / "bf16" / "pt_files" / ".he.pt.k1l9x_2q.tmp.pt"  # utils.atomic's
    other_slide = pt_leftover.with_name(".he.pt.x.y.tmp.pt")  # not this slide's: kept
    pt_leftover.parent.mkdir(parents=True)
    for path in (pt_leftover, other_slide):
        path.write_bytes(b"half-written")
    summary = extract_features([he_png], tmp_path / "bf16", precision="bf16", also_pt=True,
                               **common)
    assert summary.ok and summary.done and not leftover.exists()
    assert not pt_leftover.exists() and other_slide.exists()
    assert (tmp_path / "bf16" / "pt_files" / "he.pt").is_file()
    reference, coords, _ = read_features(tmp_path / "fp32" / "h5_files" / "he.h5")
    features, coords_bf16, attrs = read_features(tmp_path / "bf16" / "h5_files" / "he.h5")
    assert attrs["precision"] == "bf16" and features.dtype == np.float32
    np.testing.assert_array_equal(coords, coords_bf16)
    assert _cos(features, reference).min() > 0.99
    # HDF5 chunks sized to the slide: 16 rows do not make a 1 MiB file.
    assert (tmp_path / "fp32" / "h5_files" / "he.h5").stat().st_size < 100_000


def test_writer_leaves_nothing_when_interrupted(tmp_path: Path) -> None:
    from equivit_plugin.features import FeatureWriter

    target = tmp_path / "slide.h5"
    with pytest.raises(RuntimeError, match="boom"), FeatureWriter(target, 4) as writer:
        writer.append(np.ones((3, 4), np.float32), np.zeros((3, 2)))
        raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())
    with FeatureWriter(target, 4, "float16", coords_attrs={"name": "slide"}) as writer:
        writer.append(np.ones((3, 4), np.float32), np.arange(6).reshape(3, 2))
        assert not target.exists()  # invisible until committed
        writer.commit()
    features, coords, attrs = read_features(target)
    assert features.shape == (3, 4) and features.dtype == np.float16
    assert coords.tolist() == [[0, 1], [2, 3], [4, 5]] and attrs == {"name": "slide"}
    with pytest.raises(FileNotFoundError):
        read_features(tmp_path / "nope.h5")


# -- arguments -------------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "needle"), [
    (["--model", "no_such_model_224"], "--model 'no_such_model_224'"),
    (["--model", "missing_checkpoint.pt"], "--model 'missing_checkpoint.pt'"),
    (["--precision", "fp8"], "--precision"),
    (["--stride", "0"], "--stride"),
    (["--patch-size", "-3"], "--patch-size"),
    (["--device", "gpu7"], "--device 'gpu7' is not a device"),
    (["--model", "equivit_ri_tiny_patch16_224", "--patch-size", "100"],
     "--patch-size 100: --model 'equivit_ri_tiny_patch16_224' cannot embed 100x100 tiles"),
])
def test_usage_errors_exit_2_and_name_the_argument(extra: list[str], needle: str,
                                                   tmp_path: Path, he_png: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    code = main(["extract-features", str(he_png), "--out", str(tmp_path), *extra])
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.h5"))


def test_usage_errors_for_output_and_slide_list(tmp_path: Path, he_png: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert main(["extract-features", str(he_png), "--out", str(not_a_dir / "sub")]) == 2
    assert "--out" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["extract-features", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no slides found" in capsys.readouterr().err
    with pytest.raises(ExtractionConfigError, match="stride=") as caught:
        extract_features([he_png], tmp_path / "o", stride=0)
    assert caught.value.argument == "stride"
    with pytest.raises(ExtractionConfigError, match="precision=") as caught:
        extract_features([he_png], tmp_path / "o", precision="int4")
    assert caught.value.argument == "precision"


def test_resolve_slides_from_files_dirs_globs_and_lists(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.svs", "b.png", "c.tiff", "notes.md"):
        (folder / name).write_bytes(b"x")
    expected = [folder / "a.svs", folder / "b.png", folder / "c.tiff"]
    assert resolve_slides(folder) == expected
    assert resolve_slides(str(folder / "*.sv*")) == [folder / "a.svs"]
    (tmp_path / "list.txt").write_text("# slides\nin/c.tiff\n\nin/a.svs\n")
    assert resolve_slides(tmp_path / "list.txt") == [folder / "a.svs", folder / "c.tiff"]
    (tmp_path / "list.csv").write_text("case_id,slide\n1,in/b.png\n2,in/a.svs\n")
    assert resolve_slides(tmp_path / "list.csv") == [folder / "a.svs", folder / "b.png"]
    (tmp_path / "plain.csv").write_text("in/c.tiff,0\n")
    assert resolve_slides([tmp_path / "plain.csv", folder / "c.tiff"]) == [folder / "c.tiff"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.tif").write_bytes(b"x")
    with pytest.raises(ValueError, match="share the name 'a'"):
        resolve_slides([folder, tmp_path / "other" / "a.tif"])
    with pytest.raises(ValueError, match="no slides found"):
        resolve_slides(str(tmp_path / "*.ndpi"))


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"mpp": 0}, "mpp= must be a positive number, got 0"),
    ({"slide_mpp": -1.0}, "slide_mpp= must be a positive number"),
    ({"tissue_mask": "magic"}, "tissue_mask= must be one of"),
    ({"min_tissue": 1.5}, r"min_tissue= must be in \[0, 1\)"),
    ({"dtype": "int8"}, "dtype= must be one of"),
    ({"workers": -1}, "workers= must be an integer >= 0"),
    ({"batch_size": 0}, "batch_size= must be a positive integer"),
    ({"patch_size": 256}, "patch_size=256 does not match"),  # the checkpoint takes 224
    ({"model": "no_such_model_224"}, "model='no_such_model_224' is neither"),
])
def test_python_api_errors_name_the_argument(kwargs: dict, needle: str, tmp_path: Path,
                                             he_png: Path, tiny_ckpt: Path) -> None:
    """Messages name the Python argument (``patch_size=``), ``.argument`` holds it."""
    kwargs = {"model": tiny_ckpt, **kwargs}
    with pytest.raises(ExtractionConfigError, match=needle) as caught:
        extract_features([he_png], tmp_path / "o", **kwargs)
    assert caught.value.argument == next(iter(kwargs.keys() - {"model"}), "model")
    assert "--" not in str(caught.value)
    assert not list(tmp_path.rglob("*.h5"))


def test_cuda_without_a_gpu_and_duplicate_stems_are_config_errors(tmp_path: Path,
                                                                  he_png: Path) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ExtractionConfigError,
                           match="device='cuda': CUDA is not available") as caught:
            extract_features([he_png], tmp_path / "o", device="cuda")
        assert caught.value.argument == "device"
    twin = tmp_path / "other" / he_png.name
    twin.parent.mkdir()
    shutil.copy(he_png, twin)
    with pytest.raises(ExtractionConfigError, match=f"slides= two slides share the name "
                                                    f"'{he_png.stem}'") as caught:
        extract_features([he_png, twin], tmp_path / "o")
    assert caught.value.argument == "slides"


def test_feature_file_errors_name_the_file(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle["embeddings"] = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"foreign\.h5: expected datasets 'features' and"):
        read_features(foreign)
    with pytest.raises(FileNotFoundError, match=r"nope\.h5"):
        read_features(tmp_path / "nope.h5")
    with FeatureWriter(tmp_path / "w.h5", dim=4) as writer:
        with pytest.raises(ValueError, match=r"expected \(2, 4\) features, got \(2, 5\)"):
            writer.append(np.zeros((2, 5)), np.zeros((2, 2)))
        with pytest.raises(ValueError, match="3 feature rows for 2 coordinates"):
            writer.append(np.zeros((3, 4)), np.zeros((2, 2)))


def test_cli_rewrites_python_arguments_as_flags(tmp_path: Path, he_png: Path, tiny_ckpt: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """One message naming two arguments: both come out as the command line's flags."""
    code = main(["extract-features", str(he_png), "--out", str(tmp_path), "--model",
                 str(tiny_ckpt), "--patch-size", "256"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--patch-size 256 does not match the input size 224 of --model " \
           f"'{tiny_ckpt}'" in err and "use --patch-size 224" in err
    assert "patch_size=" not in err and "model=" not in err
    flags = {"slides": "SLIDES:", "patch_size": "--patch-size", "model": "--model"}
    assert cli_message("slides= no slides found", flags) == "SLIDES: no slides found"
    assert cli_message("model_kwargs={} and model='x'", flags) == "model_kwargs={} and --model 'x'"


def test_cli_needs_slides_or_demo_not_both(tmp_path: Path, he_png: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    assert main(["extract-features", "--out", str(tmp_path)]) == 2
    assert "required: SLIDES (or --demo)" in capsys.readouterr().err
    assert main(["extract-features", str(he_png), "--demo", "--out", str(tmp_path)]) == 2
    assert "give SLIDES or --demo, not both" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_quiet_tiatoolbox_drops_only_tiatoolbox_records(caplog: pytest.LogCaptureFixture) -> None:
    """TIAToolbox's own warnings are dropped during the block; the user's are not, logging is
    not switched off, and nothing is left behind afterwards."""
    import logging

    import tiatoolbox
    from tiatoolbox.wsicore.wsimeta import WSIMeta

    root = logging.getLogger()
    filters_before = list(root.filters)
    tia_file = str(Path(tiatoolbox.__file__).parent / "wsicore" / "wsimeta.py")
    with caplog.at_level(logging.INFO):
        with quiet_tiatoolbox():
            assert logging.root.manager.disable == 0  # logging stays on
            WSIMeta(slide_dimensions=(10, 10), axes="YXS")  # logs "Unknown scale"
            logging.warning("my own warning")
            logging.getLogger("my.module").warning("my module's warning")
            root.handle(logging.LogRecord("root", logging.ERROR, tia_file, 1,
                                          "a TIAToolbox error", None, None))
        messages = [record.getMessage() for record in caplog.records]
        assert "my own warning" in messages and "my module's warning" in messages
        assert "a TIAToolbox error" in messages  # errors still get through
        assert not any("Unknown scale" in m or "Raw data" in m for m in messages), messages
        caplog.clear()
        WSIMeta(slide_dimensions=(10, 10), axes="YXS")  # after the block: logged again
        assert any("Unknown scale" in r.getMessage() for r in caplog.records)
    assert root.filters == filters_before


def test_config_is_checked_and_normalised_once(tmp_path: Path, he_png: Path) -> None:
    config = ExtractionConfig([he_png], tmp_path / "o", patch_size=112.0, precision="bfloat16",
                              workers=np.int64(0), model_kwargs=None)
    assert (config.patch_size, config.stride, config.workers) == (112, 112, 0)
    assert config.precision == "bf16" and config.model_kwargs == {}
    assert config.slide_paths == (he_png,) and config.out_dir == tmp_path / "o"
    assert not (tmp_path / "o").exists()  # nothing written until the run prepares its output
    with pytest.raises(ExtractionConfigError, match="batch_size= must be a positive integer, "
                                                    "got True") as caught:
        ExtractionConfig([he_png], tmp_path / "o", batch_size=True)
    assert caught.value.argument == "batch_size"
