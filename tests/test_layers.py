"""The package's layers, read from its source: imports run one way and never in a loop.

    kernels  <-  runtime  <-  (converters, train)  <-  cli and the public API (`quadapt/__init__.py`)

Inside `runtime`, the rooms (its sub-packages) are layered too, on `runtime/errors.py` and
`runtime/files.py`, which every room may use:

    model  <-  checkpoints  <-  text  <-  edge
    (model, checkpoints, text)  <-  engine  <-  api  <-  serving

`text` and `edge` run without torch (the edge's fresh-venv test holds that); nothing below
`engine` knows the engine, and only `serving` speaks to the network.

Every import statement counts, at module level or inside a function: a lazy import is still a
dependency. `protos` holds generated stubs and imports nothing of quadapt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "quadapt"
# Folders of the repository that are not part of the installed package.
_NOT_PACKAGE = {"tests", "benchmarks", "docs", "examples", "build", "dist"}

# Which top-level parts each part may import (itself always included).
ALLOWED = {
    "kernels": set(),
    "runtime": {"kernels"},
    "converters": {"runtime", "kernels"},
    "train": {"runtime", "kernels"},
    "protos": set(),
    "cli": {"runtime", "converters", "train", "kernels", "protos", "api"},
    "api": {"runtime", "converters", "train", "kernels"},
}
# Modules allowed more than their part: the generated gRPC stubs (`protos`) are imported by the
# runtime's network edges alone (the server, its RPCs, the client), which convert wire types to the
# runtime's own at that boundary (STYLE: wire types never leak past the server). Every other
# runtime module keeps ALLOWED["runtime"].
EXTRA_ALLOWED = {
    "quadapt.runtime.serving.server": {"protos"},
    "quadapt.runtime.serving.rpc": {"protos"},
    "quadapt.runtime.serving.client": {"protos"},
    # `quadapt train`'s command glues two siblings, as the CLI does: the converters quantize a float
    # base in memory, then train fits an adapter over it. The rest of train keeps ALLOWED["train"].
    "quadapt.train.command": {"converters"},
}

# Which runtime rooms each room may import (itself and the shared root modules always included).
ROOMS = {
    "model": set(),
    "checkpoints": {"model"},
    "text": {"checkpoints", "model"},
    "edge": {"text"},
    "engine": {"model", "checkpoints", "text"},
    "api": {"engine", "model", "checkpoints", "text"},
    "serving": {"api", "engine", "model", "checkpoints", "text"},
}
# Modules of `runtime` itself, outside the rooms, that every room may use.
SHARED = {"quadapt.runtime", "quadapt.runtime.errors", "quadapt.runtime.files"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in _NOT_PACKAGE or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([PACKAGE, *parts])] = path
    return modules


def part_of(module: str) -> str:
    """The top-level part a module belongs to: `kernels`, `runtime`, ..., `cli`, or `api` (the root)."""
    parts = module.split(".")
    return "api" if len(parts) == 1 else parts[1]


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `module` imports, by any import statement in its file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from X import y` imports the module X.y when there is one, else X itself.
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        found.update(name for name in names if name == PACKAGE or name.startswith(PACKAGE + "."))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {module: imports_of(module, path, known) for module, path in files.items()}


def test_the_walk_sees_the_package(graph):
    """Guard against a check that passes because it read nothing."""
    assert {"quadapt.kernels", "quadapt.runtime.checkpoints.loader", "quadapt.converters.convert", "quadapt.cli"} <= set(graph)
    assert "quadapt.runtime.checkpoints" in graph["quadapt.runtime.checkpoints.loader"]
    assert "quadapt.kernels.reference" in graph["quadapt.kernels"]


def test_imports_run_one_way(graph):
    wrong = []
    for module, targets in sorted(graph.items()):
        part = part_of(module)
        for target in sorted(targets):
            other = part_of(target)
            if other == "cli" and part != "cli":
                wrong.append(f"{module} imports {target}: nothing imports the CLI")
            elif other != part and other not in ALLOWED[part] | EXTRA_ALLOWED.get(module, set()):
                wrong.append(f"{module} ({part}) imports {target} ({other}), a layer above or beside it")
    assert not wrong, "\n".join(wrong)


def room_of(module: str) -> str | None:
    """The runtime room a module lives in (`model`, `engine`, ...), or None outside the rooms."""
    parts = module.split(".")
    return parts[2] if len(parts) >= 3 and parts[1] == "runtime" and module not in SHARED else None


def test_every_runtime_module_is_in_a_room(graph):
    loose = [m for m in graph if part_of(m) == "runtime" and m not in SHARED and room_of(m) not in ROOMS]
    assert not loose, f"runtime modules outside the rooms of ROOMS: {loose}"


def test_runtime_rooms_import_one_way(graph):
    wrong = []
    for module, targets in sorted(graph.items()):
        room = room_of(module)
        if room is None:
            continue
        for target in sorted(targets):
            other = room_of(target)
            if other is not None and other != room and other not in ROOMS[room]:
                wrong.append(f"{module} ({room}) imports {target} ({other}), a room above or beside it")
    assert not wrong, "\n".join(wrong)


def test_the_room_check_catches_a_violation():
    """Negative control: the model importing the engine is a room above it."""
    assert room_of("quadapt.runtime.engine.engine") == "engine" and room_of("quadapt.runtime.errors") is None
    assert room_of("quadapt.runtime.engine.engine") not in ROOMS[room_of("quadapt.runtime.model.model")]


def test_no_import_cycles(graph):
    cycles = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)


def test_the_checker_catches_a_violation(tmp_path):
    """Negative control: an upward import and a loop are found when they exist."""
    (tmp_path / "kernels").mkdir()
    bad = tmp_path / "kernels" / "bad.py"
    bad.write_text("from ..runtime.errors import QuadaptError\nfrom . import bad\n")
    known = {"quadapt.runtime.errors", "quadapt.kernels.bad"}
    found = imports_of("quadapt.kernels.bad", bad, known)
    assert found == {"quadapt.runtime.errors", "quadapt.kernels.bad"}
    assert part_of("quadapt.runtime.errors") not in ALLOWED[part_of("quadapt.kernels.bad")]
