"""The LazySlide door: LazySlide's own tissue detection, tiling and feature extraction run an
Equi-ViT student from a checkpoint, and store exactly what the encoder gives on the same tiles
read independently (OpenSlide at the stored coordinates). CPU, the real CMU-1 slide at 1 um/px
(8 tiles of 224 px)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lazyslide as zs
import numpy as np
import openslide
import pytest
import torch
from conftest import REPO_ROOT, small_checkpoint
from test_docs import python_blocks

from equivit_plugin.lazyslide import LazySlideEncoder, lazyslide_model
from equivit_plugin.models import (
    ModelLoadError,
    PooledEncoder,
    TileTransform,
    load_encoder,
    tile_transform,
)

STUDENT = "equivit_disc_tiny_patch16_224"  # the default student's architecture
FEATURE_DIM = 64
N_TILES = 8  # the slide's tissue in 224 px tiles at 1 um/px
PARITY = 1e-5  # stored vs direct forward pass, max abs (measured 6e-7: batches differ)


@pytest.fixture(scope="module")
def slide(shared_data: Path) -> Path:
    path = shared_data / "slides" / "CMU-1-Small-Region.svs"
    assert path.is_file(), f"missing {path}"
    return path


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-block ``equivit_disc_tiny`` checkpoint with a 64-wide projection (a stand-in for
    a distilled student; exactly invariant to 90-degree rotations)."""
    return small_checkpoint(tmp_path_factory.mktemp("ckpt") / "student.pt", STUDENT, 3,
                            depth=2, feature_dim=FEATURE_DIM)


@pytest.fixture(scope="module")
def direct(student: Path) -> tuple[torch.nn.Module, TileTransform]:
    """The student's encoder and transform from the shared building blocks, not the door."""
    encoder, info = load_encoder(student)
    return encoder, tile_transform(info)


def _close(wsi) -> None:
    # wsidata 0.11's reader closes its OpenSlide handle in __del__, which fails (an ignored
    # ctypes.ArgumentError) when garbage collection has already finalised the handle: close
    # it while both are alive.
    wsi.reader.detach_reader()


@pytest.fixture(scope="module")
def wsi(slide: Path):
    """The slide with LazySlide's tissues and 224 px tiles at 1 um/px (no zarr store)."""
    wsi = zs.open_wsi(slide, store=None)
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, 224, mpp=1.0)
    assert len(wsi["tiles"]) == N_TILES
    yield wsi
    _close(wsi)


@pytest.fixture(scope="module")
def extracted(wsi, student: Path) -> LazySlideEncoder:
    """The student's features stored by LazySlide's feature extraction (batches of 3, so the
    last one is short)."""
    encoder = lazyslide_model(student)
    zs.tl.feature_extraction(wsi, **encoder.arguments, device="cpu", batch_size=3, pbar=False)
    return encoder


@pytest.fixture(scope="module")
def direct_tiles(wsi, slide: Path, direct: tuple[torch.nn.Module, TileTransform]
                 ) -> torch.Tensor:
    """The stored tiles read with OpenSlide at LazySlide's level-0 boxes, through the model's
    own :func:`tile_transform` (which shrinks each 448 px region to 224 px):
    ``(N_TILES, 3, 224, 224)``."""
    transform = direct[1]
    reader = openslide.OpenSlide(str(slide))
    try:
        regions = [reader.read_region((int(x0), int(y0)), 0, (int(x1 - x0), int(y1 - y0)))
                   for x0, y0, x1, y1 in wsi["tiles"].bounds.to_numpy()]
    finally:
        reader.close()
    return torch.stack([transform(np.asarray(r.convert("RGB"))) for r in regions])


def _forward(direct: tuple[torch.nn.Module, TileTransform], tiles: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return direct[0](tiles).numpy()


def test_feature_extraction_stores_what_the_encoder_gives(wsi, extracted: LazySlideEncoder,
                                                          direct_tiles: torch.Tensor,
                                                          direct: tuple) -> None:
    assert extracted.model_name == "student" and extracted.feature_key() == "student_tiles"
    table = wsi.tables["student_tiles"]
    assert table.X.shape == (N_TILES, FEATURE_DIM) and table.X.dtype == np.float32
    assert list(table.obs["tile_id"]) == list(wsi["tiles"]["tile_id"])
    features = _forward(direct, direct_tiles)
    gap = float(np.abs(np.asarray(table.X) - features).max())
    print(f"LazySlide vs direct forward: max abs {gap:.3g} (features up to "
          f"{np.abs(features).max():.3g})")
    assert gap <= PARITY
    assert np.abs(features).max() > 0.1  # features, not zeros


def test_stored_features_of_an_invariant_student_are_rotation_invariant(
        wsi, extracted: LazySlideEncoder, direct_tiles: torch.Tensor, direct: tuple) -> None:
    stored = np.asarray(wsi.tables[extracted.feature_key()].X)
    for k in (1, 2, 3):
        rotated = _forward(direct, torch.rot90(direct_tiles, k, dims=(2, 3)))
        print(f"rotated by {90 * k}: max abs {np.abs(rotated - stored).max():.3g}")
        np.testing.assert_allclose(rotated, stored, rtol=0, atol=PARITY,
                                   err_msg=f"rotated by {90 * k} degrees")


def test_amp_in_bfloat16_stores_float32(wsi, extracted: LazySlideEncoder) -> None:
    # LazySlide stores output.cpu().numpy(), which has no bfloat16: the door returns float32.
    zs.tl.feature_extraction(wsi, **extracted.arguments, key_added="student_bf16",
                             device="cpu", amp=True, autocast_dtype=torch.bfloat16,
                             pbar=False)
    bf16 = np.asarray(wsi.tables["student_bf16"].X)
    full = np.asarray(wsi.tables[extracted.feature_key()].X)
    assert bf16.dtype == np.float32 and bf16.shape == full.shape
    assert not np.array_equal(bf16, full)  # autocast did run
    cosine = (bf16 * full).sum(1) / (np.linalg.norm(bf16, axis=1) * np.linalg.norm(full, axis=1))
    assert cosine.min() > 0.99


def test_the_door_holds_what_feature_extraction_takes(student: Path) -> None:
    encoder = lazyslide_model(student, d4_average=True)
    assert encoder.model_name == "student_d4" and encoder.feature_key("cells") == "student_d4_cells"
    assert set(encoder.arguments) == {"model", "transform", "model_name"}
    assert isinstance(encoder.model, PooledEncoder) and encoder.model.upcast
    assert not encoder.model.training
    assert isinstance(encoder.transform, TileTransform)
    assert encoder.transform.img_size == encoder.info.img_size == 224
    tile = np.full((256, 256, 3), 200, dtype=np.uint8)  # LazySlide's tile: (h, w, 3) uint8
    x = encoder.transform(tile)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    with torch.inference_mode():
        assert encoder.model(x[None]).shape == (1, FEATURE_DIM)
    named = lazyslide_model(STUDENT, seed=0, model_name="disc-random.v1")
    assert named.model_name == "disc-random.v1" and named.info.random_weights
    assert lazyslide_model(STUDENT, seed=0).model_name == STUDENT


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"source": 3}, TypeError, "source= must be a model name or a checkpoint path"),
    ({"source": "not_a_model"}, ModelLoadError, "source= 'not_a_model' is neither"),
    ({"source": "missing.pt"}, ModelLoadError, "source= checkpoint not found: missing.pt"),
    ({"source": STUDENT, "weights": "w.bin"}, ModelLoadError, "weights= 'w.bin' is for"),
    ({"source": STUDENT, "d4_average": "yes"}, TypeError, "d4_average= must be True or False"),
    ({"source": STUDENT, "seed": 1.5}, TypeError, "seed= must be an integer or None"),
    ({"source": STUDENT, "model_name": "my model"}, ValueError, "model_name= must be"),
    ({"source": STUDENT, "model_name": "__x"}, ValueError, "model_name= must be"),
])
def test_bad_arguments_fail_with_one_line_naming_the_argument(kwargs: dict, error: type,
                                                              message: str) -> None:
    with pytest.raises(error) as raised:
        lazyslide_model(**kwargs)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_importing_the_door_does_not_import_lazyslide() -> None:
    code = ("import sys, equivit_plugin.lazyslide\n"
            "print(sorted(m for m in ('lazyslide', 'wsidata', 'spatialdata') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_docs_example_runs(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    code = python_blocks(REPO_ROOT / "docs" / "lazyslide.md")
    assert code, "no python examples in docs/lazyslide.md"
    code = code.replace('"../shared/data', f'"{shared_data}')
    monkeypatch.chdir(tmp_path)  # the example writes its checkpoint to the working directory
    namespace: dict = {"__name__": "docs_example"}
    try:
        exec(compile(code, "docs/lazyslide.md", "exec"), namespace)
    finally:
        if "wsi" in namespace:
            _close(namespace["wsi"])
    printed = capsys.readouterr().out
    assert "student 224 64" in printed
    assert "student_tiles (8, 64) float32" in printed
    assert "slide (64,)" in printed
    assert namespace["features"].shape == (N_TILES, FEATURE_DIM)
    assert (tmp_path / "student.pt").is_file()
