"""Bundle ``evaluate.json`` and ``inference.json``: run through ``monai.bundle.run`` on tiny
models (64 px, one block) and a few real H&E tiles, checked against direct forward passes."""

from __future__ import annotations

import csv
import json
import os
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

from equivit_plugin.bundle.data import tile_transforms
from equivit_plugin.bundle.evaluation import evaluate_rotations, labelled_datalist
from equivit_plugin.bundle.inference import (
    checkpoint_class_names,
    collect_inputs,
    demo_tiles,
)
from equivit_plugin.equivariance import D4_TRANSFORMS, rotate
from equivit_plugin.models import model_from_checkpoint, save_checkpoint
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
                "network", "dataset", "dataloader", "inferer", "evaluator", "run"):
        assert key in parser, f"{config.name} lacks {key!r}"
    assert parser["bundle_root"] == "."
    assert parser["run"] == ["$@evaluator()"]


# ------------------------------------------------------------------------------------ evaluate


def test_evaluate_matches_direct_rotation_loop(tmp_path: Path, tiles: Path) -> None:
    ckpt = _checkpoint(tmp_path / "model.pt", NOT_INVARIANT[0], CLASSES, **NOT_INVARIANT[1])
    out = tmp_path / "eval"
    _run(EVALUATE, ckpt_path=str(ckpt), dataset_dir=str(tiles), output_dir=str(out),
         batch_size=4, with_predictions=True)

    result = json.loads((out / "rotation_eval.json").read_text())
    png = (out / "rotation_eval_polar.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5000
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left

    # Independent: the same tiles and checkpoint, one batch, torch.rot90 / the protocol.
    items = labelled_datalist(str(tiles), CLASSES)
    files = [item["image"] for item in items]
    labels = torch.tensor([item["label"] for item in items])
    images = _layer_tiles(files)
    model, _ = model_from_checkpoint(ckpt)
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
    from equivit_plugin.bundle.data import datalist

    ckpt = _checkpoint(tmp_path / "ri.pt", INVARIANT[0], CLASSES)
    out = tmp_path / "eval"
    _run(EVALUATE, ckpt_path=str(ckpt), dataset_dir=str(tiles), output_dir=str(out),
         batch_size=5, angles=[0, 90], d4=False, part="val", val_fraction=0.34)
    result = json.loads((out / "rotation_eval.json").read_text())
    expected = datalist(str(tiles), part="val", val_fraction=0.34, class_names=CLASSES)
    assert 0 < result["num_images"] == len(expected) < 9


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
    model, _ = model_from_checkpoint(_checkpoint(tmp_path / "m.pt", INVARIANT[0], CLASSES))
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

    model, _ = model_from_checkpoint(ckpt)
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


def test_inference_default_input_is_tiatoolbox_tiles(tmp_path: Path) -> None:
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
    model, _ = model_from_checkpoint(ckpt)
    with torch.no_grad():
        probs = torch.softmax(model(_layer_tiles(files)), 1).numpy()
    got = np.array([[float(row[c]) for c in CLASSES] for row in rows])
    np.testing.assert_allclose(got, probs, atol=1e-5, rtol=0)

    # Cached: a second call rewrites nothing.
    stamps = [t.stat().st_mtime_ns for t in tiles]
    assert demo_tiles(out / "demo_tiles") == [str(t) for t in tiles]
    assert [t.stat().st_mtime_ns for t in tiles] == stamps


def test_inference_command_line(tmp_path: Path, shared_data: Path) -> None:
    """The documented command, from the bundle folder, with CLI overrides."""
    ckpt = _checkpoint(tmp_path / "model.pt", INVARIANT[0], CLASSES)
    inputs = _inference_inputs(tmp_path / "in", shared_data)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
               "configs/inference.json", "--ckpt_path", str(ckpt), "--input_dir",
               str(tmp_path / "in"), "--output_dir", str(out), "--batch_size", "4",
               "--num_workers", "1", "--progress", "False"]
    done = subprocess.run(command, cwd=BUNDLE, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    _, rows = _read_csv(out / "predictions.csv")
    assert len(rows) == len(inputs)


def test_inference_checkpoint_errors_name_the_problem(tmp_path: Path, shared_data: Path) -> None:
    inputs = _inference_inputs(tmp_path / "in", shared_data)
    no_names = _checkpoint(tmp_path / "no_names.pt", INVARIANT[0], None, num_classes=3)
    with pytest.raises(Exception) as info:
        _run(INFERENCE, ckpt_path=str(no_names), input_files=[str(inputs[0])],
             output_dir=str(tmp_path / "o"))
    assert f"checkpoint {no_names} has no class names" in _messages(info.value)

    mismatch = _checkpoint(tmp_path / "mismatch.pt", INVARIANT[0], ["ADI", "LYM"], num_classes=3)
    with pytest.raises(Exception) as info:
        _run(INFERENCE, ckpt_path=str(mismatch), input_files=[str(inputs[0])],
             output_dir=str(tmp_path / "o"))
    assert "has a 3-class head" in _messages(info.value)
    assert "2 class names ['ADI', 'LYM']" in _messages(info.value)
    assert not (tmp_path / "o" / "predictions.csv").exists()


def test_checkpoint_class_names() -> None:
    assert checkpoint_class_names({"class_names": ["a", "b"], "model_kwargs": {}}) == ["a", "b"]
    with pytest.raises(ValueError, match="no class names"):
        checkpoint_class_names({"class_names": None}, "x.pt")


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
