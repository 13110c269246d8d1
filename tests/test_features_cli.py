"""``equivit extract-features`` as separate processes: the installed console script (and that
it answers ``--help`` without importing torch), a run killed with SIGKILL and resumed, and two
``torchrun`` ranks sharing the slides (CPU, gloo)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import small_checkpoint
from PIL import Image

pytest.importorskip("tiatoolbox")

from tiatoolbox import data as tia_data  # noqa: E402

from equivit_plugin.features import read_features  # noqa: E402
from equivit_plugin.features.h5 import is_complete  # noqa: E402

RI_TINY = "equivit_ri_tiny_patch16_224"
CONSOLE_SCRIPT = Path(sys.executable).with_name("equivit")


def _env() -> dict[str, str]:
    # One thread per process: the two torchrun ranks share two cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", RI_TINY, 4, depth=1)


def _slides(folder: Path, n: int, size: int) -> list[Path]:
    """``n`` copies of TIAToolbox's packaged H&E image cropped to ``size`` px, as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    image = np.asarray(tia_data.stain_norm_target())[:size, :size]
    first = folder / "slide_0.png"
    Image.fromarray(image).save(first)
    paths = [first]
    for i in range(1, n):
        paths.append(shutil.copy(first, folder / f"slide_{i}.png"))
    return [Path(p) for p in paths]


def test_help_via_console_script() -> None:
    assert CONSOLE_SCRIPT.is_file(), f"console script not installed at {CONSOLE_SCRIPT}"
    result = subprocess.run([str(CONSOLE_SCRIPT), "extract-features", "--help"],
                            capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stderr
    for option in ("--demo", "--out", "--model", "--mpp", "--slide-mpp", "--tissue-mask",
                   "--workers", "--precision", "--also-pt", "--overwrite", "--d4-average"):
        assert option in result.stdout


def test_cli_import_and_help_do_not_import_torch() -> None:
    """``equivit --help`` must be instant: no torch, timm or TIAToolbox behind it."""
    heavy = ("torch", "timm", "tiatoolbox", "monai")
    check = (f"import sys, equivit_plugin.cli as cli; code = cli.main({{argv!r}}); "
             f"loaded = [m for m in {heavy!r} if m in sys.modules]; "
             f"assert not loaded, loaded; sys.exit(code)")
    for argv, expected in ((["extract-features", "--help"], 0), (["--help"], 0),
                           (["extract-features", "--out", "x"], 2),
                           (["extract-features", "s.svs", "--out", "x", "--precision", "fp8"],
                            2)):
        result = subprocess.run([sys.executable, "-c", check.format(argv=argv)],
                                capture_output=True, text=True, timeout=60, env=_env())
        assert result.returncode == expected, (argv, result.stdout, result.stderr)
        assert "AssertionError" not in result.stderr, result.stderr


def test_sigkill_then_resume(tmp_path: Path, tiny_ckpt: Path) -> None:
    slides = _slides(tmp_path / "slides", 4, 1000)
    out = tmp_path / "out"
    h5_dir = out / "h5_files"
    # --d4-average makes each slide take seconds, so the kill lands mid-run.
    command = [str(CONSOLE_SCRIPT), "extract-features", str(tmp_path / "slides"), "--out",
               str(out), "--model", str(tiny_ckpt), "--slide-mpp", "0.5", "--workers", "1",
               "--tissue-mask", "none", "--d4-average", "--batch-size", "8"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=_env())
    try:
        deadline = time.monotonic() + 240
        while not list(h5_dir.glob("*.h5")):
            assert process.poll() is None, process.communicate()[0].decode()
            assert time.monotonic() < deadline, "no output appeared"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    visible = sorted(h5_dir.glob("*.h5"))
    assert 1 <= len(visible) < 4, visible  # killed mid-run
    for path in visible:  # whatever is visible is complete
        assert is_complete(path)
        features, coords, _ = read_features(path)
        assert features.shape == (16, 192) and coords.shape == (16, 2)
    first = visible[0]
    mtime = first.stat().st_mtime_ns

    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stdout + result.stderr
    for slide in slides:
        assert is_complete(h5_dir / f"{slide.stem}.h5")
    assert first.stat().st_mtime_ns == mtime  # skipped, not rewritten
    line = next(line for line in result.stdout.splitlines() if f"{first.stem}.png" in line)
    assert "skipped" in line and "already complete" in line
    assert f"{4 - len(visible)} done, {len(visible)} skipped, 0 failed" in result.stdout
    assert not list(out.rglob("*.partial")) and not list(out.rglob(".*"))


def test_torchrun_two_ranks_share_the_slides(tmp_path: Path, tiny_ckpt: Path) -> None:
    slides = _slides(tmp_path / "slides", 4, 448)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "equivit_plugin.cli", "extract-features",
               str(tmp_path / "slides"), "--out", str(out), "--model", str(tiny_ckpt),
               "--slide-mpp", "0.5", "--workers", "0", "--tissue-mask", "none", "--verbose",
               "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=_env())
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    outputs = sorted(p.name for p in (out / "h5_files").glob("*.h5"))
    assert outputs == [f"{s.stem}.h5" for s in slides]
    for slide in slides:
        features, coords, _ = read_features(out / "h5_files" / f"{slide.stem}.h5")
        assert features.shape == (4, 192) and coords.shape == (4, 2)
    # Rank 0 prints the combined summary once: each slide done exactly once, by the rank
    # that owns it in the sorted list (slides[rank::2]).
    done = re.findall(r"^\s+done\s+\[rank (\d)\] (\S+):", result.stdout, flags=re.MULTILINE)
    assert sorted(Path(s).name for _, s in done) == [s.name for s in slides], result.stdout
    owners = {Path(s).name: int(r) for r, s in done}
    assert owners == {s.name: i % 2 for i, s in enumerate(slides)}
    assert result.stdout.count("feature extraction: 4 slide(s): 4 done") == 1
    assert "on 2 ranks" in result.stdout
    # Each rank logged its own slides (--verbose).
    for name, rank in owners.items():
        assert re.search(rf"\[rank {rank}\] done \S*{re.escape(name)}", log), log
