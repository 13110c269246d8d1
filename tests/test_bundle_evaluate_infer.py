"""Bundle ``evaluate.json`` and ``inference.json``: run through ``monai.bundle.run`` on tiny
models (64 px, one block) and a few real H&E tiles, checked against direct forward passes."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle import run as bundle_run
from PIL import Image

import equivit_plugin.bundle.inference as inference
from equivit_plugin.bundle.data import TileReadError, tile_transforms
from equivit_plugin.bundle.evaluation import evaluate_rotations, labelled_datalist
from equivit_plugin.bundle.inference import collect_inputs, demo_tiles
from equivit_plugin.equivariance import D4_TRANSFORMS, rotate
from equivit_plugin.models import load_model, save_checkpoint
from equivit_plugin.networks import create_network

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "monai_bundle"
EVALUATE = BUNDLE / "configs" / "evaluate.json"
INFERENCE = BUNDLE / "configs" / "inference.json"
CLASSES = ["ADI", "LYM", "TUM"]
IMG = 64
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A plain ViT with a random absolute position table and average pooling: its predictions change
# under rotation, so accuracy and agreement vary with the angle (the checks can fail).
NOT_INVARIANT = ("vit_tiny_patch16_224", {"global_pool": "avg"})
INVARIANT = ("equivit_ri_tiny_patch16_224", {})


# ------------------------------------------------------------------------------------ helpers


def _checkpoint(path: Path, model_name: str, class_names: list[str] | None = None,
                num_classes: int | None = None, **kwargs) -> Path:
    """A tiny random checkpoint (64 px, depth 1) with spread-out logits (no near ties)."""
    classes = CLASSES if class_names is None else class_names
    num_classes = num_classes or len(classes or CLASSES)
    torch.manual_seed(0)
    model_kwargs = {"num_classes": num_classes, "img_size": IMG, "depth": 1, **kwargs}
    model = create_network(model_name, **model_kwargs)
    with torch.no_grad():
        if getattr(model, "pos_embed", None) is not None:
            model.pos_embed.normal_(std=1.0)
        model.head.weight.mul_(30.0)
    return save_checkpoint(path, model, model_name, class_names, model_kwargs)


def _dataset(root: Path, shared: Path, classes: list[str], per_class: int = 3) -> Path:
    """Copy ``per_class`` real CRC tiles (224 px, .tif and .png) into ``root/<class>/``."""
    for name in classes:
        source = "TUM" if name not in CLASSES else name  # unknown class names get real tiles too
        files = sorted((shared / "crc_tiles" / source).iterdir())[:per_class]
        (root / name).mkdir(parents=True)
        for file in files:
            shutil.copy(file, root / name / file.name)
    return root


def _run(config: Path, **override) -> None:
    bundle_run(config_file=str(config), progress=False, num_workers=0, **override)


def _messages(error: BaseException | None) -> str:
    """All messages of an exception and its causes (MONAI wraps config errors)."""
    parts = []
    while error is not None:
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


def _pil_tile(path: str | Path) -> torch.Tensor:
    """A tile as the model sees it, with PIL + numpy only: ``(3, H, W)`` float32."""
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(((array - MEAN) / STD).transpose(2, 0, 1).copy())


def _layer_tiles(files: list[str]) -> torch.Tensor:
    """Tiles through the data layer's transforms (resized to 64 px): ``(N, 3, 64, 64)``."""
    transform = tile_transforms(IMG)
    return torch.stack([transform({"image": f})["image"].as_tensor() for f in files])


def _assert_default_modes(root: Path) -> None:
    """Every file under ``root`` has the permissions ``open()`` gives (0666 & ~umask), not the
    owner-only 0600 of ``mkstemp``; the ``umask_022`` fixture makes the two differ."""
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    modes = {p.relative_to(root).as_posix(): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o644)}, modes


@pytest.fixture
def umask_022() -> object:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _bad_tiles(folder: Path, shared: Path) -> list[Path]:
    """A truncated JPEG (valid header, data cut) and a text file named .png."""
    jpeg = sorted((shared / "lc25000_lung_train" / "lung_aca").glob("*.jpeg"))[0].read_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    truncated, text = folder / "tile_2b_truncated.jpg", folder / "tile_4b_text.png"
    truncated.write_bytes(jpeg[: len(jpeg) // 2])
    text.write_text("this is not an image\n")
    return [truncated, text]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def tiles(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9 real tiles: ``ADI``, ``LYM``, ``TUM`` folders of 3 each."""
    return _dataset(tmp_path_factory.mktemp("tiles"), shared_data, CLASSES)


# ------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("config", [EVALUATE, INFERENCE], ids=["evaluate", "inference"])
def test_configs_parse_with_bundle_keys(config: Path) -> None:
    parser = ConfigParser()
    parser.read_config(str(config))
    for key in ("imports", "bundle_root", "device", "ckpt_path", "output_dir", "network_def",
                "network", "dataset", "dataloader", "inferer", "evaluator", "run", "tile_fit",
                "exit_on_error"):
        assert key in parser, f"{config.name} lacks {key!r}"
    assert parser["bundle_root"] == "."
    assert parser["run"] == ["$@evaluator()"]
    # The model comes from load_model (one place; inference's load_network also takes an
    # exported file), the loader skips unreadable tiles.
    expected = ("equivit_plugin.bundle.inference.load_network(@ckpt_path)" if config == INFERENCE
                else "equivit_plugin.models.load_model(@ckpt_path, require_class_names=True)")
    assert expected in parser["model"]
    assert parser["dataset"]["_target_"] == "equivit_plugin.bundle.batches.TileDataset"
    assert parser["dataloader"]["collate_fn"] == "$equivit_plugin.bundle.batches.collate_tiles"


# ------------------------------------------------------------------------------------ evaluate


def test_evaluate_matches_direct_rotation_loop(tmp_path: Path, tiles: Path,
                                              umask_022: object) -> None:
    ckpt = _checkpoint(tmp_path / "model.pt", NOT_INVARIANT[0], CLASSES, **NOT_INVARIANT[1])
    out = tmp_path / "eval"
    _run(EVALUATE, ckpt_path=str(ckpt), dataset_dir=str(tiles), output_dir=str(out),
         batch_size=4, with_predictions=True)

    result = json.loads((out / "rotation_eval.json").read_text())
    png = (out / "rotation_eval_polar.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5000
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    _assert_default_modes(out)

    # Independent: the same tiles and checkpoint, one batch, torch.rot90 / the protocol.
    items = labelled_datalist(str(tiles), CLASSES)
    files = [item["image"] for item in items]
    labels = torch.tensor([item["label"] for item in items])
    images = _layer_tiles(files)
    model, _ = load_model(ckpt)
    with torch.no_grad():
        def preds(x: torch.Tensor) -> torch.Tensor:
            return model(x).argmax(1)

        by_angle = {a: preds(rotate(images, a)) for a in range(0, 360, 30)}
        for k in range(4):
            assert torch.equal(by_angle[90 * k], preds(torch.rot90(images, k, (-2, -1))))
        by_d4 = {name: preds(op(images)) for name, op in D4_TRANSFORMS}

    rotation = result["rotation"]
    assert rotation["angles"] == [float(a) for a in range(0, 360, 30)]
    expected = [float((by_angle[a] == labels).double().mean()) for a in range(0, 360, 30)]
    assert rotation["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert rotation["mean"] == pytest.approx(np.mean(expected))
    assert rotation["std"] == pytest.approx(np.std(expected))
    agreement = [float((by_angle[a] == by_angle[0]).double().mean()) for a in range(0, 360, 30)]
    assert rotation["agreement"] == pytest.approx(agreement, abs=1e-12)
    assert rotation["agreement"][0] == 1.0
    assert min(agreement) < 1.0, "test model is rotation invariant: the check would be vacuous"
    assert result["predictions"]["files"] == files
    assert result["predictions"]["rotation"] == [by_angle[a].tolist() for a in range(0, 360, 30)]

    d4 = result["d4"]
    assert d4["names"] == [name for name, _ in D4_TRANSFORMS]
    assert d4["accuracy"] == pytest.approx(
        [float((by_d4[n] == labels).double().mean()) for n in d4["names"]], abs=1e-12)
    assert d4["agreement"][0] == 1.0

    matrix = np.array(result["confusion_matrix"]["matrix"])
    assert result["confusion_matrix"]["class_names"] == CLASSES
    assert matrix.sum() == len(files) == result["num_images"] == 9
    expected_matrix = np.zeros((3, 3), dtype=int)
    for true, pred in zip(labels.tolist(), by_angle[0].tolist()):
        expected_matrix[true, pred] += 1
    assert np.array_equal(matrix, expected_matrix)
    assert result["accuracy_at_0"] == pytest.approx(np.trace(matrix) / 9)
    assert result["model_name"] == NOT_INVARIANT[0] and result["class_names"] == CLASSES
    assert result["num_images_per_class"] == dict.fromkeys(CLASSES, 3)
    assert result["checkpoint"] == str(ckpt) and result["img_size"] == IMG


def test_evaluate_rotation_invariant_model_agrees_on_d4(tmp_path: Path, tiles: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ri.pt", INVARIANT[0], CLASSES)
    out = tmp_path / "eval"
    _run(EVALUATE, ckpt_path=str(ckpt), dataset_dir=str(tiles), output_dir=str(out),
         batch_size=5, angles=[0, 45, 90, 180, 270], with_predictions=True)
    result = json.loads((out / "rotation_eval.json").read_text())
    assert result["d4"]["agreement"] == [1.0] * 8
    assert len(set(result["d4"]["accuracy"])) == 1
    rotation = result["rotation"]
    assert rotation["angles"] == [0.0, 45.0, 90.0, 180.0, 270.0]
    assert [rotation["agreement"][i] for i in (0, 2, 3, 4)] == [1.0] * 4
    # Not vacuous: the model does not predict one class for every tile.
    assert len(set(result["predictions"]["rotation"][0])) > 1


def test_evaluate_validation_part_uses_the_training_split(tmp_path: Path, tiles: Path) -> None:
    from monai.data import partition_dataset_classes

    ckpt = _checkpoint(tmp_path / "m.pt", NOT_INVARIANT[0], CLASSES, **NOT_INVARIANT[1])
    out = tmp_path / "eval"
    _run(EVALUATE, ckpt_path=str(ckpt), dataset_dir=str(tiles), output_dir=str(out),
         batch_size=5, angles=[0, 90], d4=False, part="val", val_fraction=0.34,
         with_predictions=True)
    result = json.loads((out / "rotation_eval.json").read_text())

    # Independently: no MANIFEST.csv, so train.json splits tile by tile, stratified by class,
    # with MONAI's partition over the sorted paths (seed 0, 1/3 held out per class).
    every = sorted((str(p), CLASSES.index(p.parent.name)) for p in tiles.glob("*/*"))
    paths, labels = [p for p, _ in every], [label for _, label in every]
    _, held_out = partition_dataset_classes(paths, labels, ratios=[0.66, 0.34], shuffle=True,
                                            seed=0)
    expected = sorted(held_out, key=lambda p: (CLASSES.index(Path(p).parent.name), p))
    assert 0 < len(expected) < len(paths)
    predictions = result["predictions"]
    assert predictions["files"] == expected and result["num_images"] == len(expected)
    assert predictions["labels"] == [CLASSES.index(Path(p).parent.name) for p in expected]
    # ...and the predictions at 0 degrees are a direct forward pass on exactly those tiles.
    model, _ = load_model(ckpt)
    with torch.no_grad():
        direct = model(_layer_tiles(expected)).argmax(1).tolist()
    assert predictions["rotation"][0] == direct


def test_evaluate_stops_on_an_unreadable_tile_with_one_line(tmp_path: Path, tiles: Path,
                                                            shared_data: Path) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt", INVARIANT[0], CLASSES)
    data = tmp_path / "data"
    shutil.copytree(tiles, data)
    truncated, _ = _bad_tiles(data / "LYM", shared_data)
    (data / "LYM" / "tile_4b_text.png").unlink()
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as info:  # the config's exit_on_error: one line, status 1
        _run(EVALUATE, ckpt_path=str(ckpt), dataset_dir=str(data), output_dir=str(out),
             angles=[0, 90], d4=False)
    message = info.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("evaluation stopped: cannot read 1 of 10 labelled tile(s)")
    assert f"{truncated} (OSError: image file is truncated" in message
    assert not out.exists(), "nothing may be written for a test set with an unreadable tile"
    # Without the up-front check, the sweep itself stops at the batch holding the tile; the
    # Python API raises TileReadError naming it.
    model, _ = load_model(ckpt)
    items = labelled_datalist(str(data), CLASSES)
    with pytest.raises(TileReadError, match=re.escape(str(truncated))):
        evaluate_rotations(model, items, CLASSES, out, angles=[0], d4=False, img_size=IMG,
                           batch_size=4, progress=False, check_files=False)
    assert not out.exists()


def test_evaluate_unknown_class_folder_is_a_clear_error(tmp_path: Path, shared_data: Path) -> None:
    ckpt = _checkpoint(tmp_path / "model.pt", INVARIANT[0], CLASSES)
    data = _dataset(tmp_path / "data", shared_data, ["ADI", "LYM", "STROMA_X"], per_class=1)
    with pytest.raises(Exception) as info:
        _run(EVALUATE, ckpt_path=str(ckpt), dataset_dir=str(data), output_dir=str(tmp_path / "o"))
    text = _messages(info.value)
    assert "['STROMA_X']" in text and str(ckpt) in text and str(data) in text
    assert not (tmp_path / "o" / "rotation_eval.json").exists()


def test_evaluate_checkpoint_with_fewer_classes_is_a_clear_error(tmp_path: Path,
                                                                 tiles: Path) -> None:
    ckpt = _checkpoint(tmp_path / "two.pt", INVARIANT[0], ["ADI", "LYM"])
    with pytest.raises(Exception) as info:
        _run(EVALUATE, ckpt_path=str(ckpt), dataset_dir=str(tiles), output_dir=str(tmp_path / "o"))
    text = _messages(info.value)
    assert "3 class folder(s)" in text and "['TUM']" in text
    assert "predicts 2 classes ['ADI', 'LYM']" in text and str(ckpt) in text


def test_evaluate_python_api_checks_angles(tmp_path: Path, tiles: Path) -> None:
    model, _ = load_model(_checkpoint(tmp_path / "m.pt", INVARIANT[0], CLASSES))
    items = labelled_datalist(str(tiles), CLASSES)
    with pytest.raises(ValueError, match="angles must start with 0"):
        evaluate_rotations(model, items, CLASSES, tmp_path, angles=[90, 0])
    with pytest.raises(ValueError, match=r"logits of shape \(3, 3\).*names 2 classes"):
        evaluate_rotations(model, items[:3], ["a", "b"], tmp_path, img_size=IMG, progress=False)
    result = evaluate_rotations(model, items[:2], CLASSES, tmp_path, angles=[0, 90], d4=False,
                                img_size=IMG, batch_size=1, progress=False)
    assert result["d4"] is None and result["num_images"] == 2
    assert (tmp_path / "rotation_eval.json").is_file()


# ------------------------------------------------------------------------------------ inference


def _inference_inputs(root: Path, shared: Path) -> list[Path]:
    """Six real tiles resized to 64 px with PIL (.png and .jpg), some in a nested folder."""
    sources = [f for c in CLASSES for f in sorted((shared / "crc_tiles" / c).iterdir())[:2]]
    written = []
    for i, source in enumerate(sources):
        folder = root / ("nested/deeper" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"tile_{i}.{'jpg' if i == 3 else 'png'}"
        Image.open(source).convert("RGB").resize((IMG, IMG), Image.BILINEAR).save(path)
        written.append(path)
    (root / ".hidden.png").write_bytes(b"not an image")  # skipped: hidden
    (root / "notes.txt").write_text("skipped: not an image suffix")
    return written


def test_inference_matches_direct_forward(tmp_path: Path, shared_data: Path) -> None:
    ckpt = _checkpoint(tmp_path / "model.pt", NOT_INVARIANT[0], CLASSES, **NOT_INVARIANT[1])
    inputs = _inference_inputs(tmp_path / "in", shared_data)
    out = tmp_path / "out"
    _run(INFERENCE, ckpt_path=str(ckpt), input_dir=str(tmp_path / "in"), output_dir=str(out),
         batch_size=4)
    header, rows = _read_csv(out / "predictions.csv")
    assert header == ["file", "predicted_class", *CLASSES]
    assert not (out / "demo_tiles").exists()  # an explicit input never builds the demo tiles
    files = sorted(str(p) for p in inputs)
    assert [row["file"] for row in rows] == files

    model, _ = load_model(ckpt)
    with torch.no_grad():
        probs = torch.softmax(model(torch.stack([_pil_tile(f) for f in files])), 1).numpy()
    got = np.array([[float(row[c]) for c in CLASSES] for row in rows])
    np.testing.assert_allclose(got, probs, atol=1e-5, rtol=0)
    assert [row["predicted_class"] for row in rows] == [CLASSES[i] for i in probs.argmax(1)]
    assert len({row["predicted_class"] for row in rows}) > 1, "constant model: vacuous check"

    # input_files: exactly those files, in the given order.
    chosen = [str(inputs[4]), str(inputs[1])]
    _run(INFERENCE, ckpt_path=str(ckpt), input_files=chosen, output_dir=str(out))
    _, rows = _read_csv(out / "predictions.csv")
    assert [row["file"] for row in rows] == chosen


def test_inference_default_input_is_tiatoolbox_tiles(tmp_path: Path, umask_022: object) -> None:
    from tiatoolbox.data import stain_norm_target

    ckpt = _checkpoint(tmp_path / "model.pt", INVARIANT[0], CLASSES)
    out = tmp_path / "out"
    _run(INFERENCE, ckpt_path=str(ckpt), output_dir=str(out), batch_size=8)
    tiles = sorted((out / "demo_tiles").glob("*.png"))
    assert len(tiles) == 16  # a centred 4 x 4 grid of 224 px tiles from the 1000 px image
    header, rows = _read_csv(out / "predictions.csv")
    assert header == ["file", "predicted_class", *CLASSES]
    assert sorted(row["file"] for row in rows) == [str(t) for t in tiles]

    # The tiles are crops of TIAToolbox's H&E sample, and the CSV is their forward pass.
    image = stain_norm_target()
    first = np.asarray(Image.open(out / "demo_tiles" / "tiatoolbox_he_224px_y0052_x0052.png"))
    assert np.array_equal(first, image[52:276, 52:276])
    files = [row["file"] for row in rows]
    model, _ = load_model(ckpt)
    with torch.no_grad():
        probs = torch.softmax(model(_layer_tiles(files)), 1).numpy()
    got = np.array([[float(row[c]) for c in CLASSES] for row in rows])
    np.testing.assert_allclose(got, probs, atol=1e-5, rtol=0)

    _assert_default_modes(out)  # demo tiles too (they were owner-only once)

    # Cached: a second call rewrites nothing.
    stamps = [t.stat().st_mtime_ns for t in tiles]
    assert demo_tiles(out / "demo_tiles") == [str(t) for t in tiles]
    assert [t.stat().st_mtime_ns for t in tiles] == stamps


def test_inference_command_line_skips_and_lists_unreadable_tiles(
        tmp_path: Path, shared_data: Path, umask_022: object) -> None:
    """The documented command, from the bundle folder, with loader workers: every readable
    tile gets its row, both bad files are listed with reasons, the exit status says so."""
    ckpt = _checkpoint(tmp_path / "model.pt", NOT_INVARIANT[0], CLASSES, **NOT_INVARIANT[1])
    good = _inference_inputs(tmp_path / "in", shared_data)
    truncated, text = _bad_tiles(tmp_path / "in", shared_data)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
               "configs/inference.json", "--ckpt_path", str(ckpt), "--input_dir",
               str(tmp_path / "in"), "--output_dir", str(out), "--batch_size", "3",
               "--num_workers", "2", "--progress", "False"]
    done = subprocess.run(command, cwd=BUNDLE, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"inference: 6 of 8 tile(s) predicted (6 now, 0 reused from an earlier run) "
                     f"-> {out / 'predictions.csv'}; 2 unreadable tile(s) skipped, listed with "
                     f"reasons in {out / 'failed_tiles.csv'}")
    assert "Traceback" not in done.stderr

    header, rows = _read_csv(out / "predictions.csv")
    files = sorted(str(p) for p in good)
    assert header == ["file", "predicted_class", *CLASSES]
    assert [row["file"] for row in rows] == files
    model, info = load_model(ckpt)
    with torch.no_grad():  # rows stay aligned with their files across workers and dropped tiles
        probs = torch.softmax(model(torch.stack([_pil_tile(f) for f in files])), 1).numpy()
    got = np.array([[float(row[c]) for c in CLASSES] for row in rows])
    np.testing.assert_allclose(got, probs, atol=1e-5, rtol=0)

    _, failed = _read_csv(out / "failed_tiles.csv")
    assert [row["file"] for row in failed] == [str(truncated), str(text)]
    assert failed[0]["reason"].startswith("OSError: image file is truncated")
    assert failed[1]["reason"].startswith("UnidentifiedImageError: cannot identify image file")
    meta = json.loads((out / "predictions.meta.json").read_text())
    assert meta["checkpoint_sha256"] == info.checkpoint_sha256 and meta["complete"] is True
    assert (meta["num_rows"], meta["num_failed"]) == (6, 2)
    assert sorted(p.name for p in out.iterdir()) == ["failed_tiles.csv", "predictions.csv",
                                                     "predictions.meta.json"]
    _assert_default_modes(out)


_MAKE_PREDICT_FN = inference.make_predict_fn


class _Killed(BaseException):
    """Stands for the process being killed (a BaseException, like KeyboardInterrupt: MONAI's
    config machinery does not catch it)."""


class _Interrupt:
    """Wraps ``make_predict_fn``: the forward of batch ``after + 1`` raises :class:`_Killed`."""

    def __init__(self, after: int | None) -> None:
        self.after, self.images = after, 0

    def __call__(self, *args: object, **kwargs: object):
        fn = _MAKE_PREDICT_FN(*args, **kwargs)
        calls = [0]

        def wrapped(images: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            if self.after is not None and calls[0] > self.after:
                raise _Killed
            self.images += images.shape[0]
            return fn(images)

        return wrapped


def test_inference_resumes_an_interrupted_run(tmp_path: Path, shared_data: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path / "model.pt", NOT_INVARIANT[0], CLASSES, **NOT_INVARIANT[1])
    _inference_inputs(tmp_path / "in", shared_data)
    common = {"ckpt_path": str(ckpt), "input_dir": str(tmp_path / "in"), "batch_size": 2}
    _run(INFERENCE, output_dir=str(tmp_path / "whole"), **common)
    reference = (tmp_path / "whole" / "predictions.csv").read_bytes()

    out = tmp_path / "out"
    monkeypatch.setattr(inference, "make_predict_fn", _Interrupt(after=2))
    with pytest.raises(_Killed):
        _run(INFERENCE, output_dir=str(out), **common)
    partial = out / "predictions.csv.partial"
    assert not (out / "predictions.csv").exists(), "an interrupted run must not look finished"
    assert len(partial.read_text().splitlines()) == 1 + 4  # header + 2 batches, fsynced
    with open(partial, "a") as handle:  # killed in the middle of writing a row
        handle.write(f"{tmp_path / 'in' / 'tile_4.png'},ADI,0.33")

    spy = _Interrupt(after=None)
    monkeypatch.setattr(inference, "make_predict_fn", spy)
    capsys.readouterr()
    _run(INFERENCE, output_dir=str(out), **common)
    assert "4 of 6 tile(s) already predicted, skipped; 2 to predict" in capsys.readouterr().err
    assert spy.images == 2, "the rerun must predict only the missing tiles"
    assert (out / "predictions.csv").read_bytes() == reference
    assert not partial.exists()

    # A rerun of a finished run predicts nothing and writes the same file.
    spy.images = 0
    _run(INFERENCE, output_dir=str(out), **common)
    assert spy.images == 0 and (out / "predictions.csv").read_bytes() == reference

    # Rows of another checkpoint are never mixed in: one line, until --resume false.
    other = _checkpoint(tmp_path / "other.pt", INVARIANT[0], CLASSES)
    with pytest.raises(SystemExit) as info:
        _run(INFERENCE, output_dir=str(out), **{**common, "ckpt_path": str(other)})
    message = str(info.value.code)
    assert message.startswith(f"{out / 'predictions.csv'} was made by checkpoint {ckpt} (sha256 ")
    assert f"not by checkpoint {other} (sha256 " in message and "--resume false" in message
    assert (out / "predictions.csv").read_bytes() == reference
    _run(INFERENCE, output_dir=str(out), resume=False, **{**common, "ckpt_path": str(other)})
    assert (out / "predictions.csv").read_bytes() != reference


def test_inference_checkpoint_errors_name_the_problem(tmp_path: Path, shared_data: Path) -> None:
    inputs = _inference_inputs(tmp_path / "in", shared_data)
    no_names = _checkpoint(tmp_path / "no_names.pt", INVARIANT[0], None, num_classes=3)
    with pytest.raises(Exception) as info:
        _run(INFERENCE, ckpt_path=str(no_names), input_files=[str(inputs[0])],
             output_dir=str(tmp_path / "o"))
    assert f"{no_names} has no class names" in _messages(info.value)

    # save_checkpoint refuses to write such a file: forge one (3-class head, 2 names).
    mismatch = _checkpoint(tmp_path / "mismatch.pt", INVARIANT[0], CLASSES)
    payload = torch.load(mismatch, weights_only=True)
    torch.save({**payload, "class_names": ["ADI", "LYM"]}, mismatch)
    with pytest.raises(Exception) as info:
        _run(INFERENCE, ckpt_path=str(mismatch), input_files=[str(inputs[0])],
             output_dir=str(tmp_path / "o"))
    assert f"{mismatch}: 2 class names ['ADI', 'LYM'] for a 3-class head" in \
        _messages(info.value)
    assert not (tmp_path / "o" / "predictions.csv").exists()


def test_collect_inputs(tmp_path: Path) -> None:
    root = tmp_path / "in"
    for name in ("b.PNG", "a.tif", "sub/c.jpeg", ".hidden/d.png", "sub/.e.png", "f.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    found = collect_inputs(str(root))
    assert found == [str(root / "a.tif"), str(root / "b.PNG"), str(root / "sub" / "c.jpeg")]
    assert collect_inputs(str(root), [str(root / "b.PNG")]) == [found[1], found[0], found[2]]
    assert collect_inputs("", str(root / "a.tif")) == [str(root / "a.tif")]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        collect_inputs(None, [str(root / "missing.png")])
    with pytest.raises(FileNotFoundError, match="input directory not found"):
        collect_inputs(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        collect_inputs(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no input images"):
        collect_inputs("", [])


def test_progress_flag_accepts_its_command_line_spelling(capsys: pytest.CaptureFixture) -> None:
    from equivit_plugin.bundle.batches import iterate_batches

    batches = [{"image": [0, 1]}, {"image": [2]}]
    assert list(iterate_batches(batches, "quiet", "false")) == batches
    assert "quiet" not in capsys.readouterr().err
    assert list(iterate_batches(batches, "shown", "true")) == batches
    assert "shown" in capsys.readouterr().err
