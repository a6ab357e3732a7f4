"""GGUF rope scaling: what a GGUF states is refused at open exactly when `ModelConfig` would refuse it.

llama.cpp writes `rope.scaling.type` as none, linear, yarn or longrope, and Llama 3's scaling as a
`rope_freqs` tensor. quadapt's model runs default, linear and llama3; a yarn or longrope file must
fail when it is opened, with the kind of message a config.json with that scaling gets, not open
cleanly and fail later (or be copied into a converted checkpoint's config.json).
"""

from __future__ import annotations

import re

import pytest

from quadapt.runtime.checkpoints import open_checkpoint
from quadapt.runtime.checkpoints.gguf import GGUFCheckpoint
from quadapt.runtime.model.config import ModelConfig
from quadapt.runtime.errors import UnsupportedError

from .conftest import tiny_llama_config
from .test_gguf import llama_cpp_rope_factors, random_model, vocab_config, write_gguf

gguf = pytest.importorskip("gguf")
STRING, FLOAT32, UINT32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.UINT32
SUPPORTED = "supported: default, linear, llama3"

YARN = {
    "llama.rope.scaling.type": ("yarn", STRING),
    "llama.rope.scaling.factor": (4.0, FLOAT32),
    "llama.rope.scaling.original_context_length": (64, UINT32),
    "llama.rope.scaling.yarn_beta_fast": (32.0, FLOAT32),
}


@pytest.fixture(scope="module")
def llama_state() -> tuple[dict, dict]:
    config = vocab_config(intermediate_size=128)
    return config, random_model(config)


def test_yarn_is_refused_at_open(tmp_path, llama_state):
    path = write_gguf(tmp_path / "yarn.gguf", *llama_state, extra=YARN)
    for opener in (GGUFCheckpoint, open_checkpoint):
        with pytest.raises(UnsupportedError, match=re.escape("rope scaling type 'yarn'")) as error:
            opener(path)
        assert SUPPORTED in str(error.value)
        assert str(path) in str(error.value)


def test_the_message_is_config_json_s(tmp_path, llama_state):
    """The same refusal, in the same words, as `ModelConfig` gives a config.json with yarn scaling."""
    hf = tiny_llama_config(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    with pytest.raises(UnsupportedError) as from_config:
        ModelConfig.from_dict(hf)
    with pytest.raises(UnsupportedError) as from_gguf:
        GGUFCheckpoint(write_gguf(tmp_path / "yarn.gguf", *llama_state, extra=YARN))
    for message in (str(from_config.value), str(from_gguf.value)):
        assert "rope scaling type 'yarn'" in message and "is not supported" in message and SUPPORTED in message


def test_longrope_is_refused_at_open(tmp_path, llama_state):
    extra = {"llama.rope.scaling.type": ("longrope", STRING), "llama.rope.scaling.factor": (4.0, FLOAT32)}
    with pytest.raises(UnsupportedError, match=re.escape("rope scaling type 'longrope'")):
        GGUFCheckpoint(write_gguf(tmp_path / "longrope.gguf", *llama_state, extra=extra))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, None),
        ({"llama.rope.scaling.type": ("none", STRING)}, None),
        ({"llama.rope.scaling.type": ("linear", STRING), "llama.rope.scaling.factor": (4.0, FLOAT32)},
         {"rope_type": "linear", "factor": 4.0}),
        ({"llama.rope.scale_linear": (2.0, FLOAT32)}, {"rope_type": "linear", "factor": 2.0}),
    ],
    ids=["absent", "none", "linear", "scale_linear"],
)
def test_supported_scalings_open_and_load_as_config(tmp_path, llama_state, extra, expected):
    """Negative control: what the model runs still opens, and its config is one ModelConfig accepts."""
    config_dict = GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", *llama_state, extra=extra)).config_dict()
    assert config_dict.get("rope_scaling") == expected
    scaling = ModelConfig.from_dict(config_dict).rope_scaling
    assert scaling.rope_type == (expected or {"rope_type": "default"})["rope_type"]


def test_stated_scaling_beside_rope_freqs_is_refused_at_open(tmp_path, llama_state):
    config, state = llama_state
    dims = config["hidden_size"] // config["num_attention_heads"]
    factors = llama_cpp_rope_factors(config["rope_theta"], dims, factor=8.0, low=1.0, high=4.0, context=64)
    extra = {"llama.rope.scaling.type": ("linear", STRING), "llama.rope.scaling.factor": (4.0, FLOAT32)}
    path = write_gguf(tmp_path / "m.gguf", config, state, extra=extra, tensors={"rope_freqs.weight": factors})
    with pytest.raises(UnsupportedError, match="states rope scaling 'linear' and also carries rope_freqs"):
        GGUFCheckpoint(path)
    # Negative control: the same factors alone are Llama 3's scaling.
    alone = write_gguf(tmp_path / "alone.gguf", config, state, tensors={"rope_freqs.weight": factors})
    assert GGUFCheckpoint(alone).config_dict()["rope_scaling"]["rope_type"] == "llama3"
