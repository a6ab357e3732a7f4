"""`quadapt batch` on a tiny model with a tokenizer and two adapters: each result line carries the
text `quadapt generate` prints for the same settings, lines stream out in finish order, a bad input
line is one line-numbered error while the others still run, and fatal mistakes stop before any run."""

from __future__ import annotations

import json
import re

import pytest
from peft import LoraConfig
from quadapt.cli import main
from quadapt.runtime.api.llm import LLM
from quadapt.runtime.text.tokenizer import Tokenizer

from .test_adapters import make_base, make_peft_adapter
from .test_cli import run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("batch-base"))


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Two random, non-zero PEFT adapters of different targets and ranks (4 and 8)."""
    root = tmp_path_factory.mktemp("batch-adapters")
    configs = {
        "qv": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "mlp": LoraConfig(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    }
    return {name: make_peft_adapter(base, root / name, config=c, seed=i + 1) for i, (name, c) in enumerate(configs.items())}


def write_lines(path, lines: list[object]):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def batch(capsys, base, adapters, requests, *flags: str) -> tuple[int, str, str]:
    argv = ["batch", "--model", str(base), "--input", str(requests), *flags]
    for name, path in adapters.items():
        argv += ["--adapter", f"{name}={path}"]
    return run(capsys, *argv)


def generate(capsys, base, *flags: str) -> str:
    status, out, err = run(capsys, "generate", "--model", str(base), *flags)
    assert status == 0 and out.endswith("\n"), err
    return out[:-1]


def results(out: str) -> dict[object, dict]:
    records = [json.loads(line) for line in out.splitlines()]
    by_id = {r["id"]: r for r in records}
    assert len(by_id) == len(records), "an id came out twice"
    return by_id


def test_results_equal_generate(capsys, base, adapters, tmp_path):
    plain = generate(capsys, base, "--prompt", "the sea", "--max-new-tokens", "10", "--ignore-eos")
    stop = plain[4:7]
    assert len(stop) == 3 and plain.find(stop) < len(plain) - 3  # a cut that shortens the text
    sampled = {"temperature": 1.3, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.2, "seed": 3}
    sampled_flags = ["--temperature", "1.3", "--top-k", "50", "--top-p", "0.9", "--repetition-penalty", "1.2",
                     "--seed", "3"]
    cases = [  # (request line, generate's flags for the same settings)
        ({"id": "plain", "prompt": "the sea", "max_new_tokens": 10, "ignore_eos": True},
         ["--prompt", "the sea", "--max-new-tokens", "10", "--ignore-eos"]),
        ({"id": "qv", "prompt": "the sea", "adapter": "qv", "max_new_tokens": 10, "ignore_eos": True},
         ["--prompt", "the sea", "--max-new-tokens", "10", "--ignore-eos", "--adapter", str(adapters["qv"])]),
        ({"id": "chat", "messages": [{"role": "user", "content": "hello there"}], "adapter": "mlp",
          "max_new_tokens": 12, "ignore_eos": True},
         ["--chat", "--prompt", "hello there", "--max-new-tokens", "12", "--ignore-eos", "--adapter",
          str(adapters["mlp"])]),
        ({"id": 7, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
          "max_new_tokens": 6, "adapter": None},
         ["--chat", "--system", "be brief", "--prompt", "hi", "--max-new-tokens", "6"]),
        ({"id": "sampled", "prompt": "once", "adapter": "qv", "max_new_tokens": 16, "ignore_eos": True, **sampled},
         ["--prompt", "once", "--max-new-tokens", "16", "--ignore-eos", "--adapter", str(adapters["qv"]),
          *sampled_flags]),
        ({"id": "stopped", "prompt": "the sea", "max_new_tokens": 10, "ignore_eos": True, "stop": stop},
         ["--prompt", "the sea", "--max-new-tokens", "10", "--ignore-eos", "--stop", stop]),
        ({"prompt": "defaults"}, ["--prompt", "defaults"]),  # generate's defaults; the id is the line's
    ]
    requests = write_lines(tmp_path / "requests.jsonl", [line for line, _ in cases])
    status, out, err = batch(capsys, base, adapters, requests)
    assert status == 0, err
    got = results(out)
    assert set(got) == {"plain", "qv", "chat", 7, "sampled", "stopped", "line-7"}
    tokenizer = Tokenizer.from_dir(base)
    for line, flags in cases:
        rid = line.get("id", "line-7")
        assert got[rid]["text"] == generate(capsys, base, *flags), rid
    assert got["qv"]["text"] != got["plain"]["text"]  # the adapter was applied
    assert got["stopped"]["text"] == plain[: plain.find(stop)] and got["stopped"]["finish_reason"] == "stop"
    assert got["plain"]["finish_reason"] == "length"
    prompt_tokens = len(tokenizer.encode("the sea"))
    assert got["plain"]["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 10}
    assert list(got["plain"]) == ["id", "text", "finish_reason", "usage"]
    # Fewer slots than adapters swaps them in and out, with the same results.
    status, swapped, err = batch(capsys, base, adapters, requests, "--max-loras", "1")
    assert status == 0, err
    assert results(swapped) == got


def test_lines_stream_out_in_finish_order(capsys, base, adapters, tmp_path, monkeypatch):
    lengths = {"nine": 9, "two": 2, "fourteen": 14, "five": 5, "one": 1}
    requests = write_lines(tmp_path / "requests.jsonl", [
        {"id": rid, "prompt": f"{rid} little pigs", "max_new_tokens": n, "ignore_eos": True,
         "adapter": ["qv", "mlp", None][i % 3]}
        for i, (rid, n) in enumerate(lengths.items())
    ])
    output = tmp_path / "results.jsonl"
    written = []  # result lines in the file before each engine step
    step = LLM.step

    def counting_step(self):
        written.append(len(output.read_text().splitlines()))
        return step(self)

    monkeypatch.setattr(LLM, "step", counting_step)
    status, out, err = batch(capsys, base, adapters, requests, "--output", str(output))
    assert (status, out) == (0, "")
    assert re.fullmatch(r"quadapt: 5 requests, 31 tokens in \d+\.\d s\n", err)
    ids = [json.loads(line)["id"] for line in output.read_text().splitlines()]
    assert ids == sorted(lengths, key=lengths.get)  # every prompt prefills in step 1, so n tokens end at step n
    # Each line is in the file (flushed) once its request finished, before the next step runs.
    assert written == [sum(n <= i for n in lengths.values()) for i in range(14)]


def test_bad_lines_are_reported_and_the_others_run(capsys, base, adapters, tmp_path):
    lines = [
        {"id": "a", "prompt": "x", "max_new_tokens": 3, "ignore_eos": True},
        '{"id": "b", "prompt": ',
        {"id": "c", "prompt": "x", "adapter": "nope"},
        {"id": "d", "prompt": "x", "colour": "red"},
        {"id": "e", "prompt": "x", "max_new_tokens": 0},
        "   ",
        {"id": "a", "prompt": "again"},
        [1, 2],
        {"id": "f", "prompt": "x", "messages": [{"role": "user", "content": "x"}]},
        {"id": "g", "messages": "hello"},
        {"id": "h", "messages": [{"role": "user", "content": "hi"}], "adapter": "mlp", "max_new_tokens": 3, "ignore_eos": True},
        {"id": "long", "prompt": "word " * 400},
        {"id": True, "prompt": "x"},
        {"id": "i", "prompt": "x", "stop": ""},
    ]
    requests = write_lines(tmp_path / "requests.jsonl", lines)
    status, out, err = batch(capsys, base, adapters, requests)
    assert status == 1
    assert set(results(out)) == {"a", "h"}
    expected = {
        2: "not JSON (Expecting value, column 22); write one JSON object per line",
        3: "unknown adapter 'nope'; this run loaded mlp, qv. Load it with --adapter nope=PATH, or leave",
        4: "unknown key 'colour'; allowed: id, prompt, messages, adapter, max_new_tokens, temperature, top_k, "
           "top_p, repetition_penalty, seed, stop, ignore_eos",
        5: "max_new_tokens (--max-new-tokens) must be an integer >= 1, got 0",
        7: 'id "a" is already used by line 1; give each request its own id',
        8: "a request is a JSON object {...}, got an array",
        9: 'give exactly one of "prompt" (raw text) and "messages" (chat messages), got both',
        10: '"messages" must be an array of {"role": ..., "content": ...} objects, got a string',
        12: "the model's context is 256",
        13: '"id" must be a string or an integer, got a boolean; leave it out to use "line-13"',
        14: "stop must be a list of non-empty strings",
    }
    errors = err.splitlines()[:-1]
    assert len(errors) == len(expected), err
    for line, (number, message) in zip(errors, expected.items()):
        assert line.startswith(f"quadapt: error: {requests} line {number}: ") and message in line, line
    assert re.fullmatch(r"quadapt: 2 requests, 6 tokens in \d+\.\d s; 11 bad lines not run", err.splitlines()[-1])
    status, quiet_out, quiet_err = batch(capsys, base, adapters, requests, "--output", str(tmp_path / "o.jsonl"))
    assert (status, quiet_out) == (1, "") and quiet_err.splitlines()[:-1] == errors


def test_output_file_and_empty_stdout(capsys, base, adapters, tmp_path):
    requests = write_lines(tmp_path / "requests.jsonl", [
        {"id": 1, "prompt": "a", "max_new_tokens": 2, "ignore_eos": True},
        {"id": 2, "messages": [{"role": "user", "content": "b"}], "adapter": "qv", "max_new_tokens": 3},
    ])
    output = tmp_path / "results.jsonl"
    output.write_text("old results\n")  # replaced
    status, out, err = batch(capsys, base, adapters, requests, "--output", str(output))
    assert (status, out) == (0, ""), err
    assert set(results(output.read_text())) == {1, 2}
    assert re.fullmatch(r"quadapt: 2 requests, \d+ tokens in \d+\.\d s\n", err)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--adapter", "bad=/no/such/adapter"], "--adapter bad=/no/such/adapter: adapter path"),
        (["--adapter", "qv={qv}", "--adapter", "qv={mlp}"], "adapter name(s) 'qv' given twice"),
        (["--adapter", "mlp={mlp}", "--max-lora-rank", "4"], "adapter 'mlp' has rank 8, above --max-lora-rank 4"),
        (["--kv-cache-memory", "1KiB"], "holds no block of 16 positions"),
        (["--output", "{input}"], "is the input file"),
        (["--output", "/no/such/dir/out.jsonl"], "lies in a directory that does not exist"),
    ],
)
def test_fatal_errors_stop_before_any_run(capsys, base, adapters, tmp_path, flags, message):
    requests = write_lines(tmp_path / "requests.jsonl", [{"prompt": "x", "max_new_tokens": 1}])
    values = {"qv": adapters["qv"], "mlp": adapters["mlp"], "input": requests}
    status, out, err = batch(capsys, base, {}, requests, *[f.format(**values) for f in flags])
    assert (status, out) == (2, "")
    assert err.startswith("quadapt: error: ") and message in err and err.count("\n") == 1, err


def test_missing_input(capsys, base):
    status, out, err = run(capsys, "batch", "--model", str(base), "--input", "/no/such.jsonl")
    assert (status, out) == (2, "") and "input file '/no/such.jsonl' does not exist" in err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--adapter", "no-path", "must be NAME=PATH (e.g. sql=adapters/sql), got 'no-path'"),
        ("--kv-cache-memory", "lots", "must be a size like 512MiB, 2GiB, 1.5GB or 1000000 (bytes), got 'lots'"),
        ("--max-num-seqs", "0", "must be a whole number >= 1, got '0'"),
    ],
)
def test_bad_flag_values(capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["batch", "--model", "m", "--input", "r.jsonl", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_help_states_the_formats_and_exit_status(capsys):
    with pytest.raises(SystemExit):
        main(["batch", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "1 when some lines were bad" in text and '"line-N"' in text
    assert '{"id", "text", "finish_reason", "usage": {"prompt_tokens", "completion_tokens"}}' in text
