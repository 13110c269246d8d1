"""The TRIDENT door (``equivit_plugin.trident``) and this package's h5 files in TRIDENT and CLAM.

TRIDENT is not installed (it is not on PyPI), so what it does is reproduced here from its
source, mahmoodlab/TRIDENT at ``TRIDENT_COMMIT``, and CLAM's from mahmoodlab/CLAM at
``CLAM_COMMIT``; each helper names the file and lines it copies. CPU, real H&E (TIAToolbox's
packaged image), one-block models.
"""

from __future__ import annotations

import inspect
import os
import pickle
import sys
import types
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, small_checkpoint
from PIL import Image
from test_docs import python_blocks
from tiatoolbox.data import stain_norm_target
from torch.utils.data import DataLoader, Dataset

from equivit_plugin.features import extract_features, read_features
from equivit_plugin.features.demo import write_aperio_svs
from equivit_plugin.models import (
    load_encoder,
    pooled_embedding,
    tile_transform,
)
from equivit_plugin.trident import (
    TRIDENT_PRECISIONS,
    TridentPatchModel,
    default_enc_name,
    features_dir,
    trident_encoder,
    trident_encoder_parts,
    trident_precision,
)

TRIDENT_COMMIT = "a91fa8490e0210ebbbe58452c3babe009e0ab7ca"
CLAM_COMMIT = "53e2409d4a8189c682c173382964a85f114f923c"
RI_TINY = "equivit_ri_tiny_patch16_224"
DISC_TINY = "equivit_disc_tiny_patch16_224"
VIT_TINY = "vit_tiny_patch16_224"

pytestmark = pytest.mark.filterwarnings(
    "ignore::equivit_plugin.features.RandomWeightsWarning")


# -- TRIDENT, reproduced ---------------------------------------------------------------------
class CustomInferenceEncoder(torch.nn.Module):
    """``trident/patch_encoder_models/load.py:128-231``: ``BasePatchEncoder`` (its ``forward``
    is ``self.model(x)``) and ``CustomInferenceEncoder``'s constructor, whose signature is
    ``(self, enc_name: str, model: torch.nn.Module, transforms: Callable,
    precision: torch.dtype)``."""

    def __init__(self, enc_name: str, model: torch.nn.Module, transforms: Callable,
                 precision: torch.dtype) -> None:
        super().__init__()
        self.enc_name = enc_name
        self.model = model
        self.eval_transforms = transforms
        self.precision = precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class WSIPatcherDataset(Dataset):
    """``trident/wsi_objects/WSIPatcherDataset.py``; the patcher yields ``(PIL tile, x, y)``
    (``WSIPatcher(..., pil=True)``)."""

    def __init__(self, patcher: list[tuple[Image.Image, int, int]], transform: Callable) -> None:
        self.patcher = patcher
        self.transform = transform

    def __len__(self) -> int:
        return len(self.patcher)

    def __getitem__(self, index: int) -> tuple[Any, tuple[int, int]]:
        tile, x, y = self.patcher[index]
        if self.transform:
            tile = self.transform(tile)
        return tile, (x, y)


@torch.inference_mode()
def trident_patch_features(patch_encoder: torch.nn.Module,
                           patcher: list[tuple[Image.Image, int, int]], device: str = "cpu",
                           batch_limit: int = 3) -> np.ndarray:
    """``WSI.extract_patch_features`` (``trident/wsi_objects/WSI.py:883-1025``), the calls on
    the encoder: ``to``/``eval``, ``eval_transforms`` on PIL tiles, ``DataLoader`` batches,
    ``patch_encoder(imgs)`` under its autocast, ``.cpu().numpy()``, ``np.concatenate``."""
    patch_encoder.to(device)
    patch_encoder.eval()
    precision = getattr(patch_encoder, "precision", torch.float32)
    patch_transforms = patch_encoder.eval_transforms
    dataset = WSIPatcherDataset(patcher, patch_transforms)
    collected = []
    for imgs, _ in DataLoader(dataset, batch_size=batch_limit, num_workers=0, pin_memory=False):
        imgs = imgs.to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=precision,
                            enabled=(precision != torch.float32)):
            batch_features = patch_encoder(imgs)
        collected.append(batch_features.cpu().numpy())
    return np.concatenate(collected, axis=0)


def trident_read_patch_features(path: Path) -> dict[str, Any]:
    """``WSI.extract_slide_features`` (``trident/wsi_objects/WSI.py:1101-1149``): how TRIDENT's
    slide encoders get a patch-feature file."""
    with h5py.File(path, "r") as f:
        coords = f["coords"][:]
        patch_features = f["features"][:]
        coords_attrs = dict(f["coords"].attrs)
    patch_features = torch.from_numpy(patch_features).float().unsqueeze(0)
    coords = torch.from_numpy(coords)
    if torch.is_floating_point(coords):
        coords = torch.round(coords).to(torch.int64)
    else:
        coords = coords.to(torch.int64)
    coords = coords.unsqueeze(0)
    if "patch_size_level0" in coords_attrs:
        coords_attrs["patch_size_level0"] = int(coords_attrs["patch_size_level0"])
    return {"features": patch_features, "coords": coords, "attributes": coords_attrs}


# -- data and models -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def he_image() -> np.ndarray:
    """TIAToolbox's packaged real H&E image, ``(1000, 1000, 3)`` uint8 at 0.5 um/px."""
    return np.asarray(stain_norm_target())


def _patcher(image: np.ndarray, size: int, n: int = 4) -> list[tuple[Image.Image, int, int]]:
    """``n`` PIL tiles of side ``size`` with their top-left corners, as TRIDENT's patcher
    yields them."""
    corners = [(x, y) for y in range(0, 1000 - size + 1, size)
               for x in range(0, 1000 - size + 1, size)][:n]
    return [(Image.fromarray(image[y:y + size, x:x + size]), x, y) for x, y in corners]


@pytest.fixture(scope="module")
def ri_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-block Equi-ViT-RI tiny checkpoint (rotation invariant, 192 features)."""
    return small_checkpoint(tmp_path_factory.mktemp("ckpt") / "ri.pt", RI_TINY, 3, depth=1)


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-block disc student with a 192 -> 384 projection after pooling (a distilled
    student's layout: its features leave a linear layer)."""
    return small_checkpoint(tmp_path_factory.mktemp("ckpt") / "student.pt", DISC_TINY, 4,
                            depth=1, feature_dim=384)


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-block plain ViT-tiny checkpoint (not rotation invariant)."""
    return small_checkpoint(tmp_path_factory.mktemp("ckpt") / "vit.pt", VIT_TINY, 5, depth=1)


def _direct(source: Path | str, patcher: list, **kwargs: Any) -> np.ndarray:
    """The reference: ``load_encoder`` on ``tile_transform`` inputs, one fp32 batch."""
    encoder, info = load_encoder(source, **kwargs)
    transform = tile_transform(info)
    with torch.no_grad():
        return encoder(torch.stack([transform(tile) for tile, _, _ in patcher])).numpy()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# -- (a) the contract ------------------------------------------------------------------------
def test_parts_are_exactly_custom_inference_encoders_arguments(ri_ckpt: Path) -> None:
    parts = trident_encoder_parts(ri_ckpt)
    expected = list(inspect.signature(CustomInferenceEncoder).parameters)
    assert expected == ["enc_name", "model", "transforms", "precision"]
    assert list(parts) == expected
    assert isinstance(parts["enc_name"], str) and isinstance(parts["model"], torch.nn.Module)
    assert callable(parts["transforms"]) and parts["precision"] is torch.float32
    assert not parts["model"].training
    model = parts["model"]
    assert isinstance(model, TridentPatchModel)
    assert (model.embedding_dim, model.img_size, model.info.name) == (192, 224, RI_TINY)
    encoder = CustomInferenceEncoder(**parts)  # the whole recipe
    assert encoder.enc_name == parts["enc_name"] and encoder.eval_transforms is parts["transforms"]


@pytest.mark.parametrize("size", [224, 256])  # the model's side; TRIDENT's usual 256 px
def test_trident_loop_equals_direct_forward(ri_ckpt: Path, he_image: np.ndarray,
                                            size: int) -> None:
    patcher = _patcher(he_image, size)
    parts = trident_encoder_parts(ri_ckpt)
    features = trident_patch_features(CustomInferenceEncoder(**parts), patcher)
    assert features.shape == (4, 192) and features.dtype == np.float32
    direct = _direct(ri_ckpt, patcher)
    # batches of 3 + 1 in the loop, of 4 directly: equal to float32 rounding
    np.testing.assert_allclose(features, direct, rtol=1e-5, atol=1e-5)
    print(f"{size} px tiles: TRIDENT loop vs direct, max |diff| "
          f"{np.abs(features - direct).max():.2e}")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precisions_give_float32_close_to_fp32(ri_ckpt: Path, he_image: np.ndarray,
                                                        precision: str) -> None:
    patcher = _patcher(he_image, 224)
    parts = trident_encoder_parts(ri_ckpt, precision=precision)
    assert parts["precision"] is TRIDENT_PRECISIONS[precision]
    features = trident_patch_features(CustomInferenceEncoder(**parts), patcher)
    assert features.dtype == np.float32 and features.shape == (4, 192)
    cos = _cos(features, _direct(ri_ckpt, patcher))
    assert cos.min() > 0.99, cos
    print(f"{precision} autocast vs fp32: cosine min {cos.min():.5f}")


def test_bf16_output_of_a_projection_is_cast_for_numpy(student_ckpt: Path,
                                                       he_image: np.ndarray) -> None:
    """A student's projection returns bfloat16 under autocast, which TRIDENT's
    ``batch_features.cpu().numpy()`` (WSI.py:1008) cannot convert; the recipe's model returns
    float32."""
    patcher = _patcher(he_image, 224, n=4)
    parts = trident_encoder_parts(student_ckpt, precision="bf16")
    batch = torch.stack([parts["transforms"](tile) for tile, _, _ in patcher])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        raw = pooled_embedding(parts["model"].encoder.net, batch)
    assert raw.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="BFloat16"):
        raw.cpu().numpy()
    features = trident_patch_features(CustomInferenceEncoder(**parts), patcher)
    assert features.dtype == np.float32 and features.shape == (4, 384)
    assert _cos(features, _direct(student_ckpt, patcher)).min() > 0.99


def test_registered_name_with_seed() -> None:
    parts = trident_encoder_parts(RI_TINY, seed=0)
    assert parts["enc_name"] == f"{RI_TINY}-random-seed0"
    encoder, info = load_encoder(RI_TINY, seed=0)
    assert info.random_weights and parts["model"].embedding_dim == info.embed_dim == 192
    mine, theirs = parts["model"].encoder.state_dict(), encoder.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)  # the same random weights


def test_d4_average_makes_a_plain_vit_invariant_in_tridents_loop(vit_ckpt: Path,
                                                                 he_image: np.ndarray) -> None:
    patcher = _patcher(he_image, 224, n=4)
    turned = [(tile.transpose(Image.Transpose.ROTATE_90).transpose(
        Image.Transpose.FLIP_LEFT_RIGHT), x, y) for tile, x, y in patcher]
    parts = trident_encoder_parts(vit_ckpt, d4_average=True)
    assert parts["enc_name"].endswith("-d4")
    features = trident_patch_features(CustomInferenceEncoder(**parts), patcher)
    np.testing.assert_allclose(features, _direct(vit_ckpt, patcher, d4_average=True),
                               rtol=1e-5, atol=1e-5)
    moved = trident_patch_features(CustomInferenceEncoder(**parts), turned)
    np.testing.assert_allclose(moved, features, atol=1e-4)
    plain = CustomInferenceEncoder(**trident_encoder_parts(vit_ckpt))
    cos = _cos(trident_patch_features(plain, patcher), trident_patch_features(plain, turned))
    assert cos.min() < 0.999  # without it the plain ViT is measurably not invariant


def test_rotation_invariant_model_through_tridents_loop(ri_ckpt: Path,
                                                        he_image: np.ndarray) -> None:
    patcher = _patcher(he_image, 224, n=4)
    encoder = CustomInferenceEncoder(**trident_encoder_parts(ri_ckpt))
    upright = trident_patch_features(encoder, patcher)
    for turn in (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                 Image.Transpose.ROTATE_270):
        turned = trident_patch_features(
            encoder, [(tile.transpose(turn), x, y) for tile, x, y in patcher])
        assert _cos(upright, turned).min() >= 0.9999


def test_transforms_are_picklable_for_tridents_spawn_workers(ri_ckpt: Path,
                                                             he_image: np.ndarray) -> None:
    # TRIDENT's DataLoader tries fork, then spawn (WSI.py:37-53), which pickles the dataset
    parts = trident_encoder_parts(ri_ckpt)
    tile = _patcher(he_image, 256, n=1)[0][0]
    dataset = WSIPatcherDataset([(tile, 0, 0)], parts["transforms"])
    copy = pickle.loads(pickle.dumps(dataset))
    out, (x, y) = copy[0]
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32 and (x, y) == (0, 0)
    assert torch.equal(out, parts["transforms"](tile))
    # RGBA tiles (some slide readers' PIL mode) are converted
    assert torch.equal(parts["transforms"](tile.convert("RGBA")), out)


@pytest.mark.parametrize(("value", "dtype"), [
    ("fp32", torch.float32), (None, torch.float32), ("float32", torch.float32),
    (torch.float32, torch.float32), ("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16),
    (torch.bfloat16, torch.bfloat16), ("fp16", torch.float16), (torch.float16, torch.float16),
])
def test_precisions_accepted(value: Any, dtype: torch.dtype) -> None:
    assert trident_precision(value) is dtype


@pytest.mark.parametrize("value", ["int8", torch.int8, "fp8", "amp", 16])
def test_precisions_refused_before_building(value: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"precision= must be one of \['fp32', 'bf16', 'fp16'\]"):
        trident_encoder_parts(tmp_path / "missing.pt", precision=value)


def test_enc_names(ri_ckpt: Path, student_ckpt: Path, tmp_path: Path) -> None:
    ri = trident_encoder_parts(ri_ckpt)
    _, info = load_encoder(ri_ckpt)
    assert ri["enc_name"] == f"{RI_TINY}-{info.checkpoint_sha256[:8]}"
    assert default_enc_name(info, d4_average=True) == f"{RI_TINY}-{info.checkpoint_sha256[:8]}-d4"
    assert trident_encoder_parts(student_ckpt)["enc_name"] != ri["enc_name"]
    assert trident_encoder_parts(ri_ckpt, enc_name="equivit_student")["enc_name"] \
        == "equivit_student"
    assert features_dir("job", "20x_224px_0px_overlap", "equivit_student") \
        == Path("job/20x_224px_0px_overlap/features_equivit_student")
    hub = replace(info, name="hf-hub:MahmoodLab/UNI", random_weights=False, checkpoint_sha256="")
    assert default_enc_name(hub) == "hf-hub_MahmoodLab_UNI"
    assert default_enc_name(replace(info, random_weights=True), seed=7) == f"{RI_TINY}-random-seed7"
    for bad in ("", "a/b", "..", "a\\b"):
        with pytest.raises(ValueError, match="enc_name= must be a non-empty name"):
            trident_encoder_parts(tmp_path / "missing.pt", enc_name=bad)


def test_model_refuses_tiles_of_the_wrong_shape(ri_ckpt: Path) -> None:
    model = trident_encoder_parts(ri_ckpt)["model"]
    with pytest.raises(ValueError, match=r"expected \(B, 3, 224, 224\) tiles.*\(2, 3, 256, 256\)"):
        model(torch.zeros(2, 3, 256, 256))


def test_trident_encoder_names_the_missing_package(ri_ckpt: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "trident", None)  # import trident -> ImportError
    with pytest.raises(ImportError) as caught:
        trident_encoder(ri_ckpt)
    message = str(caught.value)
    assert "\n" not in message and "mahmoodlab's TRIDENT" in message
    assert "trident_encoder_parts" in message


def test_trident_encoder_builds_custom_inference_encoder(ri_ckpt: Path, he_image: np.ndarray,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    package = types.ModuleType("trident")
    module = types.ModuleType("trident.patch_encoder_models")
    module.CustomInferenceEncoder = CustomInferenceEncoder
    package.patch_encoder_models = module
    monkeypatch.setitem(sys.modules, "trident", package)
    monkeypatch.setitem(sys.modules, "trident.patch_encoder_models", module)
    encoder = trident_encoder(ri_ckpt, precision="bf16")
    assert isinstance(encoder, CustomInferenceEncoder)
    assert encoder.precision is torch.bfloat16 and encoder.embedding_dim == 192
    patcher = _patcher(he_image, 224, n=3)
    assert trident_patch_features(encoder, patcher).shape == (3, 192)


# -- (b) this package's h5 files, read as TRIDENT and CLAM read them --------------------------
@pytest.fixture(scope="module")
def h5_runs(tmp_path_factory: pytest.TempPathFactory, he_image: np.ndarray,
            ri_ckpt: Path) -> dict[str, Path]:
    """A small Aperio-layout slide (900 x 900 px at 0.499 um/px, as scanners write them: the
    target 0.5 um/px is not level 0's) through ``extract_features``: the default grid (with
    CLAM's ``pt_files``) and an overlapping one (stride 112, every tile)."""
    root = tmp_path_factory.mktemp("h5")
    slide = write_aperio_svs(he_image[:900, :900], 0.499, root / "he_small.svs",
                             magnification=20)
    common = {"model": ri_ckpt, "workers": 0, "batch_size": 32, "print_summary": False}
    grid = extract_features([slide], root / "grid", also_pt=True, **common)
    overlap = extract_features([slide], root / "overlap", stride=112, tissue_mask="none",
                               **common)
    assert grid.ok and overlap.ok and grid.done and overlap.done
    return {"grid": root / "grid", "overlap": root / "overlap", "slide": slide}


@pytest.mark.parametrize("run", ["grid", "overlap"])
def test_tridents_slide_encoders_read_our_file(h5_runs: dict[str, Path], run: str) -> None:
    path = h5_runs[run] / "h5_files" / "he_small.h5"
    batch = trident_read_patch_features(path)
    features, coords, attrs = batch["features"], batch["coords"], batch["attributes"]
    n = features.shape[1]
    assert features.shape == (1, n, 192) and features.dtype == torch.float32
    assert coords.shape == (1, n, 2) and coords.dtype == torch.int64
    assert n == (16 if run == "grid" else 49)
    mine, my_coords, _ = read_features(path)
    np.testing.assert_array_equal(features[0].numpy(), mine)
    np.testing.assert_array_equal(coords[0].numpy(), my_coords)
    # MeanSlideEncoder.forward (slide_encoder_models/load.py:598-600)
    slide = batch["features"].mean(dim=1)
    assert slide.shape == (1, 192)
    np.testing.assert_allclose(slide[0].numpy(), mine.mean(0), rtol=1e-5, atol=1e-6)
    # TITAN/GigaPath take patch_size_level0 as the tile side (load.py:351, :477); CARE turns
    # coords into grid indices with it (load.py:443-444): one cell each, on the grid
    patch0 = attrs["patch_size_level0"]
    assert isinstance(patch0, int) and patch0 == 224  # round(224 * 0.5 / 0.499)
    stride0 = int(attrs["stride"]) * float(attrs["target_mpp"]) / float(attrs["level0_mpp"])
    steps = coords[0].numpy() / stride0
    assert np.abs(steps - np.rint(steps)).max() * stride0 <= 1.0  # rounded to level-0 pixels
    if run == "grid":
        cells = (coords[0] // patch0).numpy()
        np.testing.assert_array_equal(cells, np.rint(steps).astype(np.int64))
        assert len(np.unique(cells, axis=0)) == n


@pytest.mark.parametrize("run", ["grid", "overlap"])
def test_trident_reads_our_file_as_a_coords_file(h5_runs: dict[str, Path], run: str) -> None:
    """``read_coords`` (IO.py:576-605) and the checks of ``extract_patch_features`` /
    ``visualize_coords`` / ``dump_patches`` (WSI.py:930-945): the TRIDENT layout is found
    (no fall-back to CLAM's ``patch_level``), and ``WSIPatcher``'s arithmetic
    (WSIPatcher.py:136-151) gives back the file's level-0 tile side and overlap."""
    path = h5_runs[run] / "h5_files" / "he_small.h5"
    with h5py.File(path, "r") as f:
        attrs = dict(f["coords"].attrs)
        coords = f["coords"][:]
        feature_attrs = dict(f["features"].attrs)
    patch_size = attrs.get("patch_size")
    level0_magnification = attrs.get("level0_magnification")
    target_magnification = attrs.get("target_magnification")
    assert None not in (patch_size, level0_magnification, target_magnification)
    src_pixel_size, dst_pixel_size = 10 / level0_magnification, 10 / target_magnification
    downsample = dst_pixel_size / src_pixel_size
    assert round(patch_size * downsample) == attrs["patch_size_level0"] == 224
    overlap = attrs.get("overlap", 0)
    assert overlap == (0 if run == "grid" else 112)
    assert patch_size - overlap == attrs["stride"]
    step = round(patch_size * downsample) - round(overlap * downsample)
    assert np.abs(np.diff(np.unique(coords[:, 0])) - step).max() <= 1
    assert coords.dtype == np.int64 and np.issubdtype(coords.dtype, np.integer)
    assert (coords >= 0).all() and (coords + 224 <= 900 + 1).all()
    assert (attrs["level0_width"], attrs["level0_height"]) == (900, 900)
    # what TRIDENT's own tests read of a features file (test_real_multi_gpu_equivalence.py:
    # 107-119): the encoder and the slide name
    assert attrs["name"] == feature_attrs["name"] == "he_small"
    assert feature_attrs["encoder"] == RI_TINY


def test_clams_mil_dataset_reads_our_files(h5_runs: dict[str, Path]) -> None:
    """CLAM's ``Generic_MIL_Dataset.__getitem__`` (dataset_modules/dataset_generic.py:
    336-353) with ``data_dir`` = the output folder, ``pt_files`` and ``h5_files`` modes; and
    create_heatmaps.py:309-313."""
    data_dir, slide_id = str(h5_runs["grid"]), "he_small"
    full_path = os.path.join(data_dir, "pt_files", f"{slide_id}.pt")
    pt_features = torch.load(full_path)
    full_path = os.path.join(data_dir, "h5_files", f"{slide_id}.h5")
    with h5py.File(full_path, "r") as hdf5_file:
        features = hdf5_file["features"][:]
        coords = hdf5_file["coords"][:]
    features = torch.from_numpy(features)
    assert features.shape == (16, 192) and features.dtype == torch.float32
    assert coords.shape == (16, 2) and coords.dtype == np.int64
    assert torch.equal(pt_features, features)
    with h5py.File(full_path, "r") as file:
        heatmap_features = torch.tensor(file["features"][:])
    assert torch.equal(heatmap_features, features)


def test_same_tiles_through_trident_recipe_and_our_pipeline(h5_runs: dict[str, Path],
                                                           ri_ckpt: Path) -> None:
    """The tiles at the file's coords, read at the target resolution and embedded through the
    TRIDENT recipe, give the file's features: one encoder, two pipelines."""
    from tiatoolbox.wsicore.wsireader import WSIReader

    features, coords, attrs = read_features(h5_runs["grid"] / "h5_files" / "he_small.h5")
    reader = WSIReader.open(h5_runs["slide"])
    patcher = [(Image.fromarray(reader.read_rect(location=(int(x), int(y)), size=(224, 224),
                                                 resolution=attrs["target_mpp"], units="mpp")),
                int(x), int(y)) for x, y in coords]
    mine = trident_patch_features(CustomInferenceEncoder(**trident_encoder_parts(ri_ckpt)),
                                  patcher, batch_limit=8)
    np.testing.assert_allclose(mine, features, rtol=1e-4, atol=1e-4)
    print(f"TRIDENT recipe vs extract-features on the file's tiles: max |diff| "
          f"{np.abs(mine - features).max():.2e}")


# -- (c) docs/trident.md ---------------------------------------------------------------------
def test_docs_page_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    page = REPO_ROOT / "docs" / "trident.md"
    code = python_blocks(page).replace('"monai_bundle/', f'"{REPO_ROOT}/monai_bundle/')
    assert code, "no python examples in docs/trident.md"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(code, "docs/trident.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "equivit_ri_tiny_patch16_224-08c7fccb torch.bfloat16" in printed
    assert "torch.Size([4, 3, 224, 224]) (4, 192) float32" in printed
    assert "cosine to the tiles turned 90 degrees: min 1.00" in printed
    assert namespace["features"].shape == (4, 192)
    assert "TRIDENT slide encoders: torch.Size([1, 4, 192]) torch.Size([1, 4, 2]) 224" in printed
    assert "CLAM: torch.Size([4, 192]) (4, 2)" in printed
    assert namespace["slide_embedding"].shape == (1, 192)
