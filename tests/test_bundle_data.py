"""Tests of the bundle data layer: discovery, splits, transforms and bad-data errors."""

from __future__ import annotations

import csv
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader, Dataset
from PIL import Image

from equivit_plugin.bundle.data import (
    EnsureRGBd,
    LoadTiled,
    TileReadError,
    check_readable,
    class_names,
    datalist,
    discover_tiles,
    split_tiles,
    tile_transforms,
)
from equivit_plugin.equivariance import D4_TRANSFORMS

CRC_CLASSES = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# ------------------------------------------------------------------------------------ helpers


def _save(path: Path, size: tuple[int, int] = (32, 32), mode: str = "RGB", seed: int = 0) -> Path:
    """Write a random image of PIL ``size`` (width, height) and ``mode`` to ``path``."""
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    shape = (size[1], size[0]) if channels == 1 else (size[1], size[0], channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def _make_dataset(root: Path, counts: dict[str, int], size: int = 32) -> Path:
    for i, (name, count) in enumerate(counts.items()):
        for j in range(count):
            _save(root / name / f"{name}_{j:03d}.png", (size, size), seed=100 * i + j)
    return root


def _reference(path: Path) -> torch.Tensor:
    """The expected tile tensor computed with PIL + numpy only: ``(3, H, W)`` float32."""
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(((array - MEAN) / STD).transpose(2, 0, 1).copy())


def _plain(image: torch.Tensor) -> torch.Tensor:
    return image.as_tensor() if hasattr(image, "as_tensor") else image


def _chain(error: BaseException) -> list[BaseException]:
    """The exception and its causes (Compose re-raises transform errors as RuntimeError)."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__
    return chain


def _manifest_groups(manifest: Path) -> dict[str, str]:
    with open(manifest, newline="") as handle:
        return {row["file"]: row["group_id"] for row in csv.DictReader(handle)}


def _groups_of(items: list[dict], root: Path, groups: dict[str, str]) -> set[str]:
    return {groups[Path(item["image"]).relative_to(root).as_posix()] for item in items}


# ---------------------------------------------------------------------------------- discovery


def test_discover_crc_tiles(shared_data: Path) -> None:
    root = shared_data / "crc_tiles"
    items = discover_tiles(str(root))
    assert class_names(str(root)) == CRC_CLASSES
    assert len(items) == 41
    assert {item["class_name"] for item in items} == set(CRC_CLASSES)
    for item in items:
        path = Path(item["image"])
        assert path.is_file() and path.parent.name == item["class_name"]
        assert item["label"] == CRC_CLASSES.index(item["class_name"])
    assert Counter(Path(i["image"]).suffix for i in items) == {".png": 32, ".tif": 9}


def test_discover_lc25000(shared_data: Path) -> None:
    root = shared_data / "lc25000_lung_train"
    items = discover_tiles(str(root))
    assert class_names(str(root)) == ["lung_aca", "lung_n", "lung_scc"]
    assert len(items) == 455
    assert Counter(i["label"] for i in items) == {0: 139, 1: 159, 2: 157}
    assert all(isinstance(i["image"], str) and isinstance(i["label"], int) for i in items)


def test_discovery_suffixes_are_case_insensitive_and_skip_other_files(tmp_path: Path) -> None:
    for name in ["a.PNG", "b.JPEG", "c.TIFF", "d.jpg", "e.tif"]:
        _save(tmp_path / "X" / name)
    _save(tmp_path / "Y" / "f.png")
    (tmp_path / "X" / "notes.txt").write_text("not an image")
    (tmp_path / "X" / "._a.png").write_bytes(b"macOS resource fork")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "MANIFEST.csv").write_text("file,label\n")
    items = discover_tiles(str(tmp_path))
    assert class_names(str(tmp_path)) == ["X", "Y"]
    assert [Path(i["image"]).name for i in items] == ["a.PNG", "b.JPEG", "c.TIFF", "d.jpg",
                                                      "e.tif", "f.png"]
    assert [i["label"] for i in items] == [0, 0, 0, 0, 0, 1]


# ------------------------------------------------------------------------------------- splits


def test_group_split_lc25000(shared_data: Path) -> None:
    root = shared_data / "lc25000_lung_train"
    items = discover_tiles(str(root))
    groups = _manifest_groups(root / "MANIFEST.csv")
    train, val = split_tiles(items, "train"), split_tiles(items, "val")
    assert not _groups_of(train, root, groups) & _groups_of(val, root, groups)
    assert sorted(i["image"] for i in train + val) == sorted(i["image"] for i in items)
    assert abs(len(val) / len(items) - 0.2) < 0.02
    assert {i["label"] for i in val} == {i["label"] for i in train} == {0, 1, 2}
    # Deterministic for a seed, different for another seed.
    assert split_tiles(items, "val") == val
    assert split_tiles(list(reversed(items)), "val") == list(reversed(val))
    assert split_tiles(items, "val", seed=1) != val
    assert abs(len(split_tiles(items, "val", val_fraction=0.5)) / len(items) - 0.5) < 0.02


def test_group_split_keeps_multi_tile_groups_together(tmp_path: Path) -> None:
    # LC25000 here has one tile per group, so a split by tile would pass the test above too.
    root = _make_dataset(tmp_path / "data", {"A": 24, "B": 24}, size=8)
    rows = [(f"{c}/{c}_{j:03d}.png", f"{c}:{j // 4}") for c in "AB" for j in range(24)]
    with open(root / "MANIFEST.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("file", "group_id"), *rows])
    items = discover_tiles(str(root))
    groups = dict(rows)
    train, val = split_tiles(items, "train", 0.34), split_tiles(items, "val", 0.34)
    assert not _groups_of(train, root, groups) & _groups_of(val, root, groups)
    assert len(train) + len(val) == 48 and len(val) == 16  # 2 of 6 groups per class
    # The same split without the manifest does mix groups: the test above can fail.
    by_tile = split_tiles(items, "val", 0.34, manifest=None)
    assert any(g in _groups_of(by_tile, root, groups)
               for g in _groups_of(split_tiles(items, "train", 0.34, manifest=None), root, groups))
    # A tile missing from the manifest has no known group: refuse rather than risk leakage.
    _save(root / "A" / "A_999.png")
    with pytest.raises(ValueError, match="A_999.png"):
        split_tiles(discover_tiles(str(root)), "val")


def test_explicit_manifest_without_group_id_is_an_error(shared_data: Path) -> None:
    root = shared_data / "crc_tiles"
    with pytest.raises(ValueError, match="group_id"):
        split_tiles(discover_tiles(str(root)), "val", manifest=str(root / "MANIFEST.csv"))


def test_stratified_split_without_manifest(shared_data: Path, tmp_path: Path) -> None:
    # crc_tiles has a MANIFEST.csv without group_id: auto-detection splits by tile.
    items = discover_tiles(str(shared_data / "crc_tiles"))
    train, val = split_tiles(items, "train"), split_tiles(items, "val")
    assert {i["label"] for i in train} == set(range(9))
    assert not {i["image"] for i in train} & {i["image"] for i in val}
    assert len(train) + len(val) == 41 and 6 <= len(val) <= 10
    # A class with a single tile stays in training; the others are split per class.
    small = discover_tiles(str(_make_dataset(tmp_path / "d", {"A": 1, "B": 10, "C": 5}, size=8)))
    train, val = split_tiles(small, "train"), split_tiles(small, "val")
    assert {i["label"] for i in train} == {0, 1, 2}
    assert Counter(i["class_name"] for i in val) == {"B": 2, "C": 1}
    with pytest.raises(ValueError, match="without training data"):
        split_tiles(small, "train", val_fraction=0.9)
    with pytest.raises(ValueError, match="part"):
        split_tiles(small, "test")


def test_datalist_with_separate_val_dir(tmp_path: Path) -> None:
    train_dir = _make_dataset(tmp_path / "train", {"A": 2, "B": 2, "C": 2}, size=8)
    val_dir = _make_dataset(tmp_path / "val", {"A": 1, "C": 1}, size=8)  # lacks class B
    train = datalist(str(train_dir), "train", val_dir=str(val_dir))
    val = datalist(str(train_dir), "val", val_dir=str(val_dir))
    assert len(train) == 6
    assert [(i["class_name"], i["label"]) for i in val] == [("A", 0), ("C", 2)]
    assert len(datalist(str(train_dir), "val", val_dir="", val_fraction=0.5)) == 3


# --------------------------------------------------------------------------------- transforms


def test_transforms_match_manual_pil_numpy(shared_data: Path) -> None:
    items = discover_tiles(str(shared_data / "crc_tiles"))
    transform = tile_transforms()
    png = next(i for i in items if i["image"].endswith(".png"))
    tif = next(i for i in items if i["image"].endswith(".tif"))
    for item in (png, tif):
        out = transform(item)
        image = out["image"]
        assert image.shape == (3, 224, 224) and image.dtype == torch.float32
        assert out["label"] == item["label"] and out["class_name"] == item["class_name"]
        assert (_plain(image) - _reference(Path(item["image"]))).abs().max() < 1e-5


def test_orientation_matches_pil_on_non_square_image(tmp_path: Path) -> None:
    height, width = 24, 40
    rows, cols = np.mgrid[0:height, 0:width]
    array = np.stack([cols * 6, rows * 10, (rows * 7 + cols * 3) % 256], -1).astype(np.uint8)
    path = tmp_path / "X" / "wide.png"
    path.parent.mkdir()
    Image.fromarray(array).save(path)
    loaded = LoadTiled("image")({"image": str(path)})["image"]
    assert loaded.shape == (height, width, 3)  # MONAI's default PILReader would give (40, 24, 3)
    assert np.array_equal(loaded.numpy(), np.asarray(Image.open(path)).astype(np.float32))
    # Upsampling only (48 > 40 > 24), so no anti-aliasing blur: bilinear keeps ramps monotone.
    with pytest.warns(UserWarning, match="40x24"):
        image = _plain(tile_transforms(img_size=48, fit="resize")({"image": str(path)})["image"])
    # Channel 0 grows along columns (last dim), channel 1 along rows: no transpose happened.
    for channel, along, across in ((0, 1, 0), (1, 0, 1)):
        ramp = image[channel]
        assert (ramp.diff(dim=along) >= 0).all() and ramp.diff(dim=along).sum(along).min() > 3
        assert ramp.diff(dim=across).abs().max() < 1e-5


@pytest.mark.parametrize("mode,kind", [("L", "grayscale"), ("RGBA", "RGBA")])
def test_grayscale_and_rgba_become_rgb_with_warning(tmp_path: Path, mode: str, kind: str) -> None:
    path = _save(tmp_path / "X" / f"tile_{mode}.png", (32, 32), mode)
    with pytest.warns(UserWarning, match=re.escape(str(path)) + f".*{kind}"):
        image = tile_transforms(img_size=32)({"image": str(path)})["image"]
    assert image.shape == (3, 32, 32)
    assert (_plain(image) - _reference(path)).abs().max() < 1e-5


def _manual(array: np.ndarray, size: int) -> torch.Tensor:
    """Independent reference: MONAI ``Resize`` on the tensor, then /255 and ImageNet."""
    from monai.transforms import Resize

    chw = torch.from_numpy(array.astype(np.float32).transpose(2, 0, 1).copy())
    resized = Resize((size, size), mode="bilinear", anti_aliasing=True)(chw)
    resized = resized.as_tensor() if hasattr(resized, "as_tensor") else resized
    return (resized / 255.0 - torch.from_numpy(MEAN).view(3, 1, 1)) / \
        torch.from_numpy(STD).view(3, 1, 1)


def test_non_square_tile_is_centre_cropped_then_resized(tmp_path: Path) -> None:
    from tiatoolbox.data import stain_norm_target

    array = np.ascontiguousarray(stain_norm_target()[100:400, 200:700, :3])  # real H&E, 500x300
    path = tmp_path / "X" / "wide.png"
    path.parent.mkdir()
    Image.fromarray(array).save(path)
    with pytest.warns(UserWarning, match=r"500x300.*centre-cropping it to 300x300"):
        cropped = _plain(tile_transforms(img_size=64)({"image": str(path)})["image"])
    expected = _manual(array[:, 100:400], 64)  # the middle 300 columns
    assert cropped.shape == (3, 64, 64)
    assert (cropped - expected).abs().max() < 1e-4
    # The old behaviour stays available: the whole tile squashed to 64 x 64.
    with pytest.warns(UserWarning, match=r"500x300.*; resizing it"):
        squashed = _plain(tile_transforms(img_size=64, fit="resize")({"image": str(path)})["image"])
    assert (squashed - _manual(array, 64)).abs().max() < 1e-4
    assert (squashed - cropped).abs().max() > 0.5, "crop and resize must differ on this tile"
    # Square tiles are untouched by the crop.
    square = _save(tmp_path / "X" / "square.png", (64, 64))
    assert torch.equal(_plain(tile_transforms(64)({"image": str(square)})["image"]),
                       _plain(tile_transforms(64, fit="resize")({"image": str(square)})["image"]))
    with pytest.raises(ValueError, match="fit must be one of"):
        tile_transforms(64, fit="stretch")


def test_ensure_rgb_rejects_other_channel_counts() -> None:
    with pytest.raises(TileReadError, match="5 channels"):
        EnsureRGBd("image")({"image": torch.zeros(5, 4, 4)})


def test_wrong_size_resized_with_one_warning(tmp_path: Path) -> None:
    first = _save(tmp_path / "X" / "big.png", (100, 80))
    second = _save(tmp_path / "X" / "small.png", (50, 60))
    transform = tile_transforms(img_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [transform({"image": str(p)})["image"] for p in (first, second, first)]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert str(first) in messages[0] and "100x80" in messages[0]
    assert all(o.shape == (3, 64, 64) and o.dtype == torch.float32 for o in outputs)
    # A fresh pipeline (a new run) warns again.
    with pytest.warns(UserWarning, match=re.escape(str(second))):
        tile_transforms(img_size=64)({"image": str(second)})


def test_augment_gives_exact_d4_variants(shared_data: Path) -> None:
    item = discover_tiles(str(shared_data / "crc_tiles"))[5]
    base = _plain(tile_transforms()(item)["image"])
    variants = [fn(base) for _, fn in D4_TRANSFORMS]
    augment = tile_transforms(augment=True)
    augment.set_random_state(seed=0)
    seen = []
    for _ in range(32):
        out = _plain(augment(item)["image"])
        matches = [i for i, v in enumerate(variants) if torch.equal(out, v)]
        assert matches, "augmented tile is not an exact rotation/flip of the plain tile"
        seen.append(matches[0])
    assert len(set(seen)) >= 6  # all 8 are equally likely; 32 draws see most of them
    augment.set_random_state(seed=0)
    replay = [_plain(augment(item)["image"]) for _ in range(4)]
    assert all(torch.equal(r, variants[s]) for r, s in zip(replay, seen))


def test_monai_datasets_and_loader(shared_data: Path) -> None:
    items = discover_tiles(str(shared_data / "lc25000_lung_train"))[::60]
    for dataset in (Dataset(items, tile_transforms()),
                    CacheDataset(items, tile_transforms(augment=True), progress=False)):
        batch = next(iter(DataLoader(dataset, batch_size=4)))
        assert batch["image"].shape == (4, 3, 224, 224) and batch["image"].dtype == torch.float32
        assert batch["label"].tolist() == [i["label"] for i in items[:4]]


# ----------------------------------------------------------------------------------- bad data


def _corrupt_files(tmp_path: Path, shared_data: Path) -> list[Path]:
    png = sorted((shared_data / "crc_tiles").glob("*/*.png"))[0].read_bytes()
    truncated = tmp_path / "X" / "truncated.png"
    half = tmp_path / "X" / "half.tif"
    text = tmp_path / "X" / "text.png"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(png[: len(png) // 2])  # valid header, data cut: fails on decode
    tif = sorted((shared_data / "crc_tiles").glob("*/*.tif"))[0].read_bytes()
    half.write_bytes(tif[: len(tif) // 2])
    text.write_text("this is not an image\n")
    return [truncated, half, text]


def test_unreadable_files_raise_naming_the_file(tmp_path: Path, shared_data: Path) -> None:
    for path in _corrupt_files(tmp_path, shared_data):
        with pytest.raises(TileReadError, match=re.escape(str(path)) + ".*expected"):
            check_readable([{"image": str(path), "label": 0}])
        # Inside a Compose/Dataset MONAI wraps the error; the file is named in the chain.
        with pytest.raises(RuntimeError) as info:
            Dataset([{"image": str(path)}], tile_transforms())[0]
        errors = [e for e in _chain(info.value) if isinstance(e, TileReadError)]
        assert errors and str(path) in str(errors[0]) and "expected" in str(errors[0])


def test_check_readable_passes_good_tiles(shared_data: Path) -> None:
    items = discover_tiles(str(shared_data / "crc_tiles"))[:3]
    assert check_readable(items) == items


def test_empty_class_folder(tmp_path: Path) -> None:
    root = _make_dataset(tmp_path, {"A": 2, "B": 2}, size=8)
    (root / "C").mkdir()
    (root / "C" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=re.escape(str(root / "C")) + ".*no images"):
        discover_tiles(str(root))


def test_single_class_dataset(tmp_path: Path) -> None:
    root = _make_dataset(tmp_path / "one", {"ONLY": 3}, size=8)
    for call in (class_names, discover_tiles):
        with pytest.raises(ValueError, match=re.escape(str(root)) + r".*2 classes.*'ONLY'"):
            call(str(root))


def test_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for call in (class_names, discover_tiles):
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
            call(str(missing))


def test_no_images_at_all(tmp_path: Path) -> None:
    _save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*no class sub-folders.*1"):
        discover_tiles(str(tmp_path))


def test_val_folder_with_unknown_class(tmp_path: Path) -> None:
    train_dir = _make_dataset(tmp_path / "train", {"A": 1, "B": 1}, size=8)
    val_dir = _make_dataset(tmp_path / "val", {"A": 1, "Z": 1}, size=8)
    names = class_names(str(train_dir))
    with pytest.raises(ValueError, match=r"\['Z'\].*\['A', 'B'\]"):
        discover_tiles(str(val_dir), class_names=names)
    with pytest.raises(ValueError, match="Z"):
        datalist(str(train_dir), "val", val_dir=str(val_dir))
