"""The wheel holds every subpackage: pyproject lists packages by hand (the repository root is the
package), so a new folder missing from that list would install fine in editable mode and be absent
from a built wheel."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_NOT_PACKAGE = {"tests", "benchmarks", "docs", "examples", "build", "dist"}


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"quadapt"}
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts and (rel.parts[0] in _NOT_PACKAGE or rel.parts[0].startswith(".") or rel.parts[0].endswith(".egg-info")):
            continue
        found.add(".".join(["quadapt", *rel.parts]))
    assert found - listed == set(), f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    assert listed - found == set(), f"listed in pyproject.toml but not a package folder: {sorted(listed - found)}"
