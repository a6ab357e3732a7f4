"""Bad checkpoints and configs get a clear error that names the problem, never a deep traceback."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from quadapt.runtime.model.config import ModelConfig
from quadapt.runtime.errors import CheckpointError, ConfigError, UnsupportedError
from quadapt.runtime.checkpoints.loader import load_model

from .conftest import tiny_llama_config
from .test_model import save_hf_model


def test_dir_without_config_json(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_missing_path():
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model("/nonexistent/model")


def test_pickle_only_dir_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle files, which quadapt never loads"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "architecture",
    ["GPT2LMHeadModel", "MixtralForCausalLM", "Gemma2ForCausalLM"],
)
def test_unsupported_architecture(architecture):
    with pytest.raises(UnsupportedError, match=architecture):
        ModelConfig.from_dict(tiny_llama_config(architectures=[architecture], model_type="other"))


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"hidden_act": "gelu"}, UnsupportedError, "hidden_act 'gelu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, UnsupportedError, "'yarn'"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, UnsupportedError, "'dynamic'"),
        ({"num_key_value_heads": 3}, ConfigError, "multiple of num_key_value_heads"),
        ({"hidden_size": 0}, ConfigError, "positive integer"),
        ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 64}, UnsupportedError, "sliding"),
    ],
)
def test_unrunnable_configs(overrides, error, match):
    with pytest.raises(error, match=match):
        ModelConfig.from_dict(tiny_llama_config(**overrides))


def test_missing_required_field():
    config = tiny_llama_config()
    del config["hidden_size"]
    with pytest.raises(ConfigError, match="'hidden_size'"):
        ModelConfig.from_dict(config)


def test_mistral_sliding_window_caps_the_context():
    config = ModelConfig.from_dict(
        tiny_llama_config(architectures=["MistralForCausalLM"], max_position_embeddings=4096, sliding_window=128)
    )
    assert config.max_position_embeddings == 128


def test_truncated_safetensors(tmp_path):
    _, path = save_hf_model(tmp_path, "llama")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)


def test_corrupt_safetensors_header(tmp_path):
    _, path = save_hf_model(tmp_path, "llama")
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(path)


def test_missing_tensors_are_listed(tmp_path):
    _, path = save_hf_model(tmp_path, "llama")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    del weights["model.norm.weight"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert "Missing 2 tensor(s)" in message
    assert "model.layers.1.mlp.down_proj.weight" in message and "model.norm.weight" in message


def test_unexpected_tensors_are_listed(tmp_path):
    _, path = save_hf_model(tmp_path, "llama")
    weights = load_file(path / "model.safetensors")
    weights["model.layers.7.self_attn.q_proj.weight"] = torch.zeros(64, 64)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"Unexpected 1 tensor\(s\): model.layers.7.self_attn.q_proj.weight"):
        load_model(path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    _, path = save_hf_model(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"down_proj.weight' has shape \(64, 112\).*\(64, 96\)"):
        load_model(path)


def test_index_pointing_at_missing_shard(tmp_path):
    _, path = save_hf_model(tmp_path, "llama", shard=True)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*missing"):
        load_model(path)


def test_the_reader_returns_what_safetensors_returns(tmp_path):
    """`SafetensorsFile` reads without a memory map; every dtype and shape must come back bit for bit."""
    from quadapt.runtime.checkpoints.hf import SafetensorsFile

    tensors = {
        "f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2, 3).half(),
        "f64": torch.randn(4, dtype=torch.float64), "i64": torch.arange(6).view(2, 3), "i32": torch.arange(-3, 3).int(),
        "i8": torch.arange(-4, 4).to(torch.int8), "u8": torch.arange(9).to(torch.uint8), "bool": torch.tensor([True, False]),
        "f8": torch.randn(5).to(torch.float8_e4m3fn), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
    }
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    file = SafetensorsFile(tmp_path / "t.safetensors")
    expected = load_file(tmp_path / "t.safetensors")
    assert sorted(file.entries) == sorted(expected)
    for name, tensor in expected.items():
        got = file.read(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_the_reader_refuses_a_file_cut_short_after_opening(tmp_path):
    from quadapt.runtime.checkpoints.hf import SafetensorsFile

    save_file({"w": torch.randn(64, 64)}, tmp_path / "t.safetensors")
    file = SafetensorsFile(tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="ends inside 'w'; the file is truncated"):
        file.read("w")


def test_a_group_size_that_does_not_divide_a_layer_is_a_clear_error(tmp_path):
    """A checkpoint whose stated group size does not divide a linear's input size is refused by
    name before any module is built (it used to reach an assert in PackedIntLinear)."""
    from quadapt.converters.convert import convert_checkpoint

    _, source = save_hf_model(tmp_path, "llama", intermediate_size=128)
    converted = convert_checkpoint(source, tmp_path / "int4", "int4", group_size=32)
    config = json.loads((converted / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 48  # 64 % 48 != 0
    (converted / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match="64 input features, not a multiple of group_size 48"):
        load_model(converted)


def test_packed_linear_refuses_a_non_dividing_group_size():
    from quadapt.runtime.model.quant import PackedIntLinear

    with pytest.raises(ValueError, match="group_size 48 does not divide in_features 64"):
        PackedIntLinear(64, 32, num_bits=4, group_size=48, symmetric=True, bias=False)


def test_the_kernel_backend_is_resolved_once_at_load(tmp_path, monkeypatch):
    from quadapt.converters.convert import convert_checkpoint

    _, source = save_hf_model(tmp_path, "llama", intermediate_size=128)
    converted = convert_checkpoint(source, tmp_path / "int8", "int8")
    monkeypatch.setenv("QUADAPT_KERNELS", "fast")
    with pytest.raises(UnsupportedError, match="QUADAPT_KERNELS='fast' is not a kernel backend"):
        load_model(converted)  # refused at load, before any weight is read
    monkeypatch.setenv("QUADAPT_KERNELS", "reference")
    model = load_model(converted)
    monkeypatch.setenv("QUADAPT_KERNELS", "fast")  # read no more: the modules keep what load resolved
    assert model.model.layers[0].mlp.gate_up_proj.kernel_backend == "reference"
    model(torch.tensor([[1, 2, 3]]))
