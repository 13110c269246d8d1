"""TorchScript and ONNX export (equivit_plugin.export, `equivit export`, the bundle's
configs/export.json and MONAI's own export commands): the exported files compute what the eager
models compute and stay as invariant as they are, checked here on the real colorectal tiles
(not the tiles the exporter checks itself on), with onnxruntime on the CPU."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import REPO_ROOT, small_checkpoint
from monai.bundle import run as bundle_run

from equivit_plugin.cli import main
from equivit_plugin.equivariance import D4_TRANSFORMS
from equivit_plugin.export import (
    ExportError,
    OnnxRuntimeModule,
    export_format_for,
    export_model,
    load_exported,
)
from equivit_plugin.models import (
    PooledEncoder,
    load_model,
)

BUNDLE = REPO_ROOT / "monai_bundle"
DEMO = BUNDLE / "models" / "model.pt"
SMALL = {"img_size": 64, "depth": 2}


def _onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    """An ONNX file run by a plain onnxruntime session (not the package's wrapper)."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.contiguous().numpy()})
    return torch.from_numpy(out)


def _d4_variation(run, x: torch.Tensor) -> float:
    reference = run(x)
    return max(float((run(t(x).contiguous()) - reference).abs().max())
               for _, t in D4_TRANSFORMS[1:])


def _checkpoint(path: Path, name: str, **kwargs) -> Path:
    """A small random checkpoint of ``name`` (64 px, depth 2, features unless num_classes)."""
    return small_checkpoint(path, name, **{**SMALL, **kwargs})


def _resized(tiles: torch.Tensor, size: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(tiles, size=(size, size), mode="area")


def test_the_bar_command(tmp_path: Path, crc_tiles: torch.Tensor,
                         monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    """`equivit export equivit_disc_tiny_patch16_224 --format onnx --out m.onnx`: onnxruntime
    equals eager within 1e-4 and is rot90-invariant within 1e-4, on real tiles."""
    monkeypatch.chdir(tmp_path)
    code = main(["export", "equivit_disc_tiny_patch16_224", "--format", "onnx",
                 "--out", "m.onnx"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "to m.onnx (onnx," in printed and ": invariant" in printed
    eager, info = load_model("equivit_disc_tiny_patch16_224", num_classes=0, seed=0)
    encoder = PooledEncoder(eager).eval()
    with torch.no_grad():
        expected = encoder(crc_tiles)
    got = _onnx(tmp_path / "m.onnx", crc_tiles)
    assert got.shape == (8, 192)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    for k in (1, 2, 3):
        turned = _onnx(tmp_path / "m.onnx", torch.rot90(crc_tiles, k, (-2, -1)))
        torch.testing.assert_close(turned, got, rtol=0, atol=1e-4)
    # The check can fail: the features differ between tiles far more than the tolerance.
    assert float((got - got.roll(1, 0)).abs().max()) > 1e-2


@pytest.mark.parametrize("name, kwargs, invariant", [
    ("equivit_disc_tiny_patch16_224", {}, True),
    ("equivit_ric_tiny_patch16_224", {}, True),
    ("equivit_ri_tiny_patch16_224", {}, True),
    ("equivit_rid_tiny_patch16_224", {}, True),
    ("equivit_disc_tiny_patch16_224", {"feature_dim": 48}, True),  # a student's projection
    ("equivit_tiny_patch16_224", {}, False),  # equivariant embedding, absolute positions
    ("convvit_tiny_patch16_224", {}, False),
])
@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_every_family_member_exports_with_parity(name: str, kwargs: dict, invariant: bool,
                                                 format: str, tmp_path: Path,
                                                 crc_tiles: torch.Tensor) -> None:
    source = _checkpoint(tmp_path / "model.pt", name, **kwargs)
    out = tmp_path / f"model{'.onnx' if format == 'onnx' else '.ts'}"
    result = export_model(source, out, format)
    assert result.path == out and out.is_file() and result.output == "features"
    eager, _ = load_model(source)
    tiles = _resized(crc_tiles, 64)
    with torch.no_grad():
        expected = PooledEncoder(eager).eval()(tiles)
        run = (lambda x: _onnx(out, x)) if format == "onnx" else torch.jit.load(str(out))
        got = run(tiles)
        assert got.shape == (8, kwargs.get("feature_dim", 192)) == (8, result.output_dim)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        variation = _d4_variation(run, tiles)
    if invariant:
        assert variation < 1e-4 and result.invariant
    else:
        assert variation > 1e-3 and not result.invariant  # the measurement can tell


@pytest.mark.parametrize("name, invariant", [("equivit_disc_tiny_patch16_224", True),
                                             ("equivit_ric_tiny_patch16_224", True),
                                             ("equivit_tiny_patch16_224", False)])
def test_exact_invariance_survives_export_in_float64(name: str, invariant: bool,
                                                     tmp_path: Path,
                                                     crc_tiles: torch.Tensor) -> None:
    source = _checkpoint(tmp_path / "model.pt", name)
    result = export_model(source, tmp_path / "model.ts", dtype="float64")
    traced = torch.jit.load(str(result.path))
    with torch.no_grad():
        variation = _d4_variation(traced, _resized(crc_tiles, 64).double())
    if invariant:
        assert variation < 1e-10, variation
    else:
        assert variation > 1e-4, variation


def test_a_classifier_exports_logits_and_its_classes(tmp_path: Path,
                                                     crc_tiles: torch.Tensor) -> None:
    eager, info = load_model(DEMO)
    with torch.no_grad():
        logits = eager(crc_tiles)
    for format in ("onnx", "torchscript"):
        suffix = ".onnx" if format == "onnx" else ".ts"
        result = export_model(DEMO, tmp_path / f"demo{suffix}", format)
        module, exported = load_exported(result.path, require_class_names=True)
        assert (result.output, result.output_dim) == ("logits", 3)
        assert exported.class_names == info.class_names == ("lung_aca", "lung_n", "lung_scc")
        assert (exported.img_size, exported.mean, exported.std) == (224, info.mean, info.std)
        assert exported.extra["exported"]["checkpoint_sha256"] == info.checkpoint_sha256
        with torch.no_grad():
            torch.testing.assert_close(module(crc_tiles), logits, rtol=0, atol=1e-4)
        if format == "onnx":
            assert isinstance(module, OnnxRuntimeModule)
    features = export_model(DEMO, tmp_path / "features.ts", output="features")
    module, exported = load_exported(features.path)
    assert exported.num_classes == 0 and exported.class_names is None
    assert exported.embed_dim == 192
    with torch.no_grad():
        torch.testing.assert_close(module(crc_tiles), PooledEncoder(eager)(crc_tiles),
                                   rtol=0, atol=1e-4)


def test_a_failed_check_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    source = _checkpoint(tmp_path / "model.pt", "equivit_ri_tiny_patch16_224")
    out = tmp_path / "model.onnx"
    # float32 graphs differ from eager by ~1e-6: a 1e-12 tolerance must fail the check.
    with pytest.raises(ExportError, match="differs from the model's by .* nothing written"):
        export_model(source, out, tolerance=1e-12)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    code = main(["export", str(source), "--out", str(out), "--tolerance", "1e-12"])
    assert code == 1 and not out.exists()
    assert "nothing written" in capsys.readouterr().err


def test_the_command_line_offers_the_exporters_choices_and_defaults() -> None:
    """The CLI keeps its own torch-free copies (``--help`` imports no torch): they agree."""
    from equivit_plugin.cli import EXPORT_FORMAT_NAMES, build_parser
    from equivit_plugin.export import DEFAULT_OPSET, DEFAULT_TOLERANCE, EXPORT_FORMATS

    arguments = build_parser().parse_args(["export", "m.pt", "--out", "m.ts"])
    assert tuple(EXPORT_FORMATS) == EXPORT_FORMAT_NAMES
    assert (arguments.opset, arguments.tolerance) == (DEFAULT_OPSET, DEFAULT_TOLERANCE)


def test_bad_arguments_are_one_clear_line(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    features = _checkpoint(tmp_path / "model.pt", "equivit_disc_tiny_patch16_224")
    with pytest.raises(ExportError, match=r"is a torchscript file name, but format= 'onnx'"):
        export_format_for("m.ts", "onnx")
    with pytest.raises(ExportError, match=r"give format= \(torchscript or onnx\)"):
        export_format_for("m.bin")
    with pytest.raises(ExportError, match="no classifier head"):
        export_model(features, tmp_path / "m.ts", output="logits")
    with pytest.raises(ExportError, match="output= 'pooled'"):
        export_model(features, tmp_path / "m.ts", output="pooled")
    with pytest.raises(ExportError, match="float64' is for TorchScript"):
        export_model(features, tmp_path / "m.onnx", dtype="float64")
    with pytest.raises(ExportError, match="source= 'missing.pt'.*not found"):
        export_model("missing.pt", tmp_path / "m.ts")
    with pytest.raises(FileNotFoundError, match="exported model not found"):
        load_exported(tmp_path / "none.onnx")
    assert main(["export", "nope_model", "--out", str(tmp_path / "m.ts")]) == 2
    assert main(["export", str(features), "--format", "onnx",
                 "--out", str(tmp_path / "m.ts")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[0].startswith("equivit export: error: MODEL: 'nope_model'")
    assert "is a torchscript file name, but --format 'onnx'" in errors[1]
    assert not list(tmp_path.glob("m.*"))


def test_bundle_export_config_and_inference_on_the_exported_file(
        tmp_path: Path, shared_data: Path) -> None:
    """configs/export.json writes the file; configs/inference.json runs it with --ckpt_path
    and predicts what it predicts with the checkpoint."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for file in sorted((shared_data / "crc_tiles").glob("*/*.png"))[:6]:
        shutil.copy(file, inputs / file.name)
    exported = tmp_path / "model.onnx"
    bundle_run(config_file=str(BUNDLE / "configs" / "export.json"),
               ckpt_path=str(DEMO), export_format="onnx", export_path=str(exported))
    assert exported.is_file()

    def predictions(checkpoint: Path, out: Path) -> list[dict[str, str]]:
        bundle_run(config_file=str(BUNDLE / "configs" / "inference.json"),
                   ckpt_path=str(checkpoint), input_dir=str(inputs), output_dir=str(out),
                   progress=False, num_workers=0)
        with open(out / "predictions.csv", newline="") as handle:
            return list(csv.DictReader(handle))

    eager, onnx = predictions(DEMO, tmp_path / "eager"), predictions(exported, tmp_path / "o")
    assert [r["file"] for r in onnx] == [r["file"] for r in eager] and len(onnx) == 6
    assert [r["predicted_class"] for r in onnx] == [r["predicted_class"] for r in eager]
    classes = ["lung_aca", "lung_n", "lung_scc"]
    np.testing.assert_allclose([[float(r[c]) for c in classes] for r in onnx],
                               [[float(r[c]) for c in classes] for r in eager], atol=1e-5)
    meta = json.loads((tmp_path / "o" / "predictions.meta.json").read_text())
    assert str(exported) in json.dumps(meta)


def test_monai_onnx_export_of_a_distilled_student(tmp_path: Path,
                                                  crc_tiles: torch.Tensor) -> None:
    """MONAI's own `onnx_export` with export.json's network_def (the checkpoint's model, here
    a student with a projection): onnxruntime equals eager and stays invariant. Its
    file has no equivit metadata, so load_exported says how to make one that has."""
    student = _checkpoint(tmp_path / "student.pt", "equivit_disc_tiny_patch16_224",
                          feature_dim=48, num_classes=0)
    out = tmp_path / "student.onnx"
    command = [sys.executable, "-m", "monai.bundle", "onnx_export", "network_def",
               "--filepath", str(out), "--ckpt_file", str(student), "--key_in_ckpt", "model",
               "--config_file", "configs/export.json", "--meta_file",
               "configs/metadata.json", "--ckpt_path", str(student), "--use_trace", "True",
               "--input_shape", "[2, 3, 64, 64]",
               "--converter_kwargs", "{'dynamo': False, 'opset_version': 17, "
               "'input_names': ['image'], 'dynamic_axes': {'image': {0: 'batch'}}}"]
    done = subprocess.run(command, cwd=BUNDLE, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    eager, _ = load_model(student)
    tiles = _resized(crc_tiles, 64)
    with torch.no_grad():
        expected = eager(tiles)
    got = _onnx(out, tiles)
    assert got.shape == (8, 48)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert _d4_variation(lambda x: _onnx(out, x), tiles) < 1e-4
    with pytest.raises(ExportError, match="has no 'equivit' metadata.*equivit export"):
        load_exported(out)


def test_large_files_lists_the_demo_checkpoint_with_its_hash(tmp_path: Path) -> None:
    """`python -m monai.bundle download_large_files` checks the committed checkpoint against
    large_files.yml's hash (and would refuse a changed file)."""
    from monai.apps.utils import HashCheckError
    from monai.bundle import download_large_files

    from equivit_plugin.models import file_sha256

    listed = (BUNDLE / "large_files.yml").read_text()
    assert 'path: "models/model.pt"' in listed and file_sha256(DEMO) in listed
    download_large_files(bundle_path=str(BUNDLE))
    copy = tmp_path / "bundle"
    (copy / "models").mkdir(parents=True)
    shutil.copy(BUNDLE / "large_files.yml", copy / "large_files.yml")
    (copy / "models" / "model.pt").write_bytes(DEMO.read_bytes()[:-1] + b"x")
    with pytest.raises(HashCheckError, match="hash check of existing file failed"):
        download_large_files(bundle_path=str(copy))
