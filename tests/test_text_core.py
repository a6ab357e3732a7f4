"""The text core imports without torch: the edge runtime shares it where torch is not installed.

The tokenizer, the prompt rules, the chat template and encoding, the text stream, the sampling
parameters and the generation loop are imported in a fresh interpreter in which `import torch`
fails, and a prompt is encoded and a stream decoded there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .test_tokenizer import build_chatml_dir

TEXT_CORE = [
    "quadapt.runtime.text.tokenizer",
    "quadapt.runtime.text.prompt",
    "quadapt.runtime.text.chat_template",
    "quadapt.runtime.text.chat_encoding",
    "quadapt.runtime.text.text_stream",
    "quadapt.runtime.text.sampling_params",
    "quadapt.runtime.text.generation",
    "quadapt.runtime.checkpoints",
    "quadapt.runtime.checkpoints.reader",
    "quadapt.runtime.checkpoints.gguf_tokenizer",
]


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    # None in sys.modules makes `import torch` raise ImportError, as if torch were not installed.
    prelude = "import sys; sys.modules['torch'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd="/")


def test_the_text_core_imports_without_torch():
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in TEXT_CORE)
    done = run_without_torch(code)
    assert done.returncode == 0, done.stderr


def test_a_prompt_encodes_and_a_stream_decodes_without_torch(tmp_path: Path):
    path = build_chatml_dir(tmp_path / "tok")
    code = f"""
from quadapt.runtime.text.tokenizer import Tokenizer
from quadapt.runtime.text.text_stream import TextStream
tokenizer = Tokenizer.from_dir({str(path)!r})
ids = tokenizer.encode_prompt([{{"role": "user", "content": "Hello world"}}])
stream = TextStream(tokenizer, ["world"])
text = ""
for token in tokenizer.encode("Hello world, this"):
    piece, stop = stream.feed(token)
    text += piece
    if stop is not None:
        break
assert text == "Hello ", text
assert stream.stop == "world"
print(len(ids))
"""
    done = run_without_torch(code)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 0
