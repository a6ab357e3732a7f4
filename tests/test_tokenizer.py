"""The tokenizer against transformers' `AutoTokenizer` on small real tokenizers trained in the test.

Two shapes of tokenizer cover the models quadapt runs: a byte-level BPE with a ChatML template
and no BOS (SmolLM2, Qwen2), and a SentencePiece-style BPE with byte fallback, a decoder that
strips the first space, and a post-processor that adds BOS (Llama 2, Mistral).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from quadapt.runtime.checkpoints import TokenizerFiles
from quadapt.runtime.errors import CheckpointError, ConfigError, InvalidParameterError
from quadapt.runtime.text.text_stream import IncrementalDetokenizer
from quadapt.runtime.text.tokenizer import Tokenizer

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "Hello world, this is a test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "Café, naïve résumé, façade, Ærøskøbing, jalapeño.",
    "日本語のテキストと中文文本。",
    "Emoji 😀 👍🏽 🎉 and more 🚀.",
    "    indented code\n\tfoo(bar)  # spaces  inside\n",
] * 4

# Unseen characters (🦀, Ω, ß, 한국어) make the byte-level BPE split a character across tokens.
TEXTS = [
    "Hello world",
    "  leading spaces, double  spaces and trailing ",
    "Café naïve résumé — 日本語 テキスト 中文",
    "Emoji: 😀👍🏽🎉🦀 family 👨‍👩‍👧 flag 🇫🇷",
    "Ω ß 한국어\n\nnew lines\tand tabs",
    "<|im_start|>user\nhi there<|im_end|>\n",
]


def build_chatml_dir(path: Path) -> Path:
    """A byte-level BPE like SmolLM2's, saved as an HF tokenizer dir with its ChatML template."""
    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "chat_template": SMOLLM2_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    return path


def build_llama_dir(path: Path) -> Path:
    """A SentencePiece-style BPE like Llama 2's: Metaspace, byte fallback, BOS from the post-processor."""
    trained = BackendTokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(
        [line for line in CORPUS if line.isascii()],
        trainers.BpeTrainer(vocab_size=220, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False),
    )
    spec = json.loads(trained.to_str())["model"]
    # Llama 2's layout: specials, the 256 byte tokens, then the learned pieces.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(spec["vocab"], key=spec["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = BackendTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # A serialized AddedToken, as older transformers wrote it.
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "rstrip": False, "special": True},
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module", params=["chatml", "llama"])
def tokenizer_dir(request, tmp_path_factory) -> Path:
    build = build_chatml_dir if request.param == "chatml" else build_llama_dir
    return build(tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory) -> Path:
    return build_chatml_dir(tmp_path_factory.mktemp("chatml"))


def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_equals_transformers(tokenizer_dir, text, add_special_tokens):
    ours, theirs = Tokenizer.from_dir(tokenizer_dir), hf_tokenizer(tokenizer_dir)
    assert ours.encode(text, add_special_tokens=add_special_tokens) == theirs.encode(
        text, add_special_tokens=add_special_tokens
    )


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_equals_transformers(tokenizer_dir, text, skip_special_tokens):
    ours, theirs = Tokenizer.from_dir(tokenizer_dir), hf_tokenizer(tokenizer_dir)
    ids = theirs.encode(text)
    assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == theirs.decode(
        ids, skip_special_tokens=skip_special_tokens
    )


def test_bos_comes_from_the_post_processor(tokenizer_dir):
    ours, theirs = Tokenizer.from_dir(tokenizer_dir), hf_tokenizer(tokenizer_dir)
    ids = ours.encode("Hello world")
    if tokenizer_dir.name.startswith("llama"):
        assert ids[0] == ours.bos_token_id == 1 and ours.encode("Hello world", add_special_tokens=False) == ids[1:]
    else:
        assert ours.bos_token_id not in ids  # SmolLM2's post-processor adds nothing
    assert ours.bos_token_id == theirs.bos_token_id


def test_add_bos_token_without_post_processor_follows_transformers(tmp_path):
    # transformers 5 ignores add_bos_token beside a tokenizer.json: its post-processor decides.
    path = build_llama_dir(tmp_path / "llama-no-post")
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (path / "tokenizer.json").write_text(json.dumps(spec))
    assert Tokenizer.from_dir(path).encode("Hello world") == hf_tokenizer(path).encode("Hello world")


def test_special_token_properties(tokenizer_dir):
    ours, theirs = Tokenizer.from_dir(tokenizer_dir), hf_tokenizer(tokenizer_dir)
    assert ours.vocab_size == len(theirs)
    if tokenizer_dir.name.startswith("chatml"):
        # tokenizer_config's eos (<|im_end|> = 2) and generation_config's [2, 0].
        assert ours.eos_token_ids == {2, 0}
    else:
        assert ours.eos_token_ids == {theirs.eos_token_id} == {2}


MESSAGES = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café? 日本語 😀"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
]


@pytest.mark.parametrize("messages", MESSAGES, ids=["one", "system", "multi-turn"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(chatml_dir, messages, add_generation_prompt):
    ours, theirs = Tokenizer.from_dir(chatml_dir), hf_tokenizer(chatml_dir)
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    expected_ids = theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert ours.encode(text, add_special_tokens=False) == expected_ids


# Exercises the environment transformers gives templates: tojson (no HTML escaping, unicode kept),
# namespace, loop controls, {% generation %}, special-token variables, None-valued keys dropped,
# tools, extra variables.
FEATURE_TEMPLATE = """{{ bos_token }}{% set ns = namespace(count=0) %}
{% for message in messages %}
  {% if message.role == 'skip' %}{% continue %}{% endif %}
  {% set ns.count = ns.count + 1 %}
  {% if message.role == 'assistant' %}{% generation %}[A]{{ message.content }}{% endgeneration %}
  {% else %}{{ message | tojson }}{% endif %}
  {% if message.tool_calls is defined %}HAS_TOOL_CALLS{% endif %}
  {% if message.role == 'stop' %}{% break %}{% endif %}
{% endfor %}
{{ ns.count }}{{ eos_token }}{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}
{{ dict(a=1) | tojson }}{{ custom_flag }}{% if add_generation_prompt %}<go>{% endif %}"""

FEATURE_MESSAGES = [
    {"role": "user", "content": "<b>bold</b> & \"quotes\" — ünïcödé 日本"},
    {"role": "skip", "content": "never shown"},
    {"role": "assistant", "content": "sure", "tool_calls": None},
    {"role": "stop", "content": "last"},
    {"role": "user", "content": "after the break"},
]


def test_template_environment_equals_transformers(chatml_dir):
    ours, theirs = Tokenizer.from_dir(chatml_dir), hf_tokenizer(chatml_dir)
    tools = [{"type": "function", "function": {"name": "f", "description": "ünï <x>", "parameters": {}}}]
    kwargs = dict(chat_template=FEATURE_TEMPLATE, tools=tools, custom_flag="FLAG")
    text = ours.apply_chat_template(FEATURE_MESSAGES, add_generation_prompt=True, **kwargs)
    expected = theirs.apply_chat_template(FEATURE_MESSAGES, add_generation_prompt=True, tokenize=False, **kwargs)
    assert text == expected
    assert "<b>bold</b>" in text and "ünïcödé" in text and "HAS_TOOL_CALLS" not in text and "after" not in text


def test_template_raise_exception_is_a_clear_error(chatml_dir):
    template = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with a user') }}{% endif %}ok"
    )
    ours = Tokenizer.from_dir(chatml_dir)
    with pytest.raises(InvalidParameterError, match="Conversation must start with a user"):
        ours.apply_chat_template([{"role": "assistant", "content": "x"}], chat_template=template)


def test_template_sandbox_blocks_escapes(chatml_dir):
    ours = Tokenizer.from_dir(chatml_dir)
    for template in ("{{ messages.__class__.__mro__ }}", "{% set ns = namespace(_x=1) %}", "{{ messages.append(1) }}"):
        with pytest.raises(InvalidParameterError):
            ours.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template)


def test_template_errors(chatml_dir, tmp_path):
    ours = Tokenizer.from_dir(chatml_dir)
    with pytest.raises(InvalidParameterError, match="empty"):
        ours.apply_chat_template([])
    with pytest.raises(InvalidParameterError, match=r"messages\[0\] is a str"):
        ours.apply_chat_template(["hello"])  # type: ignore[list-item]
    with pytest.raises(InvalidParameterError, match="JSON data"):
        ours.apply_chat_template([{"role": "user", "content": object()}])
    with pytest.raises(ConfigError, match="not valid Jinja"):
        ours.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")

    files = TokenizerFiles(tokenizer_json=(chatml_dir / "tokenizer.json").read_text())
    with pytest.raises(ConfigError, match="no chat template"):
        Tokenizer.from_files(files).apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_jinja_file_takes_priority(chatml_dir, tmp_path):
    path = tmp_path / "with-jinja"
    path.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_text((chatml_dir / name).read_text())
    (path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    messages = [{"role": "user", "content": "x"}]
    assert Tokenizer.from_dir(path).apply_chat_template(messages) == "[x]"
    assert hf_tokenizer(path).apply_chat_template(messages, tokenize=False) == "[x]"


def test_from_dir_errors(chatml_dir, tmp_path):
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="could not be parsed"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text((chatml_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "two"}')
    with pytest.raises(ConfigError, match="eos_token_id"):
        Tokenizer.from_dir(tmp_path)


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = [detokenizer.add(i) for i in ids]
    return deltas + [detokenizer.finish()]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_detokenizer_concatenates_to_decode(tokenizer_dir, text, skip_special_tokens):
    ours = Tokenizer.from_dir(tokenizer_dir)
    ids = ours.encode(text)
    deltas = stream(ours, ids, skip_special_tokens)
    assert "".join(deltas) == ours.decode(ids, skip_special_tokens=skip_special_tokens)
    for delta in deltas:
        assert "\ufffd" not in delta, f"half a character was emitted: {deltas}"
        delta.encode("utf-8")  # a complete, valid string


def test_incremental_detokenizer_is_exercised_on_split_characters_and_spaces(tokenizer_dir):
    """The texts above really split characters across tokens, and naive per-token decoding is wrong."""
    ours = Tokenizer.from_dir(tokenizer_dir)
    ids = ours.encode(" ".join(TEXTS), add_special_tokens=False)
    assert any("\ufffd" in ours.decode([i]) for i in ids), "no token holds a partial character"
    assert "".join(ours.decode([i]) for i in ids) != ours.decode(ids)
    assert "".join(stream(ours, ids)) == ours.decode(ids)


def test_incremental_detokenizer_flushes_an_unfinished_character(chatml_dir):
    ours = Tokenizer.from_dir(chatml_dir)
    ids = ours.encode("ok 🦀", add_special_tokens=False)
    cut = ids[:-1]  # the crab's last byte is missing
    detokenizer = IncrementalDetokenizer(ours)
    deltas = [detokenizer.add(i) for i in cut]
    assert "".join(deltas) == "ok" or "".join(deltas) == "ok "
    assert "".join(deltas) + detokenizer.finish() == ours.decode(cut)


@pytest.mark.real_model
def test_smollm2_tokenizer_equals_transformers(smollm2_gguf):
    """The real SmolLM2 tokenizer, as quadapt reads it from the GGUF and as transformers does."""
    from transformers import AutoTokenizer

    from quadapt.runtime.checkpoints import open_checkpoint

    ours = Tokenizer.from_files(open_checkpoint(smollm2_gguf).tokenizer_files())
    theirs = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert "".join(stream(ours, ids)) == ours.decode(ids)
    for messages in MESSAGES:
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(messages) == expected
    assert ours.eos_token_ids == {theirs.eos_token_id}
    assert (ours.bos_token_id, ours.vocab_size) == (theirs.bos_token_id, len(theirs))
