"""Repository hygiene: lint clean; CI runs exactly the README's set-up commands, in a fresh
virtual environment (checked by running .ci/run against a stand-in Python that records what
it is asked to do)."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT


def test_ruff_is_clean() -> None:
    beside_python = Path(sys.executable).with_name("ruff")
    ruff = str(beside_python) if beside_python.exists() else shutil.which("ruff")
    assert ruff, "ruff is not installed (it is a dev extra)"
    result = subprocess.run([ruff, "check", "."], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _readme_setup_commands(readme: str) -> list[str]:
    block = readme.split("<!-- setup-commands -->", 1)[1].split("```")[1]
    return [line for line in block.splitlines()[1:] if line.strip()]


# A stand-in for python3: `-m venv DIR` makes DIR/bin/activate (putting DIR/bin first on PATH)
# and DIR/bin/python, which appends its arguments to $CALLS; anything else fails loudly.
_FAKE_PYTHON = r"""#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  printf 'export PATH="%s/bin:$PATH"\nexport VIRTUAL_ENV="%s"\n' "$3" "$3" > "$3/bin/activate"
  printf '#!/usr/bin/env bash\necho "venv=$VIRTUAL_ENV ci=$CI args=$*" >> "$CALLS"\n' \
    > "$3/bin/python"
  chmod +x "$3/bin/python"
  echo "created $3" >> "$CALLS"
  exit 0
fi
echo "unexpected python3 call: $*" >&2
exit 99
"""


def _run_ci(repo: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    python3 = fake_bin / "python3"
    python3.write_text(_FAKE_PYTHON)
    python3.chmod(python3.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.log"
    calls.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CI")}
    env.update(PATH=f"{fake_bin}:{env['PATH']}", CALLS=str(calls))
    result = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True,
                            text=True, env=env, timeout=60)
    return result, calls.read_text().splitlines() if calls.exists() else []


def test_ci_runs_the_readme_setup_commands_in_a_fresh_venv(tmp_path: Path) -> None:
    commands = _readme_setup_commands((REPO_ROOT / "README.md").read_text())
    assert commands == ['python -m pip install -e ".[dev]"', "python -m pytest -q"]
    result, calls = _run_ci(REPO_ROOT, tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(calls) == 3 and calls[0].startswith("created ")
    venv = calls[0].removeprefix("created ")
    assert not Path(venv).is_relative_to(REPO_ROOT)  # a fresh folder, not a committed venv
    # The shell has removed the quotes by the time python sees its arguments.
    expected = [f"venv={venv} ci=true args={' '.join(shlex.split(c)[1:])}" for c in commands]
    assert calls[1:] == expected
    assert [f"+ {c}" for c in commands] == [line for line in result.stdout.splitlines()
                                           if line.startswith("+ ")]


@pytest.mark.parametrize("block", ["python -m pytest -q\n",
                                   "python -m pip install .\npython -m pytest\nextra\n"])
def test_ci_refuses_a_readme_without_exactly_two_commands(tmp_path: Path, block: str) -> None:
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(REPO_ROOT / ".ci" / "run", repo / ".ci" / "run")
    (repo / "README.md").write_text(f"# x\n<!-- setup-commands -->\n```bash\n{block}```\n")
    result, calls = _run_ci(repo, tmp_path)
    assert result.returncode != 0 and "expected 2 set-up commands" in result.stderr
    assert not any(line.startswith("venv=") for line in calls)


def test_ci_stops_at_the_first_failing_command(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(REPO_ROOT / ".ci" / "run", repo / ".ci" / "run")
    (repo / "README.md").write_text("<!-- setup-commands -->\n```bash\nfalse\n"
                                    "python -m pytest -q\n```\n")
    result, calls = _run_ci(repo, tmp_path)
    assert result.returncode != 0
    assert not any("pytest" in line for line in calls)
