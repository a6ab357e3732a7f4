"""The `quadapt` console script on a tiny model with a real tokenizer: output streams, stdout carries results
only, diagnostics are `quadapt: ...` lines on stderr, and errors are one `quadapt: error: ...` line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from quadapt import __version__
from quadapt.cli import main
from quadapt.runtime.errors import InvalidParameterError
from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.text.tokenizer import Tokenizer

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
        (["generate", "--model", "{model}", "--prompt", "x", "--temperature", "-1"], "temperature (--temperature) must be"),
        (["generate", "--model", "{model}", "--prompt", "x", "--top-p", "0"], "top_p (--top-p) must be in"),
        (["eval-ppl", "--model", "{model}", "--text", "/no/such.txt"], "does not exist"),
        (["generate", "--model", "{model}", "--prompt", "x", "--max-new-tokens", "0"],
         "max_new_tokens (--max-new-tokens)"),
        (["generate", "--model", "{model}", "--prompt", "x", "--system", "be brief"], "add --chat"),
        (["generate", "--model", "{model}", "--prompt", "caf\udce9"], "--prompt is not UTF-8 text: character 3 "
         "stands for the byte 0xe9"),
        (["generate", "--model", "{model}", "--chat", "--prompt", "x", "--system", "\udcff"], "--system is not UTF-8"),
    ],
)
def test_user_errors_are_one_line(capsys, chat_model, argv, message):
    status, out, err = run(capsys, *[a.replace("{model}", str(chat_model)) for a in argv])
    assert status == 2
    assert out == ""
    assert err.startswith("quadapt: error: ") and message in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_model_dir_without_tokenizer(capsys, tmp_path):
    _, path = save_hf_model(tmp_path, "llama")
    status, _, err = run(capsys, "generate", "--model", str(path), "--prompt", "x")
    assert status == 2 and "carries no tokenizer" in err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "quadapt.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("generate", "eval-ppl", "fetch-default"):
        assert command in out.stdout


def test_help_imports_no_torch():
    # Every command's parser is built (and its help printed) with torch blocked: the flags' defaults
    # come from torch-free modules, and the handlers import what they need when they run.
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from quadapt.cli import build_parser, main\n"
        "commands = build_parser()._subparsers._group_actions[0].choices\n"
        "for argv in [['--help'], *([c, '--help'] for c in commands), ['client', 'generate', '--help']]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, argv\n"
        "print(len(commands))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.splitlines()[-1]) >= 13


def test_engine_flags_default_to_engine_args():
    from dataclasses import fields

    from quadapt.cli import build_parser
    from quadapt.runtime.engine.args import EngineArgs

    defaults = {f.name: f.default for f in fields(EngineArgs)}
    for command in (["batch", "--model", "m", "--input", "i"], ["serve", "--model", "m"]):
        args = build_parser().parse_args(command)
        given = {
            "dtype": args.dtype, "threads": args.threads, "kv_cache_bytes": args.kv_cache_memory,
            "block_size": args.block_size, "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_batched_tokens, "max_loras": args.max_loras,
            "max_lora_rank": args.max_lora_rank,
        }
        assert given == {name: defaults[name] for name in given}, command


def test_convert_help_documents_the_head_precision(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--lm-head PRECISION" in out and "float (default) or int8" in out and "refused" in out


def test_eval_ppl_prints_two_lines_and_reports_windows_on_stderr(capsys, chat_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    argv = ["eval-ppl", "--model", str(chat_model), "--text", str(text), "--window", "64"]
    status, out, err = run(capsys, *argv)
    assert status == 0, err
    assert [line.split(":")[0] for line in out.splitlines()] == ["tokens", "perplexity"]
    windows = err.splitlines()
    assert windows and all(line.startswith("quadapt: window ") for line in windows)
    assert "running perplexity" in windows[-1]
    status, quiet_out, quiet_err = run(capsys, "--quiet", *argv)
    assert (status, quiet_out, quiet_err) == (0, out, "")


def test_eval_ppl_text_that_is_not_utf8(capsys, chat_model, tmp_path):
    text = tmp_path / "latin1.txt"
    text.write_bytes("déjà vu".encode("latin-1"))
    status, out, err = run(capsys, "eval-ppl", "--model", str(chat_model), "--text", str(text))
    assert (status, out) == (2, "")
    assert err.startswith(f"quadapt: error: cannot read text {str(text)!r}: ") and "position 1" in err
    assert "0xe9" in err and "pass a UTF-8 text file" in err and err.count("\n") == 1


def test_tokenizer_refuses_text_that_is_not_unicode(chat_model):
    tokenizer = Tokenizer.from_dir(chat_model)
    with pytest.raises(InvalidParameterError, match="the text is not UTF-8 text: character 3 stands for the byte 0xe9"):
        tokenizer.encode("caf\udce9")
    with pytest.raises(InvalidParameterError, match=r"character 1 is the lone surrogate '\\ud800'"):
        tokenizer.encode("a\ud800b", add_special_tokens=False)
    with pytest.raises(TypeError):  # not a str at all: a programming error, left as tokenizers reports it
        tokenizer.encode(None)
    assert tokenizer.decode(tokenizer.encode("café")) == "café"


@pytest.mark.parametrize("threads", ["0", "-2", "two"])
def test_threads_must_be_positive(capsys, threads):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "m", "--prompt", "x", "--threads", threads])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --threads: must be a whole number >= 1, got {threads!r}" in err


def test_threads_are_applied(capsys, chat_model, monkeypatch):
    applied = []
    monkeypatch.setattr(torch, "set_num_threads", applied.append)
    status, _, err = run(capsys, "generate", "--model", str(chat_model), "--prompt", "x", "--max-new-tokens", "1",
                         "--threads", "3")
    assert status == 0, err
    assert applied == [3]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"quadapt {__version__}\n"


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """The chat model's tokenizer on a model whose context is 24 tokens."""
    _, path = save_hf_model(tmp_path_factory.mktemp("short"), "llama", vocab_size=512, max_position_embeddings=24)
    return build_chatml_dir(path)


def test_output_cut_by_the_context_is_reported(capsys, short_context_model):
    tokenizer = Tokenizer.from_dir(short_context_model)
    prompt_tokens = len(tokenizer.encode("the sea"))
    argv = ["generate", "--model", str(short_context_model), "--prompt", "the sea", "--ignore-eos"]
    status, out, err = run(capsys, *argv, "--max-new-tokens", "100")
    assert status == 0 and out.endswith("\n"), err
    assert err == (
        f"quadapt: the output stopped at the model's context of 24 tokens (prompt {prompt_tokens} + output "
        f"{24 - prompt_tokens}); shorten the prompt or lower --max-new-tokens\n"
    )
    status, _, err = run(capsys, *argv, "--max-new-tokens", str(24 - prompt_tokens - 1))
    assert (status, err) == (0, "")  # max_new_tokens came first: nothing to report


def test_verbosity_flags_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        main(["-q", "-v", "fetch-default", "--out", "x"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_repeated_main_prints_each_message_once(capsys, chat_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 4)
    argv = ["eval-ppl", "--model", str(chat_model), "--text", str(text), "--window", "64"]
    first = run(capsys, *argv)[2]
    assert run(capsys, *argv)[2] == first and first.count("\n") == 1


QUANTIZE_FLAGS = [
    "--group-size", "32", "--calibration", "gptq", "--calib-text", "calib.txt", "--actorder",
    "--keep", "o_proj", "model.layers.1.mlp", "--lm-head", "int8",
]
QUANTIZE_KWARGS = {
    "group_size": 32, "calibration": "gptq", "calib_text": ["calib.txt"], "actorder": True,
    "keep": ["o_proj", "model.layers.1.mlp"], "lm_head": "int8",
}


def test_convert_and_merge_take_the_same_quantization_flags(capsys, monkeypatch, tmp_path):
    from quadapt.converters import convert, merge

    calls = {}

    def fake(name):
        def record(*args, **kwargs):
            calls[name] = args, kwargs
            return tmp_path / "out"
        return record

    monkeypatch.setattr(convert, "convert_checkpoint", fake("convert"))
    monkeypatch.setattr(merge, "merge_adapter", fake("merge"))
    common = ["--model", "m", "--out", "o", "--scheme", "int4", *QUANTIZE_FLAGS]
    assert main(["convert", *common]) == 0
    assert main(["merge-adapter", "--adapter", "a", *common]) == 0
    assert calls["convert"] == (("m", "o", "int4"), {"overwrite": False, **QUANTIZE_KWARGS})
    assert calls["merge"] == (("m", "a", "o"), {"scheme": "int4", "overwrite": False, **QUANTIZE_KWARGS})
    # Flags left out are not passed: the library's defaults apply, and merge can tell none was given.
    assert main(["merge-adapter", "--adapter", "a", "--model", "m", "--out", "o"]) == 0
    assert calls["merge"] == (("m", "a", "o"), {"scheme": None, "overwrite": False})
    assert main(["convert", "--model", "m", "--out", "o", "--scheme", "int8"]) == 0
    assert calls["convert"] == (("m", "o", "int8"), {"overwrite": False})
    assert capsys.readouterr().err == f"quadapt: wrote {tmp_path / 'out'}\n" * 4


def test_shared_flags_read_the_same_everywhere(capsys):
    def options(command):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        lines = capsys.readouterr().out.splitlines()
        return {line.split()[0].rstrip(","): " ".join(line.split()) for line in lines if line.startswith("  --")}

    generate, ppl = options("generate"), options("eval-ppl")
    convert, merge = options("convert"), options("merge-adapter")
    for flag in ("--dtype", "--threads"):
        assert generate[flag] == ppl[flag]
    shared = ("--out", "--overwrite", "--group-size", "--calibration", "--calib-text", "--actorder", "--keep", "--lm-head")
    for flag in shared:
        assert convert[flag] == merge[flag], flag
    fetch = options("fetch-default")
    assert fetch["--out"] == convert["--out"] and fetch["--overwrite"] == convert["--overwrite"]


@pytest.mark.parametrize("command", [["run-onnx", "/no/such/export"], ["client", "generate"]])
def test_every_prompt_flag_set_refuses_a_system_message_without_chat(capsys, command):
    # The same --prompt/--chat/--system checks as generate's, before anything loads or dials.
    status, out, err = run(capsys, *command, "--prompt", "x", "--system", "be brief")
    assert (status, out) == (2, "")
    assert err.startswith("quadapt: error: --system is the system message") and "add --chat" in err
    assert err.count("\n") == 1
