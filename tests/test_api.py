"""The public API, `quadapt.load(...).generate(...)`, gives what the layers under it give.

On a tiny random Llama with a ChatML tokenizer: the text equals `generate_text` called by hand
(the reference generator the engine is checked against) and the CLI's stdout for the same settings, with
and without a LoRA adapter; mistakes raise the runtime's errors; and `import quadapt` stays cheap.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import quadapt
from quadapt.cli import main
from quadapt.runtime.api import load as api
from quadapt.runtime.checkpoints import loader
from quadapt.runtime.checkpoints.adapters import apply_adapter
from quadapt.runtime.checkpoints import open_checkpoint
from quadapt.runtime.errors import AdapterError, CheckpointError, InvalidParameterError
from quadapt.runtime.api.generate import generate_text
from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.engine.sampling import SamplingParams
from quadapt.runtime.text.tokenizer import Tokenizer

from .test_adapters import make_peft_adapter
from .test_model import save_hf_model
from .test_tokenizer import build_chatml_dir

HELLO = [{"role": "user", "content": "hello there"}]
GREEDY = {"max_new_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama with a ChatML byte-level BPE tokenizer beside its weights."""
    _, path = save_hf_model(tmp_path_factory.mktemp("api"), "llama", vocab_size=512)
    return build_chatml_dir(path)


@pytest.fixture(scope="module")
def loaded(chat_model):
    return quadapt.load(chat_model)


@pytest.fixture(scope="module")
def adapter(chat_model, tmp_path_factory):
    return make_peft_adapter(
        chat_model, tmp_path_factory.mktemp("adapter") / "a", r=4, lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"], seed=3,
    )


def by_hand(path, prompt, *, chat: bool, adapter=None, **params) -> str:
    """The five-import sequence the README used to show: reader, model, tokenizer, prompt ids, generate."""
    reader = open_checkpoint(path)
    model = load_model(reader)
    if adapter is not None:
        apply_adapter(model, adapter)
    tokenizer = Tokenizer.from_files(reader.tokenizer_files())
    if chat:
        prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=not chat)
    return "".join(generate_text(model, tokenizer, ids, SamplingParams(temperature=0.0, **params)))


def cli_stdout(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(["generate", *argv]) == 0
    return capsys.readouterr().out


def test_the_api_is_the_root_s(loaded):
    assert quadapt.load is api.load and quadapt.LoadedModel is api.LoadedModel
    assert isinstance(loaded, quadapt.LoadedModel) and {"load", "LoadedModel"} <= set(dir(quadapt))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        quadapt.nope  # noqa: B018


def test_messages_equal_the_layers_below_and_the_cli(capsys, chat_model, loaded):
    text = loaded.generate(HELLO, **GREEDY)
    assert len(text) > 0
    assert text == by_hand(chat_model, HELLO, chat=True, **GREEDY)
    assert text + "\n" == cli_stdout(
        capsys, "--model", str(chat_model), "--chat", "--prompt", "hello there", "--max-new-tokens", "12", "--ignore-eos"
    )
    assert loaded.generate("hello there", chat=True, **GREEDY) == text  # --chat's one user message


def test_a_system_message_equals_the_cli_s_system(capsys, chat_model, loaded):
    messages = [{"role": "system", "content": "be brief"}, *HELLO]
    assert loaded.generate(messages, **GREEDY) + "\n" == cli_stdout(
        capsys, "--model", str(chat_model), "--chat", "--system", "be brief", "--prompt", "hello there",
        "--max-new-tokens", "12", "--ignore-eos",
    )


def test_raw_text_equals_the_layers_below_and_the_cli(capsys, chat_model, loaded):
    text = loaded.generate("the sea", **GREEDY)
    assert text == by_hand(chat_model, "the sea", chat=False, **GREEDY)
    assert text + "\n" == cli_stdout(capsys, "--model", str(chat_model), "--prompt", "the sea", "--max-new-tokens", "12", "--ignore-eos")
    assert text != loaded.generate(HELLO, **GREEDY)  # negative control: the template was not applied to raw text


def test_seeded_sampling_equals_the_cli(capsys, chat_model, loaded):
    settings = {"temperature": 1.5, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.2, "max_new_tokens": 16, "ignore_eos": True}
    text = loaded.generate("the sea", seed=3, **settings)
    assert text + "\n" == cli_stdout(
        capsys, "--model", str(chat_model), "--prompt", "the sea", "--temperature", "1.5", "--top-p", "0.9",
        "--top-k", "50", "--repetition-penalty", "1.2", "--max-new-tokens", "16", "--ignore-eos", "--seed", "3",
    )
    assert loaded.generate("the sea", seed=3, **settings) == text
    assert loaded.generate("the sea", seed=4, **settings) != text


def test_stream_yields_the_same_text_and_a_result(loaded):
    text = loaded.generate(HELLO, **GREEDY)
    deltas = loaded.generate(HELLO, stream=True, **GREEDY)
    assert "".join(deltas) == text
    assert deltas.result.finish_reason == "length" and deltas.result.completion_tokens == 12
    assert deltas.result.prompt_tokens == len(loaded.encode_prompt(HELLO))


def test_generate_runs_the_engine_not_the_reference(loaded, monkeypatch):
    """The fast path: the engine's executor (weights dequantized once), never the reference generator."""
    from quadapt.runtime.api import generate

    def reference(*args, **kwargs):
        raise AssertionError("quadapt.load(...).generate ran the reference generator")

    expected = by_hand(loaded.path, HELLO, chat=True, **GREEDY)
    monkeypatch.setattr(generate, "generate_text", reference)
    monkeypatch.setattr(generate, "generate_ids", reference)
    assert loaded.generate(HELLO, **GREEDY) == expected
    assert loaded.model is loaded._llm.engine.executor.model


def test_generations_interleave_and_one_left_early_frees_its_cache(loaded):
    settings = {"max_new_tokens": 8, "ignore_eos": True}
    first, second = loaded.generate("hello", stream=True, **settings), loaded.generate(HELLO, stream=True, **settings)
    texts = {"hello": "", "chat": ""}
    streams = {"hello": first, "chat": second}
    while streams:  # in turn: each takes its own deltas, and the engine steps both
        for name, stream in list(streams.items()):
            piece = next(stream, None)
            if piece is None:
                del streams[name]
            else:
                texts[name] += piece
    assert texts == {"hello": loaded.generate("hello", **settings), "chat": loaded.generate(HELLO, **settings)}
    assert first.result.completion_tokens == second.result.completion_tokens == 8
    left = loaded.generate("hello", stream=True, max_new_tokens=50, ignore_eos=True)
    next(left)
    engine = loaded._llm.engine
    assert engine.allocator.num_used > 0
    left.close()
    assert engine.allocator.num_used == 0 and not engine.has_unfinished()
    assert left.result.finish_reason is None  # it stopped early: no finish reason
    untouched = loaded.generate("hello", stream=True, max_new_tokens=50, ignore_eos=True)
    assert engine.has_unfinished()
    untouched.close()  # never iterated: closing it still cancels its request
    assert not engine.has_unfinished() and engine.allocator.num_used == 0


def test_a_context_cut_is_logged(loaded, caplog):
    context = loaded.model.config.max_position_embeddings
    room = context - len(loaded.encode_prompt("hi"))
    with caplog.at_level("WARNING", logger="quadapt.runtime.api.load"):
        loaded.generate("hi", max_new_tokens=room, ignore_eos=True)
    assert not caplog.records  # negative control: both limits on the same token, nothing was cut
    with caplog.at_level("WARNING", logger="quadapt.runtime.api.load"):
        loaded.generate("hi", max_new_tokens=context + 10, ignore_eos=True)
    assert f"context of {context} tokens" in caplog.text


def test_stop_strings(loaded):
    text = loaded.generate(HELLO, **GREEDY)
    stop = text.strip()[len(text.strip()) // 2 :][:2]
    assert stop and loaded.generate(HELLO, stop=stop, **GREEDY) == text[: text.index(stop)]
    assert loaded.generate(HELLO, stop=[stop], **GREEDY) == text[: text.index(stop)]


def test_adapter_equals_the_layers_below_and_the_cli(capsys, chat_model, loaded, adapter):
    adapted = quadapt.load(chat_model, adapter=adapter)
    assert adapted.adapter == adapter
    text = adapted.generate("hello world", **GREEDY)
    assert text == by_hand(chat_model, "hello world", chat=False, adapter=adapter, **GREEDY)
    assert text + "\n" == cli_stdout(
        capsys, "--model", str(chat_model), "--adapter", str(adapter), "--prompt", "hello world",
        "--max-new-tokens", "12", "--ignore-eos",
    )
    assert text != loaded.generate("hello world", **GREEDY)  # negative control: the adapter did something


def test_dtype_and_threads(chat_model, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    half = quadapt.load(chat_model, dtype="bfloat16", threads=1)
    assert calls == [1]
    assert half.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert isinstance(half.generate("hi", max_new_tokens=2), str)
    assert quadapt.load(chat_model, dtype=torch.float16).model.lm_head.weight.dtype == torch.float16


# ---- mistakes ------------------------------------------------------------------------------------


def test_a_missing_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        quadapt.load(tmp_path / "nowhere")


def test_a_checkpoint_without_tokenizer(tmp_path):
    _, path = save_hf_model(tmp_path, "llama")
    with pytest.raises(CheckpointError, match="carries no tokenizer"):
        quadapt.load(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "float64"}, "dtype must be one of float32, bfloat16, float16, got 'float64'"),
        ({"dtype": torch.int8}, "dtype must be one of"),
        ({"threads": 0}, "threads must be a positive integer"),
        ({"threads": True}, "threads must be a positive integer"),
    ],
)
def test_bad_load_settings(chat_model, kwargs, message):
    with pytest.raises(InvalidParameterError, match=message):
        quadapt.load(chat_model, **kwargs)


def test_a_wrong_adapter_fails_before_the_weights_load(chat_model, tmp_path, monkeypatch):
    _, other = save_hf_model(tmp_path, "llama", vocab_size=512, intermediate_size=96)
    wrong = make_peft_adapter(other, tmp_path / "wrong", r=2, target_modules=["down_proj"])

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the adapter was checked")

    monkeypatch.setattr(loader, "load_model", no_loading)  # what build_engine calls after the adapter checks
    with pytest.raises(AdapterError, match="another base"):
        quadapt.load(chat_model, adapter=wrong)
    with pytest.raises(AdapterError, match="not a directory"):
        quadapt.load(chat_model, adapter=tmp_path / "no-adapter")


@pytest.mark.parametrize(
    "prompt",
    [
        [],
        {"role": "user", "content": "hi"},
        ["hi"],
        [{"role": "user"}],
        [{"content": "hi"}],
        [{"role": 1, "content": "hi"}],
        [*HELLO, None],
    ],
    ids=["empty", "a-dict", "strings", "no-content", "no-role", "role-not-str", "a-none"],
)
def test_bad_messages(loaded, prompt):
    with pytest.raises(InvalidParameterError, match="message"):
        loaded.generate(prompt, max_new_tokens=1)


def test_messages_with_chat_false(loaded):
    with pytest.raises(InvalidParameterError, match="chat=False"):
        loaded.generate(HELLO, chat=False, max_new_tokens=1)


def test_bad_sampling_settings_are_the_runtime_s(loaded):
    with pytest.raises(InvalidParameterError, match="temperature"):
        loaded.generate("hi", temperature=-1.0)


# ---- import cost ---------------------------------------------------------------------------------


def test_import_quadapt_loads_no_torch():
    code = (
        "import sys, quadapt; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert quadapt.__version__; assert 'quadapt.runtime' not in sys.modules, 'runtime imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
