"""The house rules of docs/architecture.md, checked on the source: layers import only
downwards, nothing reaches into another module's private names, and importing the package is
instant (no torch, timm, MONAI or TIAToolbox until they are needed)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PACKAGE = "equivit_plugin"

LAYERS: dict[str, int] = {
    "utils": 0, "registration": 0, "version": 0,
    "layers": 1, "equivariance": 1,
    "models": 2,
    "networks": 3, "tiatoolbox": 3, "export": 3, "lazyslide": 3, "eva": 3, "trident": 3,
    "bundle": 4, "features": 4,
    "robustness": 5, "distill": 5,
    "cli": 6,
}
"""Rank of each top-level module of the package (docs/architecture.md): a module may import
from its own subpackage and from lower ranks only."""


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """Rule breaks in one module's source: upward or sideways imports between top-level
    modules, importing the package root, importing another module's ``_private`` name."""
    own = module.split(".")[1]
    problems = []
    for node in ast.walk(ast.parse(source)):
        targets: list[tuple[str, list[str]]] = []
        if isinstance(node, ast.Import):
            targets = [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = [(_resolve(module, node, is_package), [a.name for a in node.names])]
        for target, names in targets:
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            parts = target.split(".")
            top = parts[1] if len(parts) > 1 else None
            if top is None:
                submodules = [n for n in names if n in LAYERS]
                if not submodules or len(submodules) != len(names):
                    problems.append(f"{module} imports the package root ({target}: {names})")
                    continue
                tops = submodules
            else:
                tops = [top]
            for name in tops:
                if name != own and LAYERS[name] >= LAYERS[own]:
                    problems.append(f"{module} (layer {own}, rank {LAYERS[own]}) imports "
                                    f"{target} (layer {name}, rank {LAYERS[name]})")
            if target != module:
                problems += [f"{module} imports private {target}.{n}" for n in names
                             if n.startswith("_") and not n.startswith("__")]
    return problems


def _package_modules() -> list[tuple[str, Path]]:
    root = REPO_ROOT / PACKAGE
    modules = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(REPO_ROOT).with_suffix("")
        parts = list(relative.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1:  # the root __init__ is the package's front door: not ranked
            modules.append((".".join(parts), path))
    return modules


def test_every_top_level_module_has_a_layer() -> None:
    tops = {name.split(".")[1] for name, _ in _package_modules()}
    assert tops == set(LAYERS), f"rank in LAYERS and docs/architecture.md: {tops ^ set(LAYERS)}"


def test_no_module_imports_upwards_sideways_or_privately() -> None:
    problems = []
    for module, path in _package_modules():
        problems += import_violations(module, path.read_text(), path.name == "__init__.py")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("module", "source", "expected"), [
    ("equivit_plugin.models.factory", "from ..features import extract_features", "imports"),
    ("equivit_plugin.models.factory", "import equivit_plugin.networks", "rank 3"),
    ("equivit_plugin.tiatoolbox.adapter", "from ..networks.equivit import create_network",
     "layer networks"),
    ("equivit_plugin.bundle.evaluation", "from .data import _class_folders", "private"),
    ("equivit_plugin.networks.equivit", "import equivit_plugin", "package root"),
    ("equivit_plugin.bundle.training", "from equivit_plugin import __version__", "package root"),
])
def test_the_checker_catches_each_kind_of_violation(module: str, source: str,
                                                    expected: str) -> None:
    problems = import_violations(module, source)
    assert len(problems) == 1 and expected in problems[0], problems


def test_the_checker_allows_downward_and_own_package_imports() -> None:
    source = ("from ..models import load_model\nfrom ..utils.atomic import atomic_path\n"
              "from .data import discover_tiles\nimport torch\nfrom . import data\n")
    assert import_violations("equivit_plugin.bundle.inference", source) == []


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


HEAVY = "('torch', 'timm', 'monai', 'tiatoolbox')"


def test_import_is_instant_and_registers_models_when_timm_arrives() -> None:
    out = _run(
        "import sys, equivit_plugin\n"
        f"print(sorted(m for m in {HEAVY} if m in sys.modules))\n"
        "import timm\n"
        "print(timm.is_model('equivit_ri_tiny_patch16_224'), 'monai' in sys.modules, "
        "'tiatoolbox' in sys.modules)\n")
    assert out.splitlines() == ["[]", "True False False"]


def test_registration_in_either_order_and_through_the_layers() -> None:
    out = _run("import timm, equivit_plugin\nprint(timm.is_model('convvit_tiny_patch16_224'))\n"
               "from equivit_plugin import GMRConv2d\nprint(GMRConv2d.__name__)")
    assert out.splitlines() == ["True", "GMRConv2d"]
    # The package's own layers import timm first: registration must not cycle through them.
    out = _run("import equivit_plugin.layers, timm\n"
               "print(sorted(timm.list_models('equivit_ri_*')))")
    assert out == str(["equivit_ri_base_patch16_224", "equivit_ri_small_patch16_224",
                       "equivit_ri_tiny_patch16_224"])


def test_monai_only_through_its_door() -> None:
    out = _run("import sys, equivit_plugin.models, equivit_plugin.layers\n"
               "print('monai' in sys.modules, 'tiatoolbox' in sys.modules)\n"
               "import equivit_plugin.networks\n"
               "from monai.networks.layers.factories import Conv\n"
               "print(Conv['gmr', 2].__name__, Conv['gmr', 3].__name__)")
    assert out.splitlines() == ["False False", "GMRConv2d GMRConv3d"]


def test_cli_help_imports_nothing_heavy() -> None:
    out = _run("import sys, contextlib, io\nfrom equivit_plugin.cli import main\n"
               "with contextlib.redirect_stdout(io.StringIO()):\n"
               "    code = main(['extract-features', '--help'])\n"
               f"print(code, sorted(m for m in {HEAVY} if m in sys.modules))")
    assert out == "0 []"
