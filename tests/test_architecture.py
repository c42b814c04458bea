"""The package's layers, as pyproject.toml's import-linter contract states them, hold (a new upward import fails)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    found = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[test]' installs import-linter")
    return found


def test_import_layers_hold() -> None:
    result = subprocess.run([_lint_imports()], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The contract is live: a copy of the package where the config imports the trainer fails it."""
    package = tmp_path / "src" / "blip2"
    shutil.copytree(ROOT / "src" / "blip2", package, ignore=shutil.ignore_patterns("__pycache__"))
    config = package / "config.py"
    config.write_text(config.read_text() + "\n\ndef _upward() -> None:\n    import blip2.train.loop  # noqa: F401\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    env = {"PYTHONPATH": str(tmp_path / "src"), "PATH": str(Path(sys.executable).parent)}
    result = subprocess.run([_lint_imports()], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert "blip2.config is not allowed to import blip2.train" in result.stdout


def test_no_module_over_the_size_limit() -> None:
    """Files stay readable: none over 500 lines (the few that are longer say why in their docstring)."""
    allowed = {"src/blip2/model.py"}  # both models side by side; its docstring says why
    long = {
        str(path.relative_to(ROOT)): n
        for path in (ROOT / "src").rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 500 and str(path.relative_to(ROOT)) not in allowed
    }
    assert not long, f"modules over 500 lines: {long}"
