"""The documentation's Python examples run as written (data paths pointed at EQUIVIT_DATA)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO_ROOT


def python_blocks(page: Path) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))


@pytest.mark.parametrize("page", ["tiatoolbox.md", "features.md", "rotation_report.md",
                                  "distillation.md", "export.md"])
def test_python_examples_run(page: str, shared_data: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    code = python_blocks(REPO_ROOT / "docs" / page)
    assert code, f"no python examples in docs/{page}"
    code = code.replace('"../shared/data', f'"{shared_data}') \
        .replace('"monai_bundle/', f'"{REPO_ROOT}/monai_bundle/')
    monkeypatch.chdir(tmp_path)  # examples write their outputs to the working directory
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(code, f"docs/{page}", "exec"), namespace)
    printed = capsys.readouterr().out
    if page == "tiatoolbox.md":
        assert "(4, 3) {0: 'lung_aca'" in printed and "(4, 192)" in printed
        assert namespace["features"].shape == (82, 192) and namespace["boxes"].shape == (82, 4)
    if page == "features.md":
        assert namespace["summary"].ok and len(namespace["summary"].done) == 2
        assert namespace["features"].shape == (78, 192) and namespace["coords"].shape == (78, 2)
    if page == "export.md":
        lines = printed.splitlines()
        assert lines[0].startswith("logits 3 ") and lines[0].endswith(" True")
        assert lines[1] == "('lung_aca', 'lung_n', 'lung_scc') 224"
        assert lines[2].endswith(" True") and (tmp_path / "model.onnx").is_file()
    if page == "rotation_report.md":
        report = namespace["report"]
        assert [m["label"] for m in report["models"]] == ["vit_tiny_patch16_224",
                                                          "equivit_ri_tiny_patch16_224"]
        assert "equivit_ri_tiny_patch16_224: mutual-kNN at 90/180/270 1.000" in printed
        assert (tmp_path / "report" / "rotation_report.json").is_file()
        assert (tmp_path / "report" / "rotation_report.png").is_file()
        assert len(namespace["figure"].axes) == 3
    if page == "distillation.md":
        assert "equivit_disc_tiny_patch16_224 192 teacher" in printed
        result = namespace["result"]
        assert result.n_train + result.n_val == 16 and 0 < result.fidelity <= 1
        assert (tmp_path / "student.pt").is_file()
