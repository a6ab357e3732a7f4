"""The model and loader against transformers on tiny random checkpoints that transformers saved."""

from __future__ import annotations

import pytest
import torch
import transformers

from quadapt.runtime.model.kv_cache import KVCache
from quadapt.runtime.checkpoints.loader import load_model

from .conftest import assert_close, tiny_llama_config

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def save_hf_model(tmp_path, family: str, shard: bool = False, **overrides):
    """Save a random-init transformers model of `family` and return (hf_model, dir)."""
    config_cls, model_cls = FAMILIES[family]
    fields = tiny_llama_config(**overrides)
    for key in ("architectures", "model_type", "torch_dtype"):
        fields.pop(key)
    torch.manual_seed(1)
    model = model_cls(config_cls(**fields)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so loading them wrongly shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.normal_(mean=1.0 if name.endswith("norm.weight") else 0.0, std=0.2)
    out = tmp_path / f"{family}{'-sharded' if shard else ''}"
    model.save_pretrained(out, max_shard_size="40KB" if shard else "10GB")
    return model, out


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
def test_logits_match_transformers(tmp_path, family, shard):
    hf, path = save_hf_model(tmp_path, family, shard=shard)
    if shard:
        assert (path / "model.safetensors.index.json").exists()
    model = load_model(path)
    ids = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        expected = hf(ids).logits
        actual = model(ids)
    assert_close(actual, expected, torch.float32, msg=family)


@pytest.mark.parametrize(
    "overrides",
    [
        {"tie_word_embeddings": True},
        {"attention_bias": True, "mlp_bias": True},
        {"num_key_value_heads": 4},
        {"head_dim": 24},
        {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
        {
            "rope_scaling": {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
            }
        },
    ],
    ids=["tied", "bias", "mha", "head_dim", "rope_linear", "rope_llama3"],
)
def test_llama_variants_match_transformers(tmp_path, overrides):
    hf, path = save_hf_model(tmp_path, "llama", rope_theta=500.0, **overrides)
    model = load_model(path)
    ids = torch.randint(0, 256, (1, 150))  # long enough for the rope scaling to matter
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits, torch.float32)


def test_kv_cache_decoding_equals_full_recomputation(tmp_path):
    _, path = save_hf_model(tmp_path, "llama")
    model = load_model(path)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.allocate(model.config, batch_size=2, max_seq_len=32)
        pieces = [model(ids[:, :10], cache), model(ids[:, 10:11], cache), model(ids[:, 11:17], cache)]
        pieces += [model(ids[:, t : t + 1], cache) for t in range(17, 24)]
    assert cache.seq_len == 24
    assert_close(torch.cat(pieces, dim=1), full, torch.float32)


def test_logits_to_keep(tmp_path):
    _, path = save_hf_model(tmp_path, "qwen2")
    model = load_model(path)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert_close(model(ids, logits_to_keep=1), model(ids)[:, -1:], torch.float32)


def test_bf16_load(tmp_path):
    hf, path = save_hf_model(tmp_path, "llama")
    model = load_model(path, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert_close(model(ids).float(), hf.to(torch.bfloat16)(ids).logits.float(), torch.bfloat16)
