"""Repository hygiene: lint clean, CI runs the README's commands."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT


def test_ruff_is_clean() -> None:
    beside_python = Path(sys.executable).with_name("ruff")
    ruff = str(beside_python) if beside_python.exists() else shutil.which("ruff")
    assert ruff, "ruff is not installed (it is a dev extra)"
    result = subprocess.run([ruff, "check", "."], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_exactly_the_readme_setup_commands() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split("<!-- setup-commands -->", 1)[1].split("```")[1]
    commands = [line for line in block.splitlines()[1:] if line.strip()]
    assert commands == ['python -m pip install -e ".[dev]"', "python -m pytest -q"]
    assert "setup-commands" in (REPO_ROOT / ".ci" / "run").read_text()
