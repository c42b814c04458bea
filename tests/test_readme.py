"""The README's test command is what CI runs, and the commands it shows exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [line for line in blocks[0].splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands
    assert commands[1] in ci.splitlines()


def test_readme_recipes_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    for recipe in re.findall(r"configs/[\w.]+\.yaml", readme):
        assert (ROOT / recipe).exists(), recipe
