"""The README stays true: CI runs its test command, the CLI accepts what it shows, its Python
example runs, and the extras it installs carry what its commands need."""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from quadapt.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
_ENV = re.compile(r"[A-Z_][A-Z0-9_]*=\S*")


def quadapt_argv(line: str) -> list[str] | None:
    """The arguments of a `quadapt ...` command line (after any `VAR=value` prefixes), else None."""
    words = shlex.split(line, comments=True)
    while words and _ENV.fullmatch(words[0]):
        words = words[1:]
    return words[1:] if words and words[0] == "quadapt" else None


def test_ci_runs_the_readme_test_command():
    setup, tests = BLOCKS[0].strip(), BLOCKS[1].strip()
    assert tests.endswith("&& pytest")
    assert tests in (ROOT / ".ci" / "run").read_text()
    assert setup.startswith(tests.split("&& pip install -q -e")[0])  # both start from the same venv and torch


COMMAND_LINES = [line for block in BLOCKS for line in block.splitlines() if quadapt_argv(line) is not None]


def test_the_command_lines_are_found():
    """Guard against a parse test that passes because it read nothing (env-prefixed lines included)."""
    assert any(line.startswith("QUADAPT_KERNELS=") for line in COMMAND_LINES)
    assert sum(line.startswith("quadapt ") for line in COMMAND_LINES) >= 10


@pytest.mark.parametrize("line", COMMAND_LINES)
def test_readme_quadapt_commands_parse(line):
    build_parser().parse_args(quadapt_argv(line))


def test_setup_command_commands_parse():
    parsed = 0
    for part in re.split(r"&&|;|\{|\}|&", BLOCKS[0]):  # commands chained, or run in the background
        words = shlex.split(part)
        if words and words[0] == "quadapt":
            build_parser().parse_args(words[1:])
            parsed += 1
    assert parsed >= 3  # fetch-default, convert, serve, client


def extra_requirements(extra: str, extras: dict[str, list[str]]) -> list[str]:
    """Every requirement `pip install '.[extra]'` brings, following `quadapt[other]` references."""
    found = []
    for requirement in extras[extra]:
        nested = re.fullmatch(r"quadapt\[(.+)\]", requirement)
        if nested:
            found += [r for name in nested[1].split(",") for r in extra_requirements(name.strip(), extras)]
        else:
            found.append(requirement)
    return found


def test_the_kernel_example_installs_triton():
    """`QUADAPT_KERNELS=triton` needs triton, which only some extras carry: the block installs one."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    blocks = [block for block in BLOCKS if "QUADAPT_KERNELS=triton" in block]
    assert blocks
    for block in blocks:
        installed = re.findall(r"pip install[^&\n]*-e '\.\[([^\]]+)\]'", block)
        assert installed, f"this README block runs the Triton kernels without installing an extra:\n{block}"
        requirements = [r for names in installed for name in names.split(",") for r in extra_requirements(name, extras)]
        assert any(re.match(r"triton\b", r) for r in requirements), f"extras {installed} do not carry triton"


def test_the_python_example_uses_the_public_api_and_runs(tmp_path):
    from .test_model import save_hf_model
    from .test_tokenizer import build_chatml_dir

    (example,) = PYTHON_BLOCKS
    imported = {
        alias.name if isinstance(node, ast.Import) else node.module
        for node in ast.walk(ast.parse(example))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported == {"quadapt"}, f"the example should need only `import quadapt`, it imports {imported}"
    _, path = save_hf_model(tmp_path, "llama", vocab_size=512)
    model = build_chatml_dir(path)
    assert example.count('"smollm2"') == 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example.replace('"smollm2"', repr(str(model))), "README.md", "exec"), {})
    assert out.getvalue().strip()
