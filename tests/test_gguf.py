"""GGUFCheckpoint: dequantization, names and the Q/K unpermute, config, tokenizer, and its errors.

Tiny GGUFs are written here with `gguf.GGUFWriter` from a random transformers model, the way
llama.cpp's convert_hf_to_gguf.py lays them out (permuted Q/K rows, F32 norms, no output.weight when
tied), and read back. transformers' own GGUF loader is the reference for names, layout and tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from quadapt.runtime.checkpoints import open_checkpoint
from quadapt.runtime.checkpoints.gguf import GGUFCheckpoint
from quadapt.runtime.errors import CheckpointError, UnsupportedError

from .conftest import assert_close, tiny_llama_config

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# HF -> GGUF names, written out independently of the module's table so a slip there shows here.
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
SAMPLES = [
    "Hello world",
    " Hello  world ",
    "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n",
    "the 12345 numbers 3.14 and 1,000",
    "héllo wörld – 日本語 🤗",
    "def f(x):\n\treturn x**2  # square\n",
    "<think>hmm</think> the end<|endoftext|>",
    "",
]


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute`, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_level_vocab() -> dict:
    """A tiny GPT-2 style vocabulary: control tokens, the 256 byte characters, some merges, a user token."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    merges = [
        "Ġ t",
        "h e",
        "Ġt he",
        "Ġ w",
        "o r",
        "l d",
        "Ġw or",
        "Ġwor ld",
        "H e",
        "l l",
        "He ll",
        "Hell o",
        "1 2",
        "Ġ 1",
        "i n",
        "Ġ a",
        "e r",
        "Ã ©",
        "Ġ Ġ",
        "Ċ Ċ",
    ]
    merged = [m.replace(" ", "") for m in merges]
    tokens = SPECIALS + alphabet + merged + ["<think>", "</think>"]
    types = [3] * len(SPECIALS) + [1] * (len(alphabet) + len(merged)) + [4, 4]
    return {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges, "bos": 1, "eos": 2, "pad": 2, "unk": 0}


def sentencepiece_vocab() -> dict:
    """A tiny llama SentencePiece vocabulary: unk/bos/eos, 256 byte tokens, pieces scored best-first."""
    pieces = [
        "▁",
        "e",
        "t",
        "h",
        "l",
        "o",
        "w",
        "r",
        "d",
        "H",
        "1",
        "2",
        "a",
        "n",
        "i",
        "s",
        "▁t",
        "he",
        "▁the",
        "ll",
        "llo",
        "He",
        "Hello",
        "▁w",
        "or",
        "ld",
        "▁wor",
        "▁world",
        "in",
        "▁a",
        "12",
    ]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores, "bos": 1, "eos": 2, "unk": 0}


def random_model(config: dict) -> dict[str, torch.Tensor]:
    """A transformers model for `config` with every weight random (norms around one), as a state dict."""
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if "norm" in name else 0.5 * torch.randn_like(param))
    return {name: t.clone() for name, t in model.state_dict().items()}


def gguf_name(hf_name: str) -> str:
    module, suffix = hf_name.rsplit(".", 1)
    if module in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[module]}.{suffix}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}.{suffix}"


def encode(w: np.ndarray, qtype) -> tuple[np.ndarray, object]:
    """The array and raw type GGUFWriter gets for `w` stored as `qtype`; 1-D tensors stay F32, as in llama.cpp."""
    if w.ndim == 1 or qtype == Q.F32:
        return w.astype(np.float32), None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    return gguf.quants.quantize(w, qtype), qtype


def write_gguf(
    path: Path,
    config: dict,
    state: dict[str, torch.Tensor],
    qtype=Q.F32,
    *,
    vocab: dict | bool = True,
    pre: str = "smollm",
    extra: dict | None = None,
    raw: dict | None = None,
    tensors: dict | None = None,
) -> Path:
    """Write `state` (HF names) as a llama.cpp-style GGUF of `config`'s architecture.

    `vocab` is a vocabulary dict, True for `byte_level_vocab()`, or False for no tokenizer metadata.
    `extra` adds metadata `{key: (value, GGUFValueType)}`; `raw` maps a GGUF tensor name to
    `(uint8 blocks, ggml type)` stored verbatim; `tensors` adds F32 GGUF tensors before the model's.
    """
    arch = config["model_type"]
    writer = gguf.GGUFWriter(str(path), arch)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_rope_dimension_count(config["hidden_size"] // n_head)
    writer.add_vocab_size(config["vocab_size"])
    if vocab:
        write_vocab(writer, byte_level_vocab() if vocab is True else vocab, pre)
    for key, (value, kind) in (extra or {}).items():
        writer.add_key_value(key, value, kind)
    for name, values in (tensors or {}).items():
        writer.add_tensor(name, values)
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config["tie_word_embeddings"]:
            continue  # llama.cpp writes no output.weight for a tied head
        name = gguf_name(hf_name)
        w = tensor.numpy()
        if arch == "llama" and ".attn_q." in name:
            w = llama_cpp_permute(w, n_head, n_head)
        elif arch == "llama" and ".attn_k." in name:
            w = llama_cpp_permute(w, n_head, n_kv)
        if name in (raw or {}):
            data, raw_type = raw[name]
            writer.add_tensor(name, data, raw_dtype=raw_type)
            continue
        data, raw_type = encode(np.ascontiguousarray(w), qtype)
        writer.add_tensor(name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_vocab(writer, vocab: dict, pre: str) -> None:
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    writer.add_unk_token_id(vocab["unk"])
    if "pad" in vocab:
        writer.add_pad_token_id(vocab["pad"])
    writer.add_chat_template(CHAT_TEMPLATE)


def read_all(path: Path) -> dict[str, torch.Tensor]:
    return dict(GGUFCheckpoint(path).tensors())


def sqnr_db(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(10 * torch.log10(expected.pow(2).sum() / (actual - expected).pow(2).sum().clamp_min(1e-30)))


def vocab_config(**overrides) -> dict:
    return tiny_llama_config(vocab_size=len(byte_level_vocab()["tokens"]), **overrides)


@pytest.fixture(scope="module")
def llama_state() -> tuple[dict, dict]:
    # intermediate 128 so every row fills 32-element quant blocks
    config = vocab_config(intermediate_size=128)
    return config, random_model(config)


# ---- tensors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda q: q.name)
def test_float_types_read_back_exactly(tmp_path, llama_state, qtype):
    config, state = llama_state
    got = read_all(write_gguf(tmp_path / "m.gguf", config, state, qtype))
    assert list(got) == [k for k in state if k in got] and set(got) == set(state)
    rounding = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[qtype]
    for name, expected in state.items():
        want = expected if expected.dim() == 1 else expected.to(rounding).float()
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], want), name


@pytest.mark.parametrize(
    ("qtype", "min_db"), [(Q.Q8_0, 38.0), (Q.Q4_0, 17.0), (Q.Q4_1, 17.0)], ids=["Q8_0", "Q4_0", "Q4_1"]
)
def test_quantized_types_within_sqnr(tmp_path, llama_state, qtype, min_db):
    # A wrong name or a wrong Q/K unpermute would pair unrelated weights: SQNR near -3 dB, not this.
    config, state = llama_state
    got = read_all(write_gguf(tmp_path / "m.gguf", config, state, qtype))
    assert set(got) == set(state)
    for name, expected in state.items():
        assert got[name].shape == expected.shape, name
        assert sqnr_db(got[name], expected) >= min_db, f"{name}: {sqnr_db(got[name], expected):.1f} dB"


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quants_match_transformers_dequantizer(tmp_path, qtype):
    """gguf cannot quantize K types, so store random valid blocks and check against transformers' torch dequantizer."""
    from transformers.integrations.gguf.dequant import dequantize as reference_dequantize

    # hidden 256: a K-quant block spans 256 elements
    config = tiny_llama_config(
        hidden_size=256, intermediate_size=256, num_hidden_layers=1, vocab_size=len(byte_level_vocab()["tokens"])
    )
    state = random_model(config)
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    # f16 scales sit at these byte offsets in each block; random bytes there could be inf or NaN
    scale_offsets = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    rng = np.random.default_rng(0)
    raw, quantized = {}, ("attn_q", "attn_k", "ffn_down", "token_embd")
    for hf_name, tensor in state.items():
        name = gguf_name(hf_name)
        if tensor.dim() == 2 and any(f"{q}." in name for q in quantized):
            rows, cols = tensor.shape
            blocks = rng.integers(0, 256, size=(rows * cols // block, block_bytes), dtype=np.uint8)
            for offset in scale_offsets:
                scales = rng.uniform(1e-3, 1e-2, size=blocks.shape[0]).astype(np.float16)
                blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
            raw[name] = (blocks.reshape(rows, cols // block * block_bytes), qtype)
    got = read_all(write_gguf(tmp_path / "m.gguf", config, state, Q.F32, raw=raw))

    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    for hf_name in state:
        name = gguf_name(hf_name)
        if name not in raw:
            continue
        rows = state[hf_name].shape[0]
        stored = reference_dequantize(torch.from_numpy(raw[name][0]), int(qtype)).reshape(rows, -1)
        if ".attn_q." in name or ".attn_k." in name:
            # the file row r holds HF row order[r]; invert by scattering, without the module's code
            order = llama_cpp_permute(np.arange(rows), n_head, n_head if ".attn_q." in name else n_kv)
            expected = torch.empty_like(stored)
            expected[torch.from_numpy(order)] = stored
        else:
            expected = stored
        assert_close(got[hf_name], expected, torch.float32, msg=hf_name)


def test_tensors_match_transformers_gguf_loader(tmp_path, llama_state):
    import transformers

    config, state = llama_state
    path = write_gguf(tmp_path / "m.gguf", config, state, Q.Q8_0)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).state_dict()
    got = read_all(path)
    assert set(got) == set(reference)
    for name, tensor in got.items():
        assert torch.equal(tensor, reference[name]), name


def test_tied_embeddings_have_no_lm_head(tmp_path):
    config = vocab_config(tie_word_embeddings=True)
    checkpoint = GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", config, random_model(config)))
    assert checkpoint.config_dict()["tie_word_embeddings"] is True
    assert "lm_head.weight" not in checkpoint.keys()
    assert list(dict(checkpoint.tensors())) == checkpoint.keys()


def test_qwen2_reads_biases_without_unpermuting(tmp_path):
    import transformers

    config = vocab_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    state = random_model(config)
    assert "model.layers.0.self_attn.q_proj.bias" in state
    path = write_gguf(tmp_path / "q.gguf", config, state)
    checkpoint = GGUFCheckpoint(path)
    got = dict(checkpoint.tensors())
    assert set(got) == set(state)
    for name, tensor in state.items():
        assert torch.equal(got[name], tensor), name
    assert checkpoint.config_dict()["architectures"] == ["Qwen2ForCausalLM"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).state_dict()
    for name, tensor in got.items():
        assert torch.equal(tensor, reference[name]), name


# ---- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_config_dict_matches_the_written_config(tmp_path, tied):
    config = vocab_config(tie_word_embeddings=tied)
    got = GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", config, random_model(config))).config_dict()
    expected = dict(config, head_dim=config["hidden_size"] // config["num_attention_heads"], pad_token_id=2)
    assert got == expected


def test_config_dict_agrees_with_transformers(tmp_path):
    import transformers

    config = vocab_config()
    path = write_gguf(tmp_path / "m.gguf", config, random_model(config))
    reference = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    ours = transformers.AutoConfig.for_model(**GGUFCheckpoint(path).config_dict())
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "rope_parameters",
    ):
        assert getattr(ours, key) == getattr(reference, key), key
    assert ours.rms_norm_eps == pytest.approx(reference.rms_norm_eps, rel=1e-6)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
        ({"rope.scaling.type": "none"}, None),
    ],
)
def test_rope_scaling_maps_to_hf(tmp_path, llama_state, metadata, expected):
    config, state = llama_state
    kinds = {str: gguf.GGUFValueType.STRING, float: gguf.GGUFValueType.FLOAT32, int: gguf.GGUFValueType.UINT32}
    extra = {f"llama.{key}": (value, kinds[type(value)]) for key, value in metadata.items()}
    got = GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", config, state, extra=extra)).config_dict()
    assert got.get("rope_scaling") == expected


def test_unsupported_rope_scaling_is_named(tmp_path, llama_state):
    config, state = llama_state
    extra = {"llama.rope.scaling.type": ("longrope", gguf.GGUFValueType.STRING)}
    with pytest.raises(UnsupportedError, match="'longrope'"):  # refused at open, before any weight is read
        GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", config, state, extra=extra))


# ---- tokenizer -----------------------------------------------------------------------------------


def assert_same_tokenizer(ours_json: str, reference, texts: list[str]) -> None:
    from tokenizers import Tokenizer

    ours = Tokenizer.from_str(ours_json)
    for text in texts:
        expected = reference(text).input_ids
        got = ours.encode(text).ids
        assert got == expected, f"{text!r}: {got} != {expected}"
        assert ours.decode(got, skip_special_tokens=False) == reference.decode(expected), text


@pytest.mark.parametrize(("vocab", "pre"), [("gpt2", "smollm"), ("gpt2", "llama-bpe"), ("llama", "default")])
def test_tokenizer_matches_transformers(tmp_path, vocab, pre):
    import transformers

    vocab = byte_level_vocab() if vocab == "gpt2" else sentencepiece_vocab()
    config = tiny_llama_config(vocab_size=len(vocab["tokens"]))
    path = write_gguf(tmp_path / "m.gguf", config, random_model(config), vocab=vocab, pre=pre)
    files = GGUFCheckpoint(path).tokenizer_files()
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = SAMPLES + [
        "<s> Hello</s>",
        "Hello<s>world</s>again",
        "Hello<|im_start|>world",
        "  leading spaces",
        "tab\tand\nnewline",
    ]
    assert_same_tokenizer(files.tokenizer_json, reference, texts)
    assert (
        json.loads(files.tokenizer_json)["added_tokens"]
        == json.loads(reference.backend_tokenizer.to_str())["added_tokens"]
    )
    assert files.tokenizer_config["chat_template"] == CHAT_TEMPLATE
    assert files.tokenizer_config["add_bos_token"] is (vocab["model"] == "llama")
    assert files.tokenizer_config["bos_token"] == vocab["tokens"][vocab["bos"]] == reference.bos_token
    assert files.generation_config["eos_token_id"] == vocab["eos"]


def test_no_tokenizer_metadata_means_none(tmp_path, llama_state):
    config, state = llama_state
    checkpoint = GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", config, state, vocab=False))
    assert checkpoint.tokenizer_files() is None
    assert checkpoint.config_dict()["vocab_size"] == config["vocab_size"]


# ---- errors --------------------------------------------------------------------------------------


def test_unsupported_tensor_type_names_the_tensor(tmp_path, llama_state):
    config, state = llama_state
    weight = state["model.layers.1.mlp.up_proj.weight"].numpy()
    raw = {"blk.1.ffn_up.weight": (gguf.quants.quantize(weight, Q.Q5_0), Q.Q5_0)}
    path = write_gguf(tmp_path / "m.gguf", config, state, raw=raw)
    with pytest.raises(UnsupportedError, match=r"blk\.1\.ffn_up\.weight.*Q5_0.*Q8_0"):
        GGUFCheckpoint(path)


def test_unsupported_architecture_is_named(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedError, match="'gpt2'"):
        GGUFCheckpoint(tmp_path / "g.gguf")


def test_unknown_tensor_is_reported(tmp_path, llama_state):
    config, state = llama_state
    state = dict(state)
    state["model.layers.0.mlp.gate_proj.bias"] = torch.zeros(config["intermediate_size"])
    with pytest.raises(UnsupportedError, match=r"blk\.0\.ffn_gate\.bias"):
        GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", config, state))


def llama_cpp_rope_factors(theta: float, dims: int, factor: float, low: float, high: float, context: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `rope_freqs` for an HF `llama3` rope_scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, dims, 2, dtype=np.float32) / dims))
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < context / high:
            factors.append(1)
        elif wavelen > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_rope_freqs_of_ones_are_plain_rope(tmp_path, llama_state):
    config, state = llama_state
    path = write_gguf(tmp_path / "m.gguf", config, state, tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    checkpoint = GGUFCheckpoint(path)
    assert set(checkpoint.keys()) == set(state) and "rope_scaling" not in checkpoint.config_dict()


def test_rope_freqs_become_llama3_rope_scaling(tmp_path, llama_state):
    # llama.cpp bakes Llama 3.1's rope scaling into per-dimension factors; transformers drops them.
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config, state = llama_state
    theta, dims = config["rope_theta"], config["hidden_size"] // config["num_attention_heads"]
    factors = llama_cpp_rope_factors(theta, dims, factor=8.0, low=1.0, high=4.0, context=64)
    path = write_gguf(tmp_path / "m.gguf", config, state, tensors={"rope_freqs.weight": factors})
    got = GGUFCheckpoint(path).config_dict()
    assert got["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    # transformers' llama3 frequencies from that config are llama.cpp's divided by the factors
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](transformers.LlamaConfig(**got), "cpu")
    plain = 1.0 / (theta ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims))
    assert_close(inv_freq, plain / torch.from_numpy(factors))


def test_rope_freqs_of_another_kind_are_refused(tmp_path, llama_state):
    config, state = llama_state
    factors = np.linspace(1, 8, 8, dtype=np.float32)
    path = write_gguf(tmp_path / "m.gguf", config, state, tensors={"rope_freqs.weight": factors})
    with pytest.raises(UnsupportedError, match="rope_freqs"):
        GGUFCheckpoint(path)


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        GGUFCheckpoint(tmp_path / "nope.gguf")


def test_non_gguf_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 4)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        GGUFCheckpoint(path)


@pytest.mark.parametrize("keep", [0.5, 0.995, 20])
def test_truncated_gguf_is_a_checkpoint_error(tmp_path, llama_state, keep):
    config, state = llama_state
    path = write_gguf(tmp_path / "m.gguf", config, state, Q.Q8_0)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(CheckpointError, match="truncated"):
        GGUFCheckpoint(path)


def test_open_checkpoint_picks_the_gguf_reader(tmp_path, llama_state):
    config, state = llama_state
    assert isinstance(open_checkpoint(write_gguf(tmp_path / "m.gguf", config, state)), GGUFCheckpoint)


# ---- the real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return model, tokenizer


@pytest.mark.real_model
def test_real_model_tensors_match_transformers(smollm2_gguf, smollm2_reference):
    reference = smollm2_reference[0].state_dict()
    checkpoint = GGUFCheckpoint(smollm2_gguf)
    assert checkpoint.config_dict()["tie_word_embeddings"] is True
    assert set(checkpoint.keys()) == set(reference) - {"lm_head.weight"}
    for name, tensor in checkpoint.tensors():
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.real_model
def test_real_model_tokenizer_matches_transformers(smollm2_gguf, smollm2_reference):
    reference = smollm2_reference[1]
    files = GGUFCheckpoint(smollm2_gguf).tokenizer_files()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12*7? Answer in 日本語."},
    ]
    chat = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    texts = SAMPLES + [
        chat,
        "x = [i**2 for i in range(10)]  # squares",
        "Ünïcödé façade naïve café — «quotes»",
        "   \n\n\t  ",
    ]
    assert_same_tokenizer(files.tokenizer_json, reference, texts)
    assert json.loads(files.tokenizer_json) == json.loads(reference.backend_tokenizer.to_str())
    assert files.tokenizer_config["chat_template"] == reference.chat_template
    assert (files.tokenizer_config["bos_token"], files.tokenizer_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert files.tokenizer_config["add_bos_token"] is False
