"""Quantizing a loaded float model in memory (`converters.in_memory`) against `quadapt convert`: for
the same float weights and options, the model holds the same modules and the same packed tensors,
bit for bit, as loading the converted checkpoint; the options are checked by convert's rules
before any linear changes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from quadapt.converters.convert import convert_checkpoint
from quadapt.converters.in_memory import quantize_model
from quadapt.runtime.errors import CheckpointError, InvalidParameterError, UnsupportedError
from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.model.fused import checkpoint_module
from quadapt.runtime.model.quant import NF4Linear, PackedIntLinear

from .test_model import save_hf_model

pytestmark = pytest.mark.usefixtures("one_thread")

LINEARS = [
    f"model.layers.{i}.{member}" for i in range(2)
    for member in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Llama with input sizes 64 and 128, which every int4 group size divides, and an untied head."""
    _, path = save_hf_model(tmp_path_factory.mktemp("in-memory"), "llama", intermediate_size=128)
    return path


def assert_same_model(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    """The same module types and descriptions by name, and the same tensors, dtypes included, bit for bit."""
    types = {name: (type(m).__name__, m.extra_repr()) for name, m in actual.named_modules()}
    assert types == {name: (type(m).__name__, m.extra_repr()) for name, m in expected.named_modules()}
    state, reference = actual.state_dict(), expected.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


CASES = {
    "int4": ("int4", {}),
    "int4-group-32": ("int4", {"group_size": 32}),
    "int4-asym-mse": ("int4-asym", {"calibration": "mse"}),
    "int8-head": ("int8", {"lm_head": "int8"}),
    "int8-mse": ("int8", {"calibration": "mse"}),
    "nf4": ("nf4", {}),
    "int4-keep": ("int4", {"keep": ["down_proj", "model.layers.0.self_attn.q_proj"]}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_memory_equals_the_converted_checkpoint(source, tmp_path, case):
    scheme, options = CASES[case]
    converted = load_model(convert_checkpoint(source, tmp_path / case, scheme, **options))
    model = load_model(source)
    before = {name: checkpoint_module(model, name).weight.detach().clone() for name in [*LINEARS, "lm_head"]}
    floats = quantize_model(model, scheme=scheme, **options)
    assert_same_model(model, converted)
    kept = [name for name in LINEARS if any(name.endswith(k) or name.startswith(k) for k in options.get("keep", ()))]
    head = ["lm_head"] if options.get("lm_head") == "int8" else []
    assert list(floats) == [name for name in LINEARS if name not in kept] + head
    for name, weight in floats.items():  # the float weights it replaced, for LoftQ's start
        assert torch.equal(weight, before[name]), name
    assert all(isinstance(checkpoint_module(model, name), torch.nn.Linear) for name in kept)
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids), converted(ids))


@pytest.mark.parametrize("scheme", ["int4-asym", "nf4"])
def test_a_bfloat16_model_keeps_bfloat16_scales_as_convert_does(source, tmp_path, scheme):
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    for file in source.iterdir():
        (bf16 / file.name).write_bytes(file.read_bytes())
    state = {k: v.bfloat16() for k, v in load_file(source / "model.safetensors").items()}
    save_file(state, bf16 / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    (bf16 / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}))
    converted = load_model(convert_checkpoint(bf16, tmp_path / scheme, scheme), dtype=torch.bfloat16)
    model = load_model(bf16, dtype=torch.bfloat16)
    quantize_model(model, scheme=scheme)
    assert_same_model(model, converted)
    module = checkpoint_module(model, "model.layers.0.mlp.gate_proj")
    assert (module.weight_scale if scheme == "int4-asym" else module.dequantize()).dtype == torch.bfloat16


def test_linear_biases_are_kept_float(tmp_path):
    """Qwen2's q/k/v carry biases: the quantized modules keep them, as the loader does."""
    _, path = save_hf_model(tmp_path, "qwen2", intermediate_size=128)
    converted = load_model(convert_checkpoint(path, tmp_path / "int4", "int4"))
    model = load_model(path)
    quantize_model(model, scheme="int4")
    assert_same_model(model, converted)
    q_proj = checkpoint_module(model, "model.layers.0.self_attn.q_proj")
    assert isinstance(q_proj, PackedIntLinear) and q_proj.bias is not None and not q_proj.bias.requires_grad


def unchanged(model: torch.nn.Module) -> bool:
    return not any(isinstance(m, (PackedIntLinear, NF4Linear)) for m in model.modules())


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"scheme": "int4", "calibration": "gptq"}, InvalidParameterError, "quadapt convert --calibration gptq"),
        ({"scheme": "nf4", "calibration": "mse"}, InvalidParameterError, "does not apply to nf4"),
        ({"scheme": "int5"}, InvalidParameterError, "unknown scheme 'int5'"),
        ({"scheme": "int4", "group_size": 48}, InvalidParameterError, "--group-size 48 is not allowed"),
        ({"scheme": "int8", "group_size": 64}, InvalidParameterError, "int8 is per output channel"),
        ({"scheme": "int4", "keep": ["nothing"]}, InvalidParameterError, "matches no linear module"),
        ({"scheme": "nf4", "lm_head": "int8"}, InvalidParameterError, "cannot be written with nf4"),
    ],
)
def test_options_convert_refuses_are_refused_before_any_change(source, options, error, message):
    model = load_model(source)
    with pytest.raises(error, match=message):
        quantize_model(model, **options)
    assert unchanged(model)


def test_the_group_size_default_is_converts(tmp_path):
    """Input sizes 128 and 256: 128, the largest that divides both; 112 (the tiny default) fits none."""
    _, wide = save_hf_model(tmp_path, "llama", hidden_size=128, intermediate_size=256)
    model = load_model(wide)
    quantize_model(model, scheme="int4")
    assert {m.group_size for m in model.modules() if isinstance(m, PackedIntLinear)} == {128}
    _, odd = save_hf_model(tmp_path / "odd", "llama")
    model = load_model(odd)
    with pytest.raises(InvalidParameterError, match=r"no int4 group size \(128, 64, 32\) divides every linear input size \[64, 112\]"):
        quantize_model(model, scheme="int4")
    assert unchanged(model)
    quantize_model(model, scheme="nf4")  # blocks of 64 over the flattened weight: any shape
    assert all(isinstance(checkpoint_module(model, name), NF4Linear) for name in LINEARS)


def test_a_quantized_model_and_a_nan_weight_are_refused(source, tmp_path):
    quantized = load_model(convert_checkpoint(source, tmp_path / "int4", "int4"))
    with pytest.raises(UnsupportedError, match="already quantized"):
        quantize_model(quantized, scheme="int4")
    model = load_model(source)
    with torch.no_grad():
        checkpoint_module(model, "model.layers.1.mlp.up_proj").weight[3, 5] = float("nan")
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight' in the in-memory model holds 1 NaN"):
        quantize_model(model, scheme="nf4")
    assert unchanged(model)  # checked before the first linear changed
