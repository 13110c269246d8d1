"""TIAToolbox adapter: Equi-ViT in PatchPredictor / DeepFeatureExtractor (CPU, real H&E)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tiatoolbox")

from tiatoolbox.models.engine.deep_feature_extractor import DeepFeatureExtractor  # noqa: E402
from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig  # noqa: E402
from tiatoolbox.models.engine.patch_predictor import PatchPredictor  # noqa: E402
from tiatoolbox.wsicore.wsireader import WSIReader  # noqa: E402

from equivit_plugin.models import (  # noqa: E402
    ModelLoadError,
    create_model,
    normalise_tile,
    save_checkpoint,
)
from equivit_plugin.tiatoolbox import (  # noqa: E402
    EquiViTClassifier,
    EquiViTEncoder,
    FeatureBatch,
    make_ioconfig,
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
    return EquiViTClassifier.from_name(TINY, 3, class_names=["ADI", "BACK", "DEB"], depth=1)


@pytest.fixture(scope="module")
def encoder() -> EquiViTEncoder:
    torch.manual_seed(2)
    return EquiViTEncoder.from_name(TINY, depth=1)


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
    out = np.stack([normalise_tile(t) for t in uint8_tiles])
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
    np.testing.assert_array_equal(batch[0], array)  # DeepFeatureExtractor.infer_wsi: output 0
    np.testing.assert_array_equal(da.from_array(batch, chunks=(4, 5)).compute(), array)
    np.testing.assert_array_equal(batch[1:3], array[1:3])  # slices are rows
    np.testing.assert_array_equal(np.asarray(batch), array)
    for index in (1, -1, np.int64(2)):  # an integer is an output number: only 0 exists
        with pytest.raises(IndexError, match="one output"):
            batch[index]


SLIDE_MPP = 0.5  # make_ioconfig()'s read resolution: the engine's coordinates live there


@pytest.fixture(scope="module")
def slide(shared_data: Path) -> Path:
    return shared_data / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def tissue_boxes(slide: Path) -> np.ndarray:
    """Independent count of tissue patches: the 224-px grid at 0.5 mpp, kept where the
    slide's own tissue mask (``WSIReader.tissue_mask`` at 1.25x) has any pixel."""
    reader = WSIReader.open(slide)
    width, height = reader.slide_dimensions(resolution=SLIDE_MPP, units="mpp")
    mask = reader.tissue_mask(resolution=1.25, units="power").img
    sy, sx = mask.shape[0] / height, mask.shape[1] / width
    boxes = [(x, y, x + 224, y + 224) for y in range(0, height, 224) for x in range(0, width, 224)
             if mask[int(y * sy):int(min(y + 224, height) * sy),
                     int(x * sx):int(min(x + 224, width) * sx)].any()]
    return np.asarray(boxes)


def _read_tiles(slide: Path, boxes: np.ndarray) -> torch.Tensor:
    """The engine's patches re-read with WSIReader, normalised, ``(N, 3, 224, 224)``."""
    reader = WSIReader.open(slide)
    tiles = np.stack([reader.read_bounds(tuple(int(v) for v in box), resolution=SLIDE_MPP,
                                         units="mpp", pad_constant_values=255,
                                         coord_space="resolution") for box in boxes])
    assert tiles.shape == (len(boxes), 224, 224, 3)
    return torch.from_numpy(np.stack([normalise_tile(t) for t in tiles])).permute(0, 3, 1, 2)


def _sorted(boxes: np.ndarray) -> np.ndarray:
    return np.asarray(sorted(map(tuple, np.asarray(boxes).tolist())))


def test_feature_extractor_wsi_mode_on_real_slide(encoder: EquiViTEncoder, slide: Path,
                                                  tissue_boxes: np.ndarray,
                                                  tmp_path: Path) -> None:
    import zarr

    result = DeepFeatureExtractor(model=encoder, batch_size=16).run(
        images=[slide], patch_mode=False, ioconfig=make_ioconfig(), save_dir=tmp_path / "out",
        output_type="zarr", auto_get_mask=True)
    group = zarr.open(str(result[slide]), mode="r")
    features, coords = np.asarray(group["features"]), np.asarray(group["coordinates"])
    assert features.shape == (len(tissue_boxes), 192)
    assert coords.shape == (len(tissue_boxes), 4)
    np.testing.assert_array_equal(_sorted(coords), _sorted(tissue_boxes))
    width, height = WSIReader.open(slide).slide_dimensions(resolution=SLIDE_MPP, units="mpp")
    assert (coords[:, :2] >= 0).all() and (coords[:, 0] < width).all() \
        and (coords[:, 1] < height).all()
    # every patch equals a direct forward pass on the same tile read with WSIReader
    np.testing.assert_allclose(features, _direct_features(encoder.net, _read_tiles(slide, coords)),
                               atol=1e-5)


def test_patch_predictor_wsi_mode_zarr_and_annotationstore(classifier: EquiViTClassifier,
                                                           slide: Path,
                                                           tissue_boxes: np.ndarray,
                                                           tmp_path: Path) -> None:
    import zarr
    from tiatoolbox.annotation.storage import SQLiteStore

    engine = PatchPredictor(model=classifier, batch_size=32)
    zarr_out = engine.run(images=[slide], patch_mode=False, ioconfig=make_ioconfig(),
                          save_dir=tmp_path / "zarr", output_type="zarr",
                          return_probabilities=True)
    group = zarr.open(str(zarr_out[slide]), mode="r")
    probs, coords = np.asarray(group["probabilities"]), np.asarray(group["coordinates"])
    assert probs.shape == (len(tissue_boxes), 3)
    np.testing.assert_array_equal(_sorted(coords), _sorted(tissue_boxes))
    with torch.no_grad():
        expected = torch.softmax(classifier.net(_read_tiles(slide, coords)), -1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(group["predictions"]), expected.argmax(-1))

    store_out = PatchPredictor(model=classifier, batch_size=32).run(
        images=[slide], patch_mode=False, ioconfig=make_ioconfig(),
        save_dir=tmp_path / "store", output_type="annotationstore", return_probabilities=True)
    store = SQLiteStore(store_out[slide])
    annotations = list(store.values())
    assert len(annotations) == len(tissue_boxes)
    # the store is in baseline pixels: boxes are the 0.5-mpp boxes scaled by 0.5 / 0.499
    reader = WSIReader.open(slide)
    scale = SLIDE_MPP / float(reader.info.mpp[0])
    bounds = np.asarray([a.geometry.bounds for a in annotations])
    np.testing.assert_allclose(_sorted(bounds), _sorted(tissue_boxes * scale), atol=1e-6)
    width, height = reader.slide_dimensions(resolution=0, units="level")
    assert (bounds[:, :2] >= 0).all() and (bounds[:, 0] < width).all() \
        and (bounds[:, 1] < height).all()
    # class names from class_dict; probabilities as properties, same as the zarr run
    by_box = {tuple(np.round(np.asarray(b) / scale).astype(int)[:2]): a.properties
              for b, a in zip(bounds, annotations)}
    for box, row in zip(coords, expected):
        props = by_box[tuple(int(v) for v in box[:2])]
        assert props["type"] == classifier.class_dict[int(row.argmax())]
        np.testing.assert_allclose([props[f"prob_{name}"] for name in
                                    classifier.class_dict.values()], row, atol=1e-5)


def test_prediction_overlay_png(classifier: EquiViTClassifier, slide: Path,
                                tmp_path: Path) -> None:
    from PIL import Image

    from equivit_plugin.tiatoolbox.overlay import (
        NOT_ANALYSED,
        prediction_map,
        save_prediction_overlay,
    )

    label_map = prediction_map(np.array([[0, 0, 224, 224], [224, 448, 448, 672]]),
                               np.array([2, 0]), shape=(100, 60), scale=0.125)
    assert label_map[0, 0] == 3 and label_map[27, 27] == 3 and label_map[28, 28] == NOT_ANALYSED
    assert label_map[56, 28] == 1 and label_map[83, 55] == 1 and (label_map == 1).sum() == 28 * 28
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        prediction_map(np.zeros((2, 2)), np.zeros(2), shape=(10, 10), scale=1.0)
    path = save_prediction_overlay(slide, np.array([[0, 0, 224, 224]]), np.array([1]),
                                   {0: "a", 1: "b", 2: "c"}, tmp_path / "overlay.png")
    assert Image.open(path).size[0] > 200


def _load_example() -> object:
    """``examples/tiatoolbox_overlay.py`` as a module (it is a script, not in the package)."""
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location(
        "tiatoolbox_overlay", REPO_ROOT / "examples" / "tiatoolbox_overlay.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # dataclasses look their module up there
    spec.loader.exec_module(example)
    return example


def test_example_script_writes_overlay_with_bundle_model(tmp_path: Path, slide: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    from conftest import REPO_ROOT
    from PIL import Image

    checkpoint = REPO_ROOT / "monai_bundle" / "models" / "model.pt"
    example = _load_example()
    result = example.main(["--slide", str(slide), "--out", str(tmp_path / "overlay.png")])
    # The default model is the bundle's trained checkpoint, with its class names.
    reference = EquiViTClassifier.from_checkpoint(checkpoint)
    assert result.class_dict == reference.class_dict == {0: "lung_aca", 1: "lung_n",
                                                         2: "lung_scc"}
    # Every patch's class is the checkpoint's own argmax on the tile read back from the slide.
    reader = WSIReader.open(slide)
    tiles = np.stack([reader.read_bounds(tuple(int(v) for v in box), resolution=SLIDE_MPP,
                                         units="mpp", coord_space="resolution")
                      for box in result.coordinates])
    batch = torch.from_numpy(np.stack([normalise_tile(t) for t in tiles])).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = reference.net(batch).argmax(-1).numpy()
    np.testing.assert_array_equal(result.predictions, expected)
    counts = {name: int((expected == k).sum()) for k, name in reference.class_dict.items()
              if (expected == k).any()}
    assert f"{len(expected)} tissue patches: {counts}" in capsys.readouterr().out
    with Image.open(result.overlay) as image:
        assert image.format == "PNG" and min(image.size) > 300


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
    cos, rel = cosines(EquiViTEncoder.from_name(TINY, depth=1))
    assert cos.min() >= 0.9999 and rel.max() < 1e-3
    torch.manual_seed(3)
    cos, rel = cosines(EquiViTEncoder.from_name("vit_tiny_patch16_224", depth=1))
    assert rel.min() > 0.01  # random ViT features share a large common part: compare L2


def test_checkpoint_roundtrip_and_class_dict(tmp_path: Path, uint8_tiles: np.ndarray) -> None:
    torch.manual_seed(4)
    net = create_model(TINY, 3, depth=1)
    names = ["ADI", "BACK", "DEB"]
    path = save_checkpoint(tmp_path / "model.pt", net, TINY, class_names=names,
                           model_kwargs={"num_classes": 3, "img_size": 224, "depth": 1})
    model = EquiViTClassifier.create(path)
    assert model.class_dict == {0: "ADI", 1: "BACK", 2: "DEB"}
    assert model.model_name == TINY
    out = PatchPredictor(model=model, batch_size=8).run(
        images=uint8_tiles[:2], patch_mode=True, ioconfig=make_ioconfig(),
        return_probabilities=True)
    batch = torch.from_numpy(np.stack([normalise_tile(t) for t in uint8_tiles[:2]]))
    with torch.no_grad():
        expected = torch.softmax(net.eval()(batch.permute(0, 3, 1, 2)), -1).numpy()
    np.testing.assert_allclose(np.asarray(out["probabilities"]), expected, atol=1e-5)
    encoder = EquiViTEncoder.from_checkpoint(path)
    assert encoder.embed_dim == 192


def test_checkpoint_class_count_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    net = create_model(TINY, 3, depth=1)
    path = save_checkpoint(tmp_path / "model.pt", net, TINY, class_names=["a", "b", "c"],
                           model_kwargs={"num_classes": 3, "img_size": 224, "depth": 1})
    with pytest.raises(ModelLoadError, match=r"model.pt has a 3-class head.*num_classes=5"):
        EquiViTClassifier.from_checkpoint(path, num_classes=5)
    with pytest.raises(ModelLoadError, match=r"predicts classes \['a', 'b', 'c'\].*class_names="):
        EquiViTClassifier.from_checkpoint(path, class_names=["a", "b", "x"])
    with pytest.raises(ValueError, match=r"3 class names \['a', 'b', 'c'\] for a 2-class head"):
        EquiViTClassifier.from_name(TINY, 2, class_names=["a", "b", "c"], depth=1)
    with pytest.raises(ModelLoadError, match="missing.pt"):
        EquiViTClassifier.from_checkpoint(tmp_path / "missing.pt")


def test_classifier_from_a_name_needs_a_head() -> None:
    with pytest.raises(ValueError, match="EquiViTClassifier needs a classifier head.*num_classes="):
        EquiViTClassifier.from_name(TINY, depth=1)
    assert EquiViTClassifier.from_name(TINY, class_names=["a", "b"], depth=1).net.num_classes == 2
    assert EquiViTEncoder.from_name(TINY, depth=1).net.num_classes == 0


def test_infer_batch_rejects_nchw(classifier: EquiViTClassifier) -> None:
    with pytest.raises(ValueError, match="NHWC"):
        EquiViTClassifier.infer_batch(classifier, torch.zeros(2, 3, 224, 224), device="cpu")


def test_bundle_model_in_patch_predictor(shared_data: Path) -> None:
    """The MONAI bundle's committed ``models/model.pt`` (fp16 on disk) plugs in as is."""
    from conftest import REPO_ROOT
    from PIL import Image

    from equivit_plugin.models import load_model

    path = REPO_ROOT / "monai_bundle" / "models" / "model.pt"
    model = EquiViTClassifier.from_checkpoint(path)
    assert model.class_dict == {0: "lung_aca", 1: "lung_n", 2: "lung_scc"}
    assert model.model_name == "equivit_ri_tiny_patch16_224"
    files = sorted((shared_data / "lc25000_lung_train").glob("*/*.jpeg"))[:5]
    tiles = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    out = PatchPredictor(model=model, batch_size=4).run(
        images=tiles, patch_mode=True, ioconfig=make_ioconfig(), return_probabilities=True)
    net, _ = load_model(path)
    batch = torch.from_numpy(np.stack([normalise_tile(t) for t in tiles])).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = torch.softmax(net.eval()(batch), -1).numpy()
    np.testing.assert_allclose(np.asarray(out["probabilities"]), expected, atol=1e-5)


def test_engine_compiled_model_has_no_graph_breaks(monkeypatch: pytest.MonkeyPatch,
                                                   classifier: EquiViTClassifier,
                                                   encoder: EquiViTEncoder,
                                                   uint8_tiles: np.ndarray) -> None:
    """TIAToolbox compiles the model itself on recent GPUs and hides errors
    (``suppress_errors``): compile it the same way here, errors on, whole graph required."""
    import torch._dynamo
    from tiatoolbox.models.engine import engine_abc

    batch = torch.from_numpy(np.stack([normalise_tile(t) for t in uint8_tiles[:2]]))
    batch = batch.permute(0, 3, 1, 2)
    for model in (classifier, encoder):
        explanation = torch._dynamo.explain(model)(batch)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1

    compiled = []

    def compile_model(model: torch.nn.Module, *, mode: str = "default") -> torch.nn.Module:
        compiled.append(torch.compile(model, backend="aot_eager", fullgraph=True))
        return compiled[-1]

    monkeypatch.setattr(engine_abc, "compile_model", compile_model)
    with torch._dynamo.config.patch(suppress_errors=False):
        torch._dynamo.reset()
        out = PatchPredictor(model=classifier, batch_size=4).run(
            images=uint8_tiles[:6], patch_mode=True, ioconfig=make_ioconfig(),
            return_probabilities=True)
        features = DeepFeatureExtractor(model=encoder, batch_size=4).run(
            images=uint8_tiles[:6], patch_mode=True, ioconfig=make_ioconfig())["features"]
    assert len(compiled) == 2  # both engines went through the compiled module
    batch = torch.from_numpy(np.stack([normalise_tile(t) for t in uint8_tiles[:6]]))
    batch = batch.permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = torch.softmax(classifier.net(batch), -1).numpy()
    np.testing.assert_allclose(np.asarray(out["probabilities"]), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(features), _direct_features(encoder.net, batch),
                               atol=1e-5)


def test_autocast_and_channels_last_arguments(uint8_tiles: np.ndarray) -> None:
    """The GPU options run on CPU too: bf16 autocast close to fp32, channels-last equal."""
    batch = np.stack([normalise_tile(t) for t in uint8_tiles[:4]])
    torch.manual_seed(5)
    reference = EquiViTEncoder.from_name(TINY, depth=1)
    state = reference.net.state_dict()
    expected = EquiViTEncoder.infer_batch(reference, batch, device="cpu")[0]
    for kwargs in ({"channels_last": True}, {"autocast": "bf16"},
                   {"autocast": torch.bfloat16, "channels_last": True}):
        model = EquiViTEncoder.from_name(TINY, depth=1, adapter_kwargs=kwargs)
        model.net.load_state_dict(state)
        got = EquiViTEncoder.infer_batch(model, batch, device="cpu")[0]
        assert got.dtype == np.float32
        if "autocast" in kwargs:
            cos = (got * expected).sum(-1) / (np.linalg.norm(got, axis=-1)
                                              * np.linalg.norm(expected, axis=-1))
            assert cos.min() > 0.999
        else:
            np.testing.assert_allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"autocast= must be one of \['fp32', 'bf16', 'fp16'\]"):
        EquiViTEncoder.from_name(TINY, depth=1, adapter_kwargs={"autocast": "int8"})


def test_overlay_and_example_errors_name_the_input(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from equivit_plugin.tiatoolbox.overlay import prediction_map

    with pytest.raises(ValueError, match="3 boxes but 2 predictions"):
        prediction_map(np.zeros((3, 4)), np.zeros(2), shape=(10, 10), scale=1.0)
    example = _load_example()
    with pytest.raises(SystemExit) as exit_:
        example.main(["--slide", str(tmp_path / "missing.svs")])
    assert exit_.value.code == 2
    assert f"--slide {tmp_path / 'missing.svs'} does not exist" in capsys.readouterr().err
