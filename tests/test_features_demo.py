"""``equivit extract-features --demo``: the whole pipeline on a slide made from TIAToolbox's
packaged H&E image, with the bundle's demo checkpoint, and the thumbnail overlay."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tiatoolbox")

from tiatoolbox.wsicore.wsireader import WSIReader  # noqa: E402

from equivit_plugin.features import RandomWeightsWarning, read_features, run_demo  # noqa: E402
from equivit_plugin.features import demo as demo_module  # noqa: E402
from equivit_plugin.utils.atomic import default_file_mode  # noqa: E402
from equivit_plugin.utils.demo_data import DEMO_MPP, demo_checkpoint  # noqa: E402

CONSOLE_SCRIPT = Path(sys.executable).with_name("equivit")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    """``equivit extract-features --demo`` in a fresh process, slide cache in a temp folder."""
    root = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "EQUIVIT_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "2"}
    result = subprocess.run([str(CONSOLE_SCRIPT), "extract-features", "--demo", "--out",
                             str(root / "out"), "--workers", "0"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    printed = dict(re.findall(r"^(demo slide|features|overlay): (.+)$", result.stdout,
                              flags=re.MULTILINE))
    return root, result.stdout, {key: Path(value) for key, value in printed.items()}


def test_demo_writes_features_and_overlay(demo_run) -> None:
    root, stdout, printed = demo_run
    assert set(printed) == {"demo slide", "features", "overlay"}, stdout
    assert all(path.is_file() for path in printed.values()), printed
    assert printed["demo slide"].parent == root / "cache"
    assert printed["features"].parent == root / "out" / "h5_files"
    features, coords, attrs = read_features(printed["features"])
    assert features.shape[0] == coords.shape[0] > 20 and features.shape[1] == 192
    checkpoint = demo_checkpoint()
    assert checkpoint is not None, "the bundle's demo checkpoint is part of the repository"
    assert attrs["encoder"] == "equivit_ri_tiny_patch16_224" and not attrs["random_weights"]
    assert attrs["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert attrs["level0_mpp"] == pytest.approx(DEMO_MPP) and attrs["patch_size"] == 224
    assert (attrs["level0_width"], attrs["level0_height"]) == (2000, 2000)
    assert printed["overlay"].read_bytes()[:8] == PNG_MAGIC
    assert "demo checkpoint" in stdout
    # Every file the run wrote has the permissions a plain open() gives (0666 & ~umask).
    written = [p for p in root.rglob("*") if p.is_file()]
    assert set(printed.values()) <= set(written)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == \
        {p.name: oct(default_file_mode()) for p in written}


def test_demo_slide_is_a_pyramid_at_half_a_micron(demo_run) -> None:
    _, _, printed = demo_run
    reader = WSIReader.open(printed["demo slide"])
    assert tuple(float(v) for v in reader.info.mpp) == (DEMO_MPP, DEMO_MPP)
    assert reader.info.level_count >= 2
    assert tuple(reader.info.slide_dimensions) == (2000, 2000)
    tile = reader.read_rect((0, 0), (224, 224), resolution=DEMO_MPP, units="mpp")
    assert tile.shape == (224, 224, 3) and tile.std() > 10  # tissue, not blank


def test_second_run_reuses_slide_and_skips(demo_run, capsys: pytest.CaptureFixture) -> None:
    root, _, printed = demo_run
    slide, h5 = printed["demo slide"], printed["features"]
    stamps = slide.stat().st_mtime_ns, h5.stat().st_mtime_ns
    result = run_demo(root / "out", cache=root / "cache", workers=0)
    assert result.slide == slide and result.h5 == h5
    assert (slide.stat().st_mtime_ns, h5.stat().st_mtime_ns) == stamps
    assert [Path(s) for s, _ in result.summary.skipped] == [slide]
    assert "already complete" in capsys.readouterr().out
    assert result.overlay.is_file()


def test_without_bundle_checkpoint_falls_back_to_random_weights(
        demo_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _, _ = demo_run
    monkeypatch.setattr(demo_module, "demo_checkpoint", lambda: None)  # as in a wheel install
    with pytest.warns(RandomWeightsWarning, match="RANDOM"):
        result = run_demo(tmp_path, cache=root / "cache", workers=0, print_summary=False,
                          model_kwargs={"depth": 1})
    assert "RANDOM" in result.note and result.model == demo_module.DEFAULT_MODEL
    _, _, attrs = read_features(result.h5)
    assert attrs["random_weights"] and attrs["encoder"] == demo_module.DEFAULT_MODEL
    assert demo_checkpoint(tmp_path) is None


def test_first_principal_component_orders_tiles() -> None:
    from equivit_plugin.features.overlay import first_principal_component

    rng = np.random.default_rng(0)
    direction = rng.normal(size=8)
    scores = np.linspace(-3, 3, 20)
    features = scores[:, None] * direction + 0.01 * rng.normal(size=(20, 8))
    pc1 = first_principal_component(features)
    assert abs(np.corrcoef(pc1, scores)[0, 1]) > 0.999
    assert first_principal_component(features[:1]).tolist() == [0.0]
