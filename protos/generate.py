"""Regenerate the Python stubs of every `.proto` under this folder: `python -m quadapt.protos.generate`.

Runs grpcio-tools' protoc (the `dev` extra) with this folder as the include root, so the proto
`quadapt/v1/generation.proto` (package `quadapt.v1`) gives `quadapt/v1/generation_pb2.py`,
`.pyi` and `_pb2_grpc.py` beside it. protoc writes the grpc module's import of its messages as
`from quadapt.v1 import ...`, an absolute name that is not where the stubs live inside the
installed package (`quadapt.protos.quadapt.v1`); it is rewritten to a relative import here.
The stubs are checked in; `tests/test_server_protocol.py` runs this into a temporary folder and
compares. Nothing here runs on import.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
# protoc's `from quadapt.v1 import generation_pb2 as quadapt_dot_v1_dot_generation__pb2`.
_ABSOLUTE_IMPORT = re.compile(r"^from ([\w.]+) import (\w+_pb2) as ", re.MULTILINE)


def proto_files(root: Path = HERE) -> list[Path]:
    """The `.proto` files under `root`, relative to it, sorted."""
    return sorted(p.relative_to(root) for p in root.rglob("*.proto"))


def generate(out: Path = HERE, root: Path = HERE) -> list[Path]:
    """Generate the stubs of every proto under `root` into `out` (same relative folders).

    Args:
        out: where to write; the checked-in place by default.
        root: the include root holding `quadapt/v1/*.proto`.

    Returns:
        The files written, sorted.

    Raises:
        RuntimeError: grpcio-tools is missing, or protoc failed (its message is on stderr).
    """
    try:
        from grpc_tools import protoc
    except ImportError:
        raise RuntimeError("regenerating the stubs needs grpcio-tools: pip install -e '.[dev]'") from None
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")  # google/protobuf/*.proto
    protos = [str(p) for p in proto_files(root)]
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc", f"-I{root}", f"-I{well_known}",
        f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(protos)}; see its message above")
    written = []
    for proto in proto_files(root):
        for suffix in GENERATED_SUFFIXES:
            path = out / proto.parent / (proto.stem + suffix)
            if suffix == "_pb2_grpc.py":
                package = ".".join(proto.parent.parts)
                text = path.read_text(encoding="utf-8")
                text = _ABSOLUTE_IMPORT.sub(
                    lambda m: f"from . import {m[2]} as " if m[1] == package else m[0], text
                )
                path.write_text(text, encoding="utf-8")
            written.append(path)
    return sorted(written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quadapt.protos.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="where to write (default: beside the protos)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
