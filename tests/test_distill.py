"""Distillation: teacher targets equal an independent D4 average and are computed once, views
equal the report's rotate-and-crop, the student stays exactly invariant and speaks the
teacher's feature space, and the command, the bundle config and torchrun produce the same
kind of self-describing checkpoint, resumably."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from equivit_plugin.cli import main
from equivit_plugin.distill import (
    DistillationLoss,
    DistillationViews,
    DistillError,
    DistillSettings,
    collect_tiles,
    largest_shift,
    targets_fingerprint,
    teacher_targets,
)
from equivit_plugin.distill.views import random_view
from equivit_plugin.equivariance import region_views
from equivit_plugin.features import read_features
from equivit_plugin.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    create_model,
    load_model,
    load_vit_weights,
    pooled_embedding,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
STUDENT = "equivit_disc_tiny_patch16_224"  # the default student's architecture
TEACHER_KWARGS = {"num_classes": 3, "img_size": 224, "depth": 1, "embed_dim": 96,
                  "num_heads": 3}
SLIDE = "slides/CMU-1-Small-Region.svs"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small class-token ViT teacher (96 features, as a bundle checkpoint is written)."""
    torch.manual_seed(3)
    net = create_model("vit_tiny_patch16_224", **TEACHER_KWARGS)
    return save_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.pt", net,
                           "vit_tiny_patch16_224", ["a", "b", "c"], TEACHER_KWARGS)


@pytest.fixture()
def tile_folder(tmp_path: Path, shared_data: Path) -> Path:
    """Six real CRC tiles (one in a sub-folder) and one broken file."""
    folder = tmp_path / "tiles"
    (folder / "sub").mkdir(parents=True)
    files = sorted((shared_data / "crc_tiles").glob("*/*.png"))[:6]
    for i, file in enumerate(files):
        shutil.copy(file, (folder / "sub" if i == 5 else folder) / f"tile_{i}.png")
    (folder / "tile_9_broken.png").write_bytes(b"not a png")
    return folder


def _d4_mean_reference(net: torch.nn.Module, tile: np.ndarray) -> np.ndarray:
    """An independent D4 average: numpy rot90/flip views, one forward each."""
    views = []
    for k in range(4):
        turned = np.rot90(tile, k, axes=(0, 1))
        views += [turned, turned[:, ::-1]]
    x = torch.from_numpy(np.stack(views).astype(np.float64) / 255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        return pooled_embedding(net.double(), (x - mean) / std).mean(0).numpy()


# ------------------------------------------------------------------------------ the model


def test_feature_projection_is_exactly_invariant_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = create_model(STUDENT, 0, depth=2, feature_dim=96).double().eval()
    with torch.no_grad():
        net.radial_pos_embed.weight.normal_()
        net.attn_bias.weight.normal_()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        features = pooled_embedding(net, x)
        assert features.shape == (2, 96) and net.num_features == 96
        for view in (torch.rot90(x, 1, (2, 3)), x.flip(-1), torch.rot90(x, 3, (2, 3))):
            assert (pooled_embedding(net, view) - features).abs().max() < 1e-10
    classifier = create_model(STUDENT, 5, depth=2, feature_dim=96)
    assert classifier.head.in_features == 96 and classifier(x.float()).shape == (2, 5)
    path = save_checkpoint(tmp_path / "s.pt", net.float(), STUDENT,
                           model_kwargs={"num_classes": 0, "depth": 2, "feature_dim": 96})
    loaded, info = load_model(path)
    assert info.embed_dim == 96
    with torch.no_grad():
        torch.testing.assert_close(pooled_embedding(loaded, x.float()),
                                   pooled_embedding(net, x.float()))
    with pytest.raises(ValueError, match="feature_dim"):
        create_model(STUDENT, 0, depth=1, feature_dim=0)


def test_student_blocks_and_final_norm_start_from_a_class_token_teacher() -> None:
    teacher = create_model("vit_tiny_patch16_224", 3, depth=3)
    with torch.no_grad():
        teacher.norm.weight.normal_()
    student = create_model(STUDENT, 0, depth=2)
    report = load_vit_weights(student, teacher.state_dict())
    assert torch.equal(student.fc_norm.weight, teacher.norm.weight)
    assert torch.equal(student.blocks[1].mlp.fc2.weight, teacher.blocks[1].mlp.fc2.weight)
    assert "blocks.2.attn.qkv.weight" in report.skipped  # the student has 2 blocks
    assert any(k.startswith("patch_embed.") for k in report.missing)


def test_region_views_with_separate_x_and_y_shifts() -> None:
    x = torch.arange(2 * 3 * 20 * 20, dtype=torch.float64).view(2, 3, 20, 20)
    view = region_views(x, 90, 10, (2, -3))
    torch.testing.assert_close(view, torch.rot90(x, 1, (2, 3))[..., 2:12, 7:17])
    torch.testing.assert_close(region_views(x, 0, 10, 1), x[..., 6:16, 6:16])
    with pytest.raises(ValueError, match="padding"):
        region_views(x, 45, 10, (4, 0))


# ------------------------------------------------------------------------------ tiles


def test_tiles_from_folders_and_slides(tile_folder: Path, shared_data: Path) -> None:
    from equivit_plugin.features.slides import open_slide

    tiles = collect_tiles(224, tiles=[tile_folder], slides=[shared_data / SLIDE], stride=448)
    assert len(tiles.files) == 7 and len(tiles.slide_index) > 3
    assert tiles.key(0).startswith("file:") and tiles.key(len(tiles) - 1).startswith("slide:")
    assert len(set(tiles.keys())) == len(tiles)
    # A folder tile is the context's centre; the rest mirrors it.
    source = np.asarray(Image.open(tiles.files[0]).convert("RGB"))
    context = tiles.context(0)
    assert context.shape == (448, 448, 3)
    np.testing.assert_array_equal(tiles.tile(0), source)
    np.testing.assert_array_equal(context[112 - 5, 112:336], source[5])
    # A slide tile's context is the slide's own pixels around it.
    row = len(tiles.files)
    reader = open_slide(shared_data / SLIDE).reader
    expected = np.asarray(reader.read_rect(tuple(int(v) for v in tiles.context_xy[0]),
                                           (448, 448), resolution=0.5, units="mpp"))[..., :3]
    np.testing.assert_array_equal(tiles.context(row), expected)
    with pytest.raises(DistillError, match="no such folder") as error:
        collect_tiles(224, tiles=[tile_folder / "missing"])
    assert error.value.argument == "tiles"
    (tile_folder / "empty").mkdir()
    with pytest.raises(DistillError, match="no image files"):
        collect_tiles(224, tiles=[tile_folder / "empty"])


# ------------------------------------------------------------------------------ targets


def test_targets_equal_an_independent_d4_average_are_cached_and_resume(
        tile_folder: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    teacher, info = load_model(teacher_ckpt)
    tiles = collect_tiles(224, tiles=[tile_folder])
    fingerprint = targets_fingerprint(info, tiles)
    path = tmp_path / "targets.h5"
    norm = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}

    class Failing(torch.nn.Module):
        """The teacher, failing after its first batch: a run that stops half way."""

        def __init__(self) -> None:
            super().__init__()
            self.net, self.calls = teacher, 0

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("interrupted")
            return self.net.forward_features(x)

        def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
            return self.net.forward_head(x, pre_logits)

    with pytest.raises(RuntimeError, match="interrupted"):
        teacher_targets(Failing(), info, tiles, path, fingerprint=fingerprint, batch_size=3,
                        **norm)
    part = path.with_name(path.name + ".part0of1")
    assert not path.exists() and part.is_file()
    with h5py.File(part) as handle:
        assert int((handle["status"][:] == 1).sum()) == 3  # the first batch was kept
    counting = Failing()
    counting.calls = -100  # never fails now; counts the batches it is given
    targets = teacher_targets(counting, info, tiles, path, fingerprint=fingerprint,
                              batch_size=3, **norm)
    # Only the 4 remaining tiles, in two batches: three readable ones, then the broken file
    # alone, which never reaches the teacher.
    assert counting.calls == -100 + 1
    assert path.is_file() and not part.exists()
    broken = [i for i, k in enumerate(tiles.keys()) if "broken" in k]
    assert list(np.flatnonzero(~targets.readable)) == broken
    assert "broken" in next(iter(targets.errors))
    for index in np.flatnonzero(targets.readable):
        reference = _d4_mean_reference(teacher, tiles.tile(int(index)))
        np.testing.assert_allclose(targets.values[index], reference, atol=2e-5, rtol=1e-4)
    # Cached: the teacher is not run again; a cache of other targets is refused.
    again = teacher_targets(None, info, tiles, path, fingerprint=fingerprint, **norm)
    np.testing.assert_array_equal(again.values, targets.values)
    with pytest.raises(DistillError, match="another teacher") as error:
        teacher_targets(None, info, tiles, path, fingerprint="0" * 64, **norm)
    assert error.value.argument == "targets_cache"


# ------------------------------------------------------------------------------ views, loss


def test_views_are_rotated_shifted_crops_of_the_context(tile_folder: Path) -> None:
    tiles = collect_tiles(224, tiles=[tile_folder])
    targets = np.random.default_rng(0).normal(size=(len(tiles), 5)).astype(np.float32)
    views = DistillationViews(tiles, targets, [0, 2], max_shift=8, mean=IMAGENET_MEAN,
                              std=IMAGENET_STD, fixed_seed=7)
    sample = views[1]
    angle, dx, dy, mirror = random_view(np.random.default_rng([7, 2]), 8)
    context = torch.from_numpy(tiles.context(2)).permute(2, 0, 1)[None].double() / 255.0
    expected = region_views(context, angle, 224, (dx, dy))[0]
    expected = expected.flip(-1) if mirror else expected
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    # The dataset hands over the context and the view; the engines' prepare_batch makes it.
    batch = torch.utils.data.default_collate([sample])
    image, label = views.prepare_batch()(batch, torch.device("cpu"))
    torch.testing.assert_close(image[0].double(), (expected - mean) / std, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(label[0].numpy(), targets[2])
    assert views[1]["angle"].item() == sample["angle"].item()  # fixed per tile
    angles = [random_view(np.random.default_rng(s), 8) for s in range(200)]
    assert sum(a % 90 != 0 for a, *_ in angles) == 200  # any angle, not the 90-degree grid
    assert {dx for _, dx, _, _ in angles} == set(range(-8, 9))
    assert largest_shift(224) == 46
    with pytest.raises(DistillError, match="max_shift"):
        DistillationViews(tiles, targets, [0], max_shift=47, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD)


def test_loss_is_cosine_plus_regression_in_standardised_coordinates() -> None:
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    mean, std = torch.randn(6), torch.rand(6) + 0.5
    loss = DistillationLoss(cosine_weight=0.5, regression_weight=2.0, mean=mean, std=std)(s, t)
    zs, zt = (s - mean) / std, (t - mean) / std
    cos = (zs * zt).sum(1) / (zs.norm(dim=1) * zt.norm(dim=1))
    expected = 0.5 * (1 - cos).mean() + 2.0 * ((zs - zt) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    assert float(DistillationLoss()(t, t)) < 1e-6
    with pytest.raises(ValueError, match="std"):
        DistillationLoss(std=torch.zeros(6))


# ------------------------------------------------------------------------------ end to end


def _distill_args(teacher: Path, tiles: Path, slide: Path, out: Path, epochs: int) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--student", STUDENT, "--tiles", str(tiles),
            "--slides", str(slide), "--stride", "448", "--out", str(out), "--epochs",
            str(epochs), "--batch-size", "4", "--workers", "0", "--max-tiles", "14",
            "--val-fraction", "0.2", "--no-progress"]


def test_distill_command_end_to_end_and_resume(tile_folder: Path, teacher_ckpt: Path,
                                               shared_data: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "student.pt"
    slide = shared_data / SLIDE
    assert main(_distill_args(teacher_ckpt, tile_folder, slide, out, 1)) == 0
    printed = capsys.readouterr()
    assert "left out unreadable tile" in printed.err and "tile_9_broken" in printed.err
    work = tmp_path / "student.distill"
    targets = next(work.glob("targets_*.h5"))
    stamp = targets.stat().st_mtime_ns
    student, info = load_model(out)
    assert info.name == STUDENT and info.embed_dim == 96  # the teacher's width, projected
    assert info.extra["feature_space"] == "teacher"
    assert info.extra["distilled_from"]["name"] == "vit_tiny_patch16_224"
    # Exactly invariant in float64, whatever it learnt.
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        net = student.double()
        features = pooled_embedding(net, x)
        for view in (torch.rot90(x, 1, (2, 3)), torch.rot90(x, 2, (2, 3)).flip(-1)):
            assert (pooled_embedding(net, view) - features).abs().max() < 1e-10
    # Resume: one more epoch continues the history; the targets are not recomputed.
    assert main(_distill_args(teacher_ckpt, tile_folder, slide, out, 2)) == 0
    assert "1 epoch(s) this run" in capsys.readouterr().out
    history = json.loads((work / "distill_metrics.json").read_text())["epochs"]
    assert [r["epoch"] for r in history] == [1, 2]
    assert all(0 < r["val_cosine"] <= 1 and -1 <= r["val_centred_cosine"] <= 1
               for r in history)
    assert targets.stat().st_mtime_ns == stamp
    assert main(_distill_args(teacher_ckpt, tile_folder, slide, out, 2)) == 0
    assert "0 epoch(s) this run" in capsys.readouterr().out
    summary = json.loads((work / "distill_summary.json").read_text())
    assert summary["n_train"] + summary["n_val"] == 14 and summary["n_val"] == 3
    # The checkpoint works unchanged in the feature pipeline: teacher-width features.
    assert main(["extract-features", str(slide), "--out", str(tmp_path / "features"),
                 "--model", str(out), "--workers", "0", "--batch-size", "8"]) == 0
    features, coords, _ = read_features(tmp_path / "features" / "h5_files"
                                        / "CMU-1-Small-Region.h5")
    assert features.shape == (len(coords), 96)


def test_student_through_the_tiatoolbox_engine(teacher_ckpt: Path, tmp_path: Path,
                                               shared_data: Path) -> None:
    from tiatoolbox.models.engine.deep_feature_extractor import DeepFeatureExtractor

    from equivit_plugin.models import normalise_batch
    from equivit_plugin.tiatoolbox import EquiViTEncoder, make_ioconfig

    torch.manual_seed(0)
    net = create_model(STUDENT, 0, depth=1, feature_dim=96)
    path = save_checkpoint(tmp_path / "student.pt", net, STUDENT,
                           model_kwargs={"num_classes": 0, "depth": 1, "feature_dim": 96})
    files = sorted((shared_data / "crc_tiles").glob("*/*.png"))[:2]
    tiles = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    encoder = EquiViTEncoder.from_checkpoint(path)
    engine = DeepFeatureExtractor(model=encoder, batch_size=2)
    features = np.asarray(engine.run(images=tiles, patch_mode=True,
                                     ioconfig=make_ioconfig())["features"])
    with torch.no_grad():
        direct = pooled_embedding(encoder.net, normalise_batch(torch.from_numpy(tiles)))
    assert features.shape == (2, 96)
    scale = float(direct.abs().max())
    np.testing.assert_allclose(features, direct.numpy(), atol=5e-5 * scale)


def test_bundle_trains_a_classifier_from_a_student(tmp_path: Path, shared_data: Path) -> None:
    from monai.bundle import ConfigParser

    from equivit_plugin.networks import create_network

    torch.manual_seed(1)
    student = create_model(STUDENT, 0, depth=1, feature_dim=96)
    path = save_checkpoint(tmp_path / "student.pt", student, STUDENT,
                           model_kwargs={"num_classes": 0, "depth": 1, "feature_dim": 96})
    parser = ConfigParser()
    configs = REPO / "monai_bundle" / "configs"
    parser.read_config([str(configs / "train.json"), str(configs / "quick_train.json")])
    parser.update({"bundle_root": str(tmp_path), "init_checkpoint": str(path),
                   "dataset_dir": str(shared_data / "lc25000_lung_train"),
                   "network_name": STUDENT, "network_def#depth": 1,
                   "network_def#feature_dim": 96})
    network = parser.get_parsed_content("network_def")
    own = network.state_dict()
    for key, value in student.state_dict().items():
        assert torch.equal(own[key], value), key  # every weight but the new head
    assert network.head.in_features == 96 and network.head.out_features == 3
    with pytest.raises(ValueError, match="feature_dim"):
        create_network(STUDENT, 3, depth=1, init_checkpoint=path)
    with pytest.raises(ValueError, match=f"is not a vit_tiny_patch16_224.*{STUDENT}"):
        create_network("vit_tiny_patch16_224", 3, init_checkpoint=path)


def test_bundle_config_runs_the_same_distillation(teacher_ckpt: Path, tile_folder: Path,
                                                  tmp_path: Path) -> None:
    config = json.loads((REPO / "monai_bundle" / "configs" / "distill.json").read_text())
    # Every setting is a config key with the library's default (no drift between the doors).
    fields = {f.name: f.default for f in DistillSettings.__dataclass_fields__.values()
              if f.name not in ("teacher", "out", "work_dir", "tiles", "slides", "extra")}
    for name, default in fields.items():
        assert config["settings"][name] == f"@{name}", name
        expected = None if default is None else default
        if isinstance(expected, tuple):
            expected = list(expected)
        assert config[name] == expected, name
    root = tmp_path / "bundle"
    command = [sys.executable, "-m", "monai.bundle", "run",
               "--config_file", str(REPO / "monai_bundle" / "configs" / "distill.json"),
               "--bundle_root", str(root), "--teacher", str(teacher_ckpt),
               "--student", STUDENT, "--tiles", f"['{tile_folder}']", "--epochs", "1",
               "--batch_size", "4", "--num_workers", "0", "--max_tiles", "6",
               "--progress", "False"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=_env(), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    student, info = load_model(root / "models" / "student.pt")
    assert info.embed_dim == 96 and info.extra["feature_space"] == "teacher"
    assert (root / "distill" / "checkpoint_last.pt").is_file()


def test_torchrun_two_ranks_share_targets_and_training(teacher_ckpt: Path, tile_folder: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "student.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "equivit_plugin.cli", "distill",
               "--teacher", str(teacher_ckpt), "--student", STUDENT, "--tiles",
               str(tile_folder), "--out", str(out), "--epochs", "1", "--batch-size", "2",
               "--workers", "0", "--device", "cpu", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("student: ") == 1  # rank 0 reports
    _, info = load_model(out)
    assert info.embed_dim == 96
    # The targets the two ranks computed (rows 0::2 and 1::2, merged) equal one process's.
    teacher, teacher_info = load_model(teacher_ckpt)
    tiles = collect_tiles(224, tiles=[tile_folder])
    merged = next((tmp_path / "student.distill").glob("targets_*.h5"))
    single = teacher_targets(teacher, teacher_info, tiles, tmp_path / "single.h5",
                             fingerprint=targets_fingerprint(teacher_info, tiles),
                             mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with h5py.File(merged) as handle:
        np.testing.assert_allclose(handle["targets"][:], single.values, atol=1e-5)
        assert list(handle["status"][:]) == [1 if r else 2 for r in single.readable]


@pytest.mark.parametrize("args, flag, expected", [
    (["--teacher", "no_such_model"], "--teacher", "a registered timm model"),
    (["--tiles", "/no/such/folder"], "--tiles", "no such folder"),
    (["--student", "no_such_student"], "--student", "not a registered timm model"),
    (["--max-shift", "60"], "--max-shift", "too large"),
])
def test_bad_input_gets_one_clear_line(args: list[str], flag: str, expected: str,
                                       teacher_ckpt: Path, tile_folder: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    base = {"--teacher": str(teacher_ckpt), "--tiles": str(tile_folder),
            "--student": STUDENT, "--max-shift": "8"}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["distill", "--out", str(tmp_path / "s.pt"), "--workers", "0", "--no-progress",
            "--epochs", "1", *[v for pair in base.items() for v in pair]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("equivit distill: error:") and flag in err and expected in err


def test_settings_need_tiles_or_slides(tmp_path: Path) -> None:
    with pytest.raises(DistillError, match="tiles= or slides=") as error:
        DistillSettings(teacher="vit_tiny_patch16_224", out=tmp_path / "s.pt")
    assert error.value.argument == "tiles"
    settings = DistillSettings(teacher="t.pt", out=tmp_path / "s.pt", tiles=str(tmp_path))
    assert settings.work_dir == tmp_path / "s.distill" and settings.tiles == (tmp_path,)
