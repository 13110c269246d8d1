"""TIAToolbox adapter: Equi-ViT in PatchPredictor / DeepFeatureExtractor (CPU, real H&E)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tiatoolbox")

from tiatoolbox.models.engine.deep_feature_extractor import DeepFeatureExtractor  # noqa: E402
from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig  # noqa: E402
from tiatoolbox.models.engine.patch_predictor import PatchPredictor  # noqa: E402
from tiatoolbox.wsicore.wsireader import WSIReader  # noqa: E402

from equivit_plugin.models.checkpoint import save_checkpoint  # noqa: E402
from equivit_plugin.networks.equivit import create_network  # noqa: E402
from equivit_plugin.tiatoolbox import (  # noqa: E402
    EquiViTClassifier,
    EquiViTEncoder,
    FeatureBatch,
    make_ioconfig,
    preprocess_tile,
)

TINY = "equivit_ri_tiny_patch16_224"


@pytest.fixture(scope="module")
def uint8_tiles(shared_data: Path) -> np.ndarray:
    """The same eight tiles as conftest's ``crc_tiles``, raw uint8 NHWC."""
    from PIL import Image

    files = sorted((shared_data / "crc_tiles").glob("*/*.png"))[:8]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


@pytest.fixture(scope="module")
def classifier() -> EquiViTClassifier:
    torch.manual_seed(1)
    return EquiViTClassifier.from_name(TINY, 3, depth=1)


@pytest.fixture(scope="module")
def encoder() -> EquiViTEncoder:
    torch.manual_seed(2)
    return EquiViTEncoder.from_name(TINY, 0, depth=1)


def _direct_features(net: torch.nn.Module, batch: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return net.forward_head(net.forward_features(batch), pre_logits=True).numpy()


def _box(origin: np.ndarray) -> tuple[int, int, int, int]:
    x, y = (int(v) for v in origin)
    return x, y, x + 224, y + 224


def test_make_ioconfig_defaults_and_stride() -> None:
    config = make_ioconfig()
    assert isinstance(config, IOPatchPredictorConfig)
    assert tuple(config.patch_input_shape) == (224, 224)
    assert tuple(config.stride_shape) == (224, 224)
    assert config.input_resolutions == [{"units": "mpp", "resolution": 0.5}]
    other = make_ioconfig(256, resolution=1.0, stride=128)
    assert tuple(other.patch_input_shape) == (256, 256) and tuple(other.stride_shape) == (128, 128)
    with pytest.raises(ValueError, match="positive"):
        make_ioconfig(0)


def test_preproc_matches_training_normalisation(uint8_tiles: np.ndarray,
                                                crc_tiles: torch.Tensor) -> None:
    out = np.stack([preprocess_tile(t) for t in uint8_tiles])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), crc_tiles.numpy(), atol=1e-6)


def test_patch_predictor_equals_direct_forward(classifier: EquiViTClassifier,
                                               uint8_tiles: np.ndarray,
                                               crc_tiles: torch.Tensor) -> None:
    # 8 tiles, batch_size 3: the last batch holds 2.
    out = PatchPredictor(model=classifier, batch_size=3).run(
        images=uint8_tiles, patch_mode=True, ioconfig=make_ioconfig(), return_probabilities=True)
    probs = np.asarray(out["probabilities"])
    with torch.no_grad():
        expected = torch.softmax(classifier.net(crc_tiles), -1).numpy()
    assert probs.shape == (8, 3)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["predictions"]), expected.argmax(-1))


def test_patch_predictor_on_list_of_tile_files(classifier: EquiViTClassifier,
                                               shared_data: Path,
                                               crc_tiles: torch.Tensor) -> None:
    files = sorted((shared_data / "crc_tiles").glob("*/*.png"))[:5]
    out = PatchPredictor(model=classifier, batch_size=4).run(
        images=files, patch_mode=True, ioconfig=make_ioconfig(), return_probabilities=True)
    with torch.no_grad():
        expected = torch.softmax(classifier.net(crc_tiles[:5]), -1).numpy()
    np.testing.assert_allclose(np.asarray(out["probabilities"]), expected, atol=1e-5)


def test_feature_extractor_patch_mode_equals_direct(encoder: EquiViTEncoder,
                                                    uint8_tiles: np.ndarray,
                                                    crc_tiles: torch.Tensor) -> None:
    out = DeepFeatureExtractor(model=encoder, batch_size=3).run(
        images=uint8_tiles, patch_mode=True, ioconfig=make_ioconfig())
    features = np.asarray(out["features"])
    assert features.shape == (8, encoder.embed_dim) == (8, 192)
    np.testing.assert_allclose(features, _direct_features(encoder.net, crc_tiles), atol=1e-5)


def test_feature_batch_serves_both_engine_reads() -> None:
    import dask.array as da

    array = np.arange(15 * 5, dtype=np.float32).reshape(15, 5)
    batch = FeatureBatch(array)
    assert batch[0].shape == (15, 5)  # DeepFeatureExtractor.infer_wsi: batch_output[0]
    assert da.from_array(batch).compute().shape == (15, 5)  # patch mode: da.from_array
    np.testing.assert_array_equal(batch[1], array[1])
    np.testing.assert_array_equal(np.asarray(batch), array)


def test_feature_extractor_wsi_mode_on_real_slide(encoder: EquiViTEncoder, shared_data: Path,
                                                  tmp_path: Path) -> None:
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    result = DeepFeatureExtractor(model=encoder, batch_size=16).run(
        images=[slide], patch_mode=False, ioconfig=make_ioconfig(), save_dir=tmp_path / "out",
        output_type="zarr", auto_get_mask=True)
    import zarr

    group = zarr.open(str(result[slide]), mode="r")
    features, coords = np.asarray(group["features"]), np.asarray(group["coordinates"])
    assert features.ndim == 2 and features.shape[1] == 192
    assert coords.shape == (features.shape[0], 4)
    reader = WSIReader.open(slide)
    width, height = reader.slide_dimensions(resolution=0, units="level")
    # a grid of non-overlapping patches over the slide; the tissue mask keeps only some
    patch_w = np.median(coords[:, 2] - coords[:, 0])
    patch_h = np.median(coords[:, 3] - coords[:, 1])
    grid = int(np.ceil(width / patch_w) * np.ceil(height / patch_h))
    assert 0 < features.shape[0] < grid
    assert len({tuple(c) for c in coords[:, :2].tolist()}) == len(coords)
    assert (coords[:, :2] >= 0).all() and (coords[:, 0] < width).all() \
        and (coords[:, 1] < height).all()
    assert np.isfinite(features).all()
    # same tiles read with WSIReader (coordinates back from baseline to 0.5 mpp), direct pass
    scale = 0.5 / np.asarray(reader.info.mpp, dtype=float)
    pick = np.linspace(0, len(coords) - 1, 4).astype(int)
    tiles = np.stack([
        reader.read_bounds(_box(np.round(coords[i, :2] / scale).astype(int)),
                           resolution=0.5, units="mpp", pad_constant_values=255,
                           coord_space="resolution")
        for i in pick])
    assert tiles.shape == (4, 224, 224, 3)
    batch = torch.from_numpy(np.stack([preprocess_tile(t) for t in tiles])).permute(0, 3, 1, 2)
    direct = _direct_features(encoder.net, batch)
    # first patch (origin 0 round-trips exactly) matches to 1e-5; later ones differ by the
    # baseline->0.5 mpp coordinate rounding (sub-pixel shift), so compare by cosine
    np.testing.assert_allclose(features[pick[0]], direct[0], atol=1e-5)
    cos = (features[pick] * direct).sum(-1) / (
        np.linalg.norm(features[pick], axis=-1) * np.linalg.norm(direct, axis=-1))
    assert cos.min() > 0.99


def test_rotation_through_engine_equivit_ri_vs_vit(uint8_tiles: np.ndarray) -> None:
    tiles, rotated = uint8_tiles[:4], np.ascontiguousarray(np.rot90(uint8_tiles[:4], 1, (1, 2)))

    def cosines(encoder: EquiViTEncoder) -> np.ndarray:
        engine = DeepFeatureExtractor(model=encoder, batch_size=4)
        a = np.asarray(engine.run(images=tiles, patch_mode=True,
                                  ioconfig=make_ioconfig())["features"])
        b = np.asarray(engine.run(images=rotated, patch_mode=True,
                                  ioconfig=make_ioconfig())["features"])
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        return cos, np.linalg.norm(a - b, axis=-1) / np.linalg.norm(a, axis=-1)

    torch.manual_seed(3)
    cos, rel = cosines(EquiViTEncoder.from_name(TINY, 0, depth=1))
    assert cos.min() >= 0.9999 and rel.max() < 1e-3
    torch.manual_seed(3)
    cos, rel = cosines(EquiViTEncoder.from_name("vit_tiny_patch16_224", 0, depth=1))
    assert rel.min() > 0.01  # random ViT features share a large common part: compare L2


def test_checkpoint_roundtrip_and_class_dict(tmp_path: Path, uint8_tiles: np.ndarray) -> None:
    torch.manual_seed(4)
    net = create_network(TINY, 3, depth=1)
    names = ["ADI", "BACK", "DEB"]
    path = save_checkpoint(tmp_path / "model.pt", net, TINY, class_names=names,
                           model_kwargs={"num_classes": 3, "img_size": 224, "depth": 1})
    model = EquiViTClassifier.create(path)
    assert model.class_dict == {0: "ADI", 1: "BACK", 2: "DEB"}
    assert model.model_name == TINY
    out = PatchPredictor(model=model, batch_size=8).run(
        images=uint8_tiles[:2], patch_mode=True, ioconfig=make_ioconfig(),
        return_probabilities=True)
    batch = torch.from_numpy(np.stack([preprocess_tile(t) for t in uint8_tiles[:2]]))
    with torch.no_grad():
        expected = torch.softmax(net.eval()(batch.permute(0, 3, 1, 2)), -1).numpy()
    np.testing.assert_allclose(np.asarray(out["probabilities"]), expected, atol=1e-5)
    encoder = EquiViTEncoder.from_checkpoint(path)
    assert encoder.embed_dim == 192


def test_checkpoint_class_count_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    net = create_network(TINY, 3, depth=1)
    path = save_checkpoint(tmp_path / "model.pt", net, TINY, class_names=["a", "b", "c"],
                           model_kwargs={"num_classes": 3, "img_size": 224, "depth": 1})
    with pytest.raises(ValueError, match=r"3-class head.*5 classes"):
        EquiViTClassifier.from_checkpoint(path, num_classes=5)
    with pytest.raises(ValueError, match="3 class names given for 2 classes"):
        EquiViTClassifier.from_name(TINY, 2, class_names=["a", "b", "c"], depth=1)
    with pytest.raises(FileNotFoundError):
        EquiViTClassifier.from_checkpoint(tmp_path / "missing.pt")


def test_infer_batch_rejects_nchw(classifier: EquiViTClassifier) -> None:
    with pytest.raises(ValueError, match="NHWC"):
        EquiViTClassifier.infer_batch(classifier, torch.zeros(2, 3, 224, 224), device="cpu")
