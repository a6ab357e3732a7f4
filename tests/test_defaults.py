"""Every front door decodes greedily by default, with the same defaults, so the same prompt gives
the same text: `LLM.generate`, `quadapt.load(...).generate`, `quadapt generate`, `quadapt batch`,
the gRPC server and `run-onnx`.

The defaults are written once, as `SamplingParams`' field defaults; the flags and the wire format
derive theirs from it. The model is a tiny random int4 Llama, exported with float32 compute and a
float head so that onnxruntime computes what the checkpoint says (see tests/test_edge.py).

On a packed checkpoint the doors that build an engine by default (`executor="auto"`) run the ONNX
executor, whose int8 activations move the logits' last bits (and a tiny random model's greedy
text with them): those doors agree with each other and with `run-onnx` on an export of the
executor's settings; with `--executor torch` / the torch engine they give the reference
generator's text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import quadapt
from quadapt import cli
from quadapt.converters.onnx_export import export_onnx
from quadapt.runtime.api.generate import generate_text
from quadapt.runtime.api.async_llm import AsyncLLM
from quadapt.runtime.api.llm import LLM, GenerateRequest
from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.engine.sampling import SAMPLING_DEFAULTS, SamplingParams
from quadapt.runtime.serving.server import ServerConfig
from quadapt.runtime.text.tokenizer import Tokenizer

from .test_edge import make_base
from .test_formats import convert_checkpoint
from .test_server import ServerThread, make_engine

PROMPT = "the quick brown"


@pytest.fixture(scope="module")
def checkpoint_and_export(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("defaults")
    int4 = convert_checkpoint(make_base(root / "base", intermediate_size=128), root / "int4", "int4")
    return int4, export_onnx(int4, root / "onnx", accuracy_level=1, lm_head="float")


def test_the_default_is_greedy_and_written_once():
    assert SamplingParams().greedy and SAMPLING_DEFAULTS["temperature"] == 0.0
    parser = cli.build_parser()
    generate = parser.parse_args(["generate", "--model", "m", "--prompt", "p"])
    run_onnx = parser.parse_args(["run-onnx", "dir", "--prompt", "p"])
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        assert getattr(generate, name) == getattr(run_onnx, name) == SAMPLING_DEFAULTS[name], name


def test_every_front_door_gives_the_same_greedy_text(checkpoint_and_export, tmp_path, capsys):
    checkpoint, export = checkpoint_and_export
    tokenizer = Tokenizer.from_dir(checkpoint)
    ids = tokenizer.encode(PROMPT)
    # The yardstick: the reference generator, greedy by name.
    expected = "".join(generate_text(load_model(checkpoint), tokenizer, ids, SamplingParams(temperature=0.0)))
    assert expected.strip(), "an empty text would make the comparison vacuous"
    texts: dict[str, str] = {}

    [done] = LLM.from_engine(make_engine(checkpoint, {}, tokenizer), tokenizer).generate([GenerateRequest(PROMPT)])
    texts["LLM.generate"] = done.text
    texts["quadapt.load, torch"] = quadapt.load(checkpoint, executor="torch").generate(PROMPT)
    texts["quadapt.LLM, torch"] = quadapt.LLM(checkpoint, executor="torch").generate(PROMPT)[0].text
    auto = {"quadapt.load": quadapt.load(checkpoint).generate(PROMPT), "quadapt.LLM": quadapt.LLM(checkpoint).generate(PROMPT)[0].text}

    for executor in ("auto", "torch"):
        capsys.readouterr()
        assert cli.main(["generate", "--model", str(checkpoint), "--prompt", PROMPT, "--executor", executor]) == 0
        (auto if executor == "auto" else texts)[f"quadapt generate, {executor}"] = capsys.readouterr().out.removesuffix("\n")

        requests, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        requests.write_text(json.dumps({"id": "q", "prompt": PROMPT}) + "\n")
        assert cli.main(["batch", "--model", str(checkpoint), "--input", str(requests), "--output", str(results),
                         "--executor", executor]) == 0
        (auto if executor == "auto" else texts)[f"quadapt batch, {executor}"] = json.loads(results.read_text())["text"]

    served = ServerThread(ServerConfig(model=str(checkpoint), port=0),
                          AsyncLLM.from_engine(make_engine(checkpoint, {}, tokenizer), tokenizer))
    try:
        with served.client() as client:
            texts["gRPC Generate"] = client.generate(PROMPT).text
    finally:
        served.close()

    capsys.readouterr()
    assert cli.main(["run-onnx", str(export), "--prompt", PROMPT]) == 0
    texts["run-onnx"] = capsys.readouterr().out.removesuffix("\n")
    capsys.readouterr()
    assert cli.main(["run-onnx", str(export_onnx(checkpoint, tmp_path / "serving-settings")), "--prompt", PROMPT]) == 0
    auto["run-onnx, the ONNX executor's settings"] = capsys.readouterr().out.removesuffix("\n")

    assert auto == dict.fromkeys(auto, auto["run-onnx, the ONNX executor's settings"])
    assert texts == dict.fromkeys(texts, expected)
