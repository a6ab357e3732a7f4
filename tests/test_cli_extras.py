"""A command run without the optional extra it needs says which one to install, in one line.

Each case runs `quadapt` in a fresh interpreter with the extra's module blocked (`sys.modules[name]
= None`, which makes its import fail as a missing package would), so nothing imported by earlier
tests can hide the import.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .test_adapters import make_base


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("extras-base"))


def run_without(blocked: str, argv: list[str]) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        f"sys.modules[{blocked!r}] = None\n"
        "from quadapt import cli\n"
        f"sys.exit(cli.main({argv!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


CASES = [
    # (blocked module, extra, argv with {base} and {tmp})
    ("onnx", "onnx", ["export-onnx", "--model", "{base}", "--out", "{tmp}/export"]),
    ("onnxruntime", "onnx", ["run-onnx", "{tmp}/export", "--prompt", "hi"]),
    ("grpc", "serve", ["serve", "--model", "{base}", "--port", "0"]),
    ("grpc", "serve", ["client", "info"]),
    ("matplotlib", "train", ["train", "--model", "{base}", "--data", "{tmp}/data.jsonl", "--out", "{tmp}/adapter"]),
]


@pytest.mark.parametrize("blocked,extra,argv", CASES, ids=[f"{c[2][0]}-without-{c[0]}" for c in CASES])
def test_a_missing_extra_is_one_error_line_naming_it(base, tmp_path, blocked, extra, argv):
    (tmp_path / "data.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    argv = [a.format(base=base, tmp=tmp_path) for a in argv]
    done = run_without(blocked, argv)
    errors = [line for line in done.stderr.splitlines() if line.startswith("quadapt: error:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(errors) == 1 and f"pip install 'quadapt[{extra}]'" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_a_module_that_is_no_extra_is_not_explained_away(base, tmp_path):
    # A missing module the CLI does not know as an extra is a bug, and keeps its traceback.
    done = run_without("safetensors", ["generate", "--model", str(base), "--prompt", "hi"])
    assert done.returncode == 1 and "Traceback" in done.stderr and "pip install 'quadapt[" not in done.stderr
