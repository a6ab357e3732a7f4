"""The `quadapt` console script on a tiny model with a real tokenizer: output streams, errors are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from quadapt.cli import main
from quadapt.runtime.loader import load_model
from quadapt.runtime.tokenizer import Tokenizer

from .test_model import save_hf_model
from .test_tokenizer import build_chatml_dir


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama with a ChatML byte-level BPE tokenizer beside its weights."""
    _, path = save_hf_model(tmp_path_factory.mktemp("cli"), "llama", vocab_size=512)
    return build_chatml_dir(path)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_generate_prints_only_the_generated_text(capsys, chat_model):
    status, out, err = run(
        capsys, "generate", "--model", str(chat_model), "--chat", "--prompt", "hello there",
        "--max-new-tokens", "12", "--ignore-eos",
    )
    assert status == 0, err
    tokenizer = Tokenizer.from_dir(chat_model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}])
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    model = load_model(chat_model)
    with torch.no_grad():
        for _ in range(12):  # greedy by hand, full recomputation each step
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = tokenizer.decode(ids[0, -12:].tolist())
    assert out == expected + "\n"


def test_seeded_sampling_reproduces(capsys, chat_model):
    argv = ["generate", "--model", str(chat_model), "--prompt", "the sea", "--temperature", "1.5",
            "--max-new-tokens", "16", "--ignore-eos", "--seed"]
    first = run(capsys, *argv, "3")[1]
    assert run(capsys, *argv, "3")[1] == first
    assert run(capsys, *argv, "4")[1] != first


def test_eval_ppl_last_line(capsys, chat_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    status, out, err = run(capsys, "eval-ppl", "--model", str(chat_model), "--text", str(text), "--window", "64")
    assert status == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("perplexity: ") and float(last.split()[1]) > 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "/no/such/model", "--prompt", "x"], "does not exist"),
        (["generate", "--model", "{model}", "--prompt", "x", "--temperature", "-1"], "temperature must be"),
        (["generate", "--model", "{model}", "--prompt", "x", "--top-p", "0"], "top_p must be in"),
        (["eval-ppl", "--model", "{model}", "--text", "/no/such.txt"], "does not exist"),
    ],
)
def test_user_errors_are_one_line(capsys, chat_model, argv, message):
    status, out, err = run(capsys, *[a.replace("{model}", str(chat_model)) for a in argv])
    assert status == 2
    assert out == ""
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_model_dir_without_tokenizer(capsys, tmp_path):
    _, path = save_hf_model(tmp_path, "llama")
    status, _, err = run(capsys, "generate", "--model", str(path), "--prompt", "x")
    assert status == 2 and "carries no tokenizer" in err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "quadapt.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("generate", "eval-ppl", "fetch-default"):
        assert command in out.stdout


def test_convert_help_documents_the_head_precision(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--lm-head PRECISION" in out and "float (default) or int8" in out and "refused" in out
