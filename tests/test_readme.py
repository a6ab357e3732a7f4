"""The README's set-up commands stay true: CI runs the same test command, and the CLI accepts what the README shows."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from quadapt.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    setup, tests = BLOCKS[0].strip(), BLOCKS[1].strip()
    assert tests.endswith("&& pytest")
    assert tests in (ROOT / ".ci" / "run").read_text()
    assert setup.startswith(tests.split("&& pip install -q -e")[0])  # both start from the same venv and torch


@pytest.mark.parametrize("line", [line for block in BLOCKS for line in block.splitlines() if line.startswith("quadapt ")])
def test_readme_quadapt_commands_parse(line):
    build_parser().parse_args(shlex.split(line, comments=True)[1:])


def test_setup_command_commands_parse():
    for part in BLOCKS[0].split("&&"):
        words = shlex.split(part)
        if words[0] == "quadapt":
            build_parser().parse_args(words[1:])
