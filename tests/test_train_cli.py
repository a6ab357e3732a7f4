"""`quadapt train` end to end on a tiny model with a real chat tokenizer: the data format (chat
messages and prompt/completion, completion-only labels, bad lines named), the adapter it writes
against PEFT on the float base, and its user errors."""

from __future__ import annotations

import copy
import json
import stat

import pytest
import torch

from quadapt.cli import main
from quadapt.runtime.checkpoints.adapters import apply_adapter
from quadapt.runtime.errors import InvalidParameterError
from quadapt.runtime.files import current_umask
from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.text.tokenizer import Tokenizer
from quadapt.train.data import IGNORE, read_examples

from .conftest import assert_close
from .test_model import save_hf_model
from .test_tokenizer import build_chatml_dir


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama (as transformers saved it) with a ChatML byte-level BPE tokenizer."""
    hf, path = save_hf_model(tmp_path_factory.mktemp("train-cli"), "llama", vocab_size=512)
    return hf, build_chatml_dir(path)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n):
    return [{"messages": [{"role": "user", "content": f"name {i}"},
                          {"role": "assistant", "content": f"IT IS {i}"}]} for i in range(n)]


def test_labels_cover_the_assistant_turn_and_the_completion_only(chat_model, tmp_path):
    _, path = chat_model
    tokenizer = Tokenizer.from_dir(path)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(1) + [{"prompt": "two plus two is", "completion": " four"}])
    chat, plain = read_examples(data, tokenizer, max_length=512)
    messages = chat_rows(1)[0]["messages"]
    full = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False), add_special_tokens=False)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages[:1]), add_special_tokens=False)
    assert chat.input_ids == full
    assert chat.labels == [IGNORE] * len(prompt) + full[len(prompt):]
    assert tokenizer.decode(full[len(prompt):], skip_special_tokens=False).startswith("IT IS 0<|im_end|>")
    completion = tokenizer.encode(" four", add_special_tokens=False) + [min(tokenizer.eos_token_ids)]
    assert plain.input_ids[-len(completion):] == completion
    assert plain.labels == [IGNORE] * (len(plain.input_ids) - len(completion)) + completion


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "d.jsonl:3: not valid JSON"),
        ('{"prompt": "x"}', "d.jsonl:3: expected {\"prompt\": str, \"completion\": str}"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "d.jsonl:3: no assistant message"),
        ('{"messages": [{"role": "user"}]}', "d.jsonl:3: \"messages\" must be a non-empty list"),
    ],
)
def test_a_bad_line_is_reported_with_its_number(chat_model, tmp_path, line, message):
    _, path = chat_model
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(2) + [line])
    with pytest.raises(InvalidParameterError) as e:
        read_examples(data, Tokenizer.from_dir(path), max_length=512)
    assert message in str(e.value)


@pytest.mark.parametrize("layers", [[], ["--layers", "1"]], ids=["all-layers", "top-layer"])
def test_the_adapter_loads_in_peft_and_quadapt_with_the_same_logits(chat_model, tmp_path, capsys, layers):
    import peft

    hf, path = chat_model
    hf = copy.deepcopy(hf)  # PEFT wraps the model it is given in place
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(12))
    out = tmp_path / "adapter"
    status = main(["train", "--model", str(path), "--data", str(data), "--out", str(out), "--steps", "3",
                   "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--targets", "q_proj", "v_proj", "down_proj",
                   "--batch-size", "4", "--save-every", "0", *layers])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.out == f"{out}\n"
    assert {"adapter_config.json", "adapter_model.safetensors", "loss.png", "log.jsonl"} <= {p.name for p in out.iterdir()}
    # The weights follow the umask like every other output (safetensors alone would make them 0600).
    assert stat.S_IMODE((out / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~current_umask()
    ids = torch.randint(0, 420, (2, 11))
    with torch.no_grad():
        base = hf(ids).logits
    peft_model = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    assert len([n for n, _ in peft_model.named_modules() if n.endswith("lora_A.default")]) == (6 if not layers else 3)
    with torch.no_grad():
        expected = peft_model(ids).logits
    ours = load_model(path)
    apply_adapter(ours, out)
    with torch.no_grad():
        actual = ours(ids)
    assert (expected - base).abs().max() > 1e-3  # the trained adapter changes the output
    assert_close(actual, expected)
    status = main(["generate", "--model", str(path), "--adapter", str(out), "--prompt", "name 3",
                   "--chat", "--max-new-tokens", "4"])
    assert status == 0, capsys.readouterr().err


def test_user_errors(chat_model, tmp_path, capsys):
    _, path = chat_model
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        (["--out", str(tmp_path / "full")], "is not empty; add --resume"),
        (["--out", str(tmp_path / "new"), "--resume"], "holds no training state"),
        (["--out", str(tmp_path / "new2"), "--dropout", "1.5"], "--dropout must be in [0, 1)"),
    ]
    for extra, message in cases:
        status = main(["train", "--model", str(path), "--data", str(data), "--steps", "1", *extra])
        err = capsys.readouterr().err
        assert status == 2 and message in err and "Traceback" not in err, err


def test_int4_in_memory_follows_converts_group_size_rule(chat_model, tmp_path, capsys):
    """Input sizes 64 and 112: no int4 group size of convert's (128, 64, 32) divides both, so a float
    base is refused as convert refuses it, in one line naming what to do; nf4 takes any shape."""
    _, path = chat_model
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4))
    status = main(["train", "--model", str(path), "--data", str(data), "--out", str(tmp_path / "int4"), "--steps", "1",
                   "--quantize", "int4"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("quadapt: error: --quantize int4: no int4 group size") and err.count("\n") == 1
    assert "or use --quantize nf4" in err and not (tmp_path / "int4").exists()
