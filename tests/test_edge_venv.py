"""An export runs in a fresh virtual environment that holds only onnxruntime, numpy, tokenizers and
jinja2 (with their own import-time dependencies) beside quadapt's source: no torch there at all."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from .test_edge import tiny  # noqa: F401  (the module-scoped export fixture)

# Top-level names to make importable, each with its .dist-info: the four packages and what they import.
ALLOWED = ("onnxruntime", "numpy", "numpy.libs", "tokenizers", "jinja2", "markupsafe")
REPO = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, sys
from quadapt.cli import main
status = main(sys.argv[1:])
try:
    import torch  # noqa: F401
    importable = True
except ImportError:
    importable = False
print(json.dumps({"status": status, "torch_loaded": "torch" in sys.modules, "torch_importable": importable}), file=sys.stderr)
"""


def fresh_venv(root: Path) -> Path:
    """A venv without pip whose site-packages links only `ALLOWED` and quadapt; returns its python."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    python = root / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    ours = Path(__import__("numpy").__file__).resolve().parent.parent
    for entry in ours.iterdir():
        top = entry.name.split("-")[0].lower() if entry.name.endswith(".dist-info") else entry.name.lower()
        if top in ALLOWED or top == "quadapt" and entry.name.endswith(".dist-info"):
            (site / entry.name).symlink_to(entry)
    (root / "src").mkdir()
    (root / "src" / "quadapt").symlink_to(REPO)
    (site / "quadapt_source.pth").write_text(str(root / "src") + "\n")
    return python


def test_export_runs_without_torch(tiny, tmp_path):  # noqa: F811
    _, export, _ = tiny
    python = fresh_venv(tmp_path / "venv")
    argv = ["run-onnx", str(export), "--prompt", "the sea", "--chat", "--max-new-tokens", "6", "--ignore-eos", "--adapter", "b"]
    done = subprocess.run([python, "-c", SCRIPT, *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report == {"status": 0, "torch_loaded": False, "torch_importable": False}, done.stderr
    # The same text as the edge runtime here (where torch is installed but unused).
    from quadapt.runtime.edge.generate import generate_text
    from quadapt.runtime.edge.model import EdgeModel
    from quadapt.runtime.text.sampling_params import SamplingParams
    from quadapt.runtime.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(export)
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "the sea"}]), add_special_tokens=False)
    expected = "".join(generate_text(EdgeModel(export), tokenizer, ids, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True), "b"))
    assert done.stdout == expected + "\n"


if sys.platform == "win32":  # symlinks need privileges there
    pytestmark = pytest.mark.skip(reason="the fresh venv is built from symlinks")
