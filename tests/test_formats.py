"""Our quantized checkpoints against the libraries that define the formats.

compressed-tensors decompresses our int4/int8 output to exactly the weights our runtime
dequantizes; transformers loads it (and our NF4 output, with bitsandbytes) and generates the same
greedy tokens as quadapt; our NF4 tensors are bitsandbytes' own, byte for byte. The loader is
strict about keys, shapes and configs it cannot run.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from quadapt.converters.convert import convert_checkpoint
from quadapt.runtime.errors import CheckpointError, InvalidParameterError, UnsupportedError
from quadapt.runtime.api.generate import generate_ids
from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.model.fused import checkpoint_module, checkpoint_modules
from quadapt.runtime.model.quant import NF4Linear, PackedIntLinear
from quadapt.runtime.engine.sampling import SamplingParams

from .test_model import save_hf_model
from .test_tokenizer import build_chatml_dir

ct_quantization = pytest.importorskip("compressed_tensors.quantization")
ct_compressors = pytest.importorskip("compressed_tensors.compressors")
transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 99, 3, 250, 42, 7]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Llama whose input sizes (128, 384) every group size divides, with a tokenizer."""
    _, path = save_hf_model(tmp_path_factory.mktemp("formats"), "llama", vocab_size=512, hidden_size=128, intermediate_size=384)
    return build_chatml_dir(path)


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """Convert `source` once per (scheme, group size, calibration) and cache the directory."""
    root = tmp_path_factory.mktemp("converted")
    cache = {}

    def get(scheme: str, group_size: int | None = None, calibration: str = "minmax"):
        key = (scheme, group_size, calibration)
        if key not in cache:
            name = f"{scheme}-{group_size}-{calibration}"
            cache[key] = convert_checkpoint(source, root / name, scheme, group_size=group_size, calibration=calibration)
        return cache[key]

    return get


def module_tensors(state: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    return {key[len(module) + 1 :]: value for key, value in state.items() if key.startswith(module + ".")}


INT_CASES = [
    ("int4", 32, "minmax"), ("int4", 64, "mse"), ("int4", 128, "minmax"),
    ("int4-asym", 32, "mse"), ("int4-asym", 64, "minmax"), ("int4-asym", 128, "minmax"),
    ("int8", None, "minmax"), ("int8", None, "mse"),
]


@pytest.mark.parametrize("scheme,group_size,calibration", INT_CASES)
def test_compressed_tensors_decompresses_to_our_weights_exactly(converted, scheme, group_size, calibration):
    path = converted(scheme, group_size, calibration)
    quant_config = json.loads((path / "config.json").read_text())["quantization_config"]
    config = ct_quantization.QuantizationConfig.model_validate(quant_config)
    scheme_args = config.config_groups["group_0"]
    compressor = ct_compressors.BaseCompressor.get_value_from_registry(config.format)
    state = load_file(path / "model.safetensors")
    model = load_model(path)
    quantized = {name: m for name, m in checkpoint_modules(model).items() if isinstance(m, PackedIntLinear)}
    assert len(quantized) == 14  # 7 linears x 2 layers; lm_head stays float
    for name, module in quantized.items():
        theirs = compressor.decompress(module_tensors(state, name), scheme_args)["weight"]
        assert torch.equal(theirs, module.dequantize()), name
        assert module.num_bits == (8 if scheme == "int8" else 4) and module.group_size == group_size


@pytest.mark.parametrize("scheme", ["int4-asym", "int8", "nf4"])
def test_a_bfloat16_source_decompresses_exactly_too(source, tmp_path, scheme):
    """bf16 weights keep bf16 scales (as compressed-tensors stores them); dequantization is then bf16
    arithmetic, which must still agree bit for bit (and NF4 returns bf16, as bitsandbytes does)."""
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    for file in source.iterdir():
        (bf16 / file.name).write_bytes(file.read_bytes())
    state = {k: v.bfloat16() for k, v in load_file(source / "model.safetensors").items()}
    save_file(state, bf16 / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    (bf16 / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}))
    out = convert_checkpoint(bf16, tmp_path / scheme, scheme)
    module = checkpoint_module(load_model(out), "model.layers.0.mlp.gate_proj")
    packed = module_tensors(load_file(out / "model.safetensors"), "model.layers.0.mlp.gate_proj")
    if scheme == "nf4":
        functional = pytest.importorskip("bitsandbytes.functional")
        expected_packed, quant_state = functional.quantize_4bit(state["model.layers.0.mlp.gate_proj.weight"], blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(packed["weight"], expected_packed)
        assert torch.equal(module.dequantize(), functional.dequantize_4bit(expected_packed, quant_state))
        assert module.dequantize().dtype == torch.bfloat16
        return
    assert packed["weight_scale"].dtype == torch.bfloat16
    quant_config = json.loads((out / "config.json").read_text())["quantization_config"]
    config_groups = ct_quantization.QuantizationConfig.model_validate(quant_config).config_groups
    compressor = ct_compressors.BaseCompressor.get_value_from_registry("pack-quantized")
    theirs = compressor.decompress(packed, config_groups["group_0"])["weight"]
    assert theirs.dtype == torch.bfloat16 and torch.equal(theirs, module.dequantize())


@pytest.mark.parametrize("scheme,group_size", [("int4", 64), ("int4-asym", 32), ("int8", None)])
def test_our_packed_tensors_are_what_compressed_tensors_compresses(converted, scheme, group_size):
    """Feed compressed-tensors the dequantized weight and our scale/zero point: it packs our bytes."""
    path = converted(scheme, group_size)
    config = ct_quantization.QuantizationConfig.model_validate(json.loads((path / "config.json").read_text())["quantization_config"])
    compressor = ct_compressors.BaseCompressor.get_value_from_registry(config.format)
    state = load_file(path / "model.safetensors")
    module = load_model(path).model.layers[1].mlp.down_proj
    ours = module_tensors(state, "model.layers.1.mlp.down_proj")
    inputs = {"weight": module.dequantize(), "weight_scale": module.weight_scale}
    if module.weight_zero_point is not None:
        inputs["weight_zero_point"] = module.weight_zero_point
    theirs = compressor.compress(inputs, config.config_groups["group_0"])
    assert set(theirs) == set(ours)
    for key in ours:
        assert theirs[key].dtype == ours[key].dtype and torch.equal(theirs[key], ours[key]), key


def test_quantization_config_round_trips_through_compressed_tensors(converted):
    for scheme, group_size in [("int4", 64), ("int4-asym", 128), ("int8", None)]:
        written = json.loads((converted(scheme, group_size) / "config.json").read_text())["quantization_config"]
        dumped = ct_quantization.QuantizationConfig.model_validate(written).model_dump(exclude=["quant_method"])
        for key in ("quant_method", "version", "sparsity_config", "transform_config"):
            written.pop(key)  # ModelCompressor.update_config adds these beside the dump
        assert dumped == written


def test_compressed_tensors_refuses_a_group_that_does_not_divide_the_input_size(tmp_path):
    """K = 96 with groups of 64: compressed-tensors cannot decompress it, so quadapt refuses to write it."""
    weights = ct_quantization.QuantizationArgs(num_bits=4, strategy="group", group_size=64, symmetric=True)
    scheme = ct_quantization.QuantizationScheme(targets=["Linear"], weights=weights)
    compressor = ct_compressors.BaseCompressor.get_value_from_registry("pack-quantized")
    padded = {
        "weight_packed": torch.zeros(8, 12, dtype=torch.int32),
        "weight_scale": torch.ones(8, 2),  # ceil(96 / 64) groups, the last one padded
        "weight_shape": torch.tensor([8, 96]),
    }
    with pytest.raises(ValueError, match="divisble|divisible"):
        compressor.decompress(padded, scheme)
    _, path = save_hf_model(tmp_path, "llama", hidden_size=96, intermediate_size=192)
    with pytest.raises(InvalidParameterError, match=r"--group-size 64 does not divide .* 96 inputs.*--group-size 32"):
        convert_checkpoint(path, tmp_path / "out", "int4", group_size=64)


def quadapt_greedy(path) -> list[int]:
    model = load_model(path)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return list(generate_ids(model, PROMPT, params, eos_token_ids=set()))


def transformers_greedy(model) -> list[int]:
    config = transformers.GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), generation_config=config)
    return out[0, len(PROMPT) :].tolist()


@pytest.mark.parametrize(
    "scheme,group_size,calibration", [("int4", 128, "minmax"), ("int4", 32, "minmax"), ("int4", 32, "mse"), ("int8", None, "minmax")]
)
def test_transformers_loads_our_output_and_generates_the_same_tokens(converted, scheme, group_size, calibration):
    path = converted(scheme, group_size, calibration)
    if calibration == "mse":  # the symmetric search stores negative scales where a group's peak is positive
        scales = [v for k, v in load_file(path / "model.safetensors").items() if k.endswith("weight_scale")]
        assert any(bool((v < 0).any()) for v in scales) and any(bool((v > 0).any()) for v in scales)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert transformers_greedy(model) == quadapt_greedy(path)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():  # the same weights, the same fp32 arithmetic
        assert torch.equal(model(ids).logits, load_model(path)(ids))


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_an_int8_head_is_what_compressed_tensors_and_transformers_read(source, tmp_path, scheme):
    """`--lm-head int8`: compressed-tensors gives the head the W8A16 scheme (a name target beats the
    "Linear" class) and decompresses it to our weights exactly; transformers then computes our logits."""
    path = convert_checkpoint(source, tmp_path / scheme, scheme, lm_head="int8")
    written = json.loads((path / "config.json").read_text())["quantization_config"]
    dumped = ct_quantization.QuantizationConfig.model_validate(written).model_dump(exclude=["quant_method"])
    assert dumped == {k: v for k, v in written.items() if k not in ("quant_method", "version", "sparsity_config", "transform_config")}
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    schemes = {name: m.quantization_scheme for name, m in model.named_modules() if hasattr(m, "quantization_scheme")}
    assert set(schemes) == {name for name, m in checkpoint_modules(load_model(path)).items() if isinstance(m, PackedIntLinear)}
    head = schemes["lm_head"].weights
    assert (head.num_bits, head.strategy, head.symmetric) == (8, "channel", True)
    assert schemes["model.layers.0.mlp.up_proj"].weights.num_bits == (4 if scheme == "int4" else 8)

    ours = load_model(path)
    state = load_file(path / "model.safetensors")
    compressor = ct_compressors.BaseCompressor.get_value_from_registry("pack-quantized")
    for name, module in checkpoint_modules(ours).items():
        if isinstance(module, PackedIntLinear):
            theirs = compressor.decompress(module_tensors(state, name), schemes[name])["weight"]
            assert torch.equal(theirs, module.dequantize()), name
    assert transformers_greedy(model) == quadapt_greedy(path)
    assert torch.equal(model.lm_head.weight, ours.lm_head.dequantize())  # decompressed by the first forward
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([PROMPT])).logits, ours(torch.tensor([PROMPT])))


def test_transformers_cannot_load_a_quantized_embedding(source, tmp_path):
    """Why `--lm-head int8` refuses a tied head and no option quantizes the embedding: compressed-tensors
    decompresses an int8 embedding, but transformers 5.24's weight init reads the compressed
    `nn.Embedding`'s `weight`, which it no longer has. If this starts passing, revisit the refusal."""
    from quadapt.converters.formats import packed_int_tensors
    from quadapt.converters.quantize import quantize_int

    path = convert_checkpoint(source, tmp_path / "int8", "int8", lm_head="int8")
    state = load_file(path / "model.safetensors")
    quantized = quantize_int(state.pop("model.embed_tokens.weight"), num_bits=8, group_size=None, symmetric=True)
    state |= dict(packed_int_tensors("model.embed_tokens", quantized))
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["targets"].append("model.embed_tokens")
    (path / "config.json").write_text(json.dumps(config))
    scheme = ct_quantization.QuantizationConfig.model_validate(config["quantization_config"]).config_groups["group_0"]
    compressor = ct_compressors.BaseCompressor.get_value_from_registry("pack-quantized")
    assert torch.equal(compressor.decompress(module_tensors(state, "model.embed_tokens"), scheme)["weight"], quantized.dequantize())
    with pytest.raises(AttributeError, match="'Embedding' object has no attribute 'weight'"):
        transformers.AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_transformers_loads_asymmetric_int4_with_dequantize(converted):
    """transformers 5.24's default path builds unpacked zero points on the meta device and then rejects
    compressed-tensors' own packed ones (it does the same to a checkpoint compressed-tensors wrote);
    its `dequantize=True` path reads them, and agrees with us exactly."""
    path = converted("int4-asym", 64)
    config = transformers.CompressedTensorsConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config).eval()
    assert transformers_greedy(model) == quadapt_greedy(path)


def test_nf4_tensors_are_bitsandbytes_own(source, converted):
    functional = pytest.importorskip("bitsandbytes.functional")

    path = converted("nf4")
    state = load_file(path / "model.safetensors")
    float_state = load_file(source / "model.safetensors")
    modules = sorted({key.split(".weight")[0] for key in state if key.endswith(".weight.absmax")})
    assert len(modules) == 14
    for module in modules:
        packed, quant_state = functional.quantize_4bit(
            float_state[module + ".weight"], blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        expected = {"weight": packed} | {f"weight.{k}": v for k, v in quant_state.as_dict(packed=True).items()}
        ours = module_tensors(state, module)
        assert set(ours) == set(expected), module
        for key, value in expected.items():
            assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), f"{module}.{key}"


def test_transformers_and_bitsandbytes_load_our_nf4(converted):
    pytest.importorskip("bitsandbytes")
    path = converted("nf4")
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_use_double_quant"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    ours = load_model(path)
    assert isinstance(checkpoint_module(ours, "model.layers.0.mlp.up_proj"), NF4Linear)
    import bitsandbytes.functional as functional

    theirs = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(functional.dequantize_4bit(theirs.data, theirs.quant_state), checkpoint_module(ours, "model.layers.0.mlp.up_proj").dequantize())
    # On CPUs with AVX512-BF16, bitsandbytes repacks the weight and multiplies in bf16, whose rounding
    # flips near-tied argmaxes of a random model; its plain path (dequantize, fp32 matmul) is the
    # format's reference arithmetic, so compare against that.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    assert transformers_greedy(model) == quadapt_greedy(path)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("double_quant", [True, False])
def test_loader_reads_nf4_checkpoints_transformers_wrote(source, tmp_path, double_quant):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as functional

    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(source, quantization_config=config, device_map="cpu")
    model.save_pretrained(tmp_path / "nf4")
    ours = load_model(tmp_path / "nf4")
    for name, module in checkpoint_modules(ours).items():
        if isinstance(module, NF4Linear):
            weight = model.get_submodule(name).weight
            assert torch.equal(module.dequantize(), functional.dequantize_4bit(weight.data, weight.quant_state)), name


def test_loader_reads_a_checkpoint_compressed_tensors_wrote(tmp_path):
    """llm-compressor's save path (ModelCompressor) on a real model: quadapt loads it as transformers does."""
    model_compressors = pytest.importorskip("compressed_tensors.compressors")
    _, path = save_hf_model(tmp_path, "llama", hidden_size=128, intermediate_size=256)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    preset = ct_quantization.preset_name_to_scheme("W4A16", ["Linear"])
    ct_config = ct_quantization.QuantizationConfig(config_groups={"group_0": preset}, ignore=["lm_head"])
    ct_quantization.apply_quantization_config(model, ct_config)
    for module in model.modules():
        if hasattr(module, "weight_scale"):  # min-max scales, as the observer would set them
            groups = module.weight.detach().reshape(module.weight.shape[0], -1, 128)
            module.weight_scale.data.copy_(groups.abs().amax(-1) / 7.5)
    compressor = model_compressors.ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(tmp_path / "ct")
    compressor.update_config(str(tmp_path / "ct"))

    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "ct")(ids), reference(ids).logits)


# --- strictness ------------------------------------------------------------------------------------


def test_missing_and_unexpected_quantized_tensors_are_reported(converted, tmp_path):
    path = converted("int4", 64)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    state = load_file(path / "model.safetensors")
    del state["model.layers.0.self_attn.q_proj.weight_scale"]
    state["model.layers.0.self_attn.q_proj.weight_zero_point"] = torch.zeros(16, 2, dtype=torch.int32)
    save_file(state, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"Missing 1 tensor.*q_proj.weight_scale.*Unexpected 1 tensor.*weight_zero_point"):
        load_model(broken)


def test_a_wrong_packed_shape_is_reported(converted, tmp_path):
    path = converted("int8")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    state = load_file(path / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight_packed"] = state["model.layers.1.mlp.up_proj.weight_packed"][:, :-1].contiguous()
    save_file(state, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"up_proj.weight_packed is torch.int32 \(384, 31\)"):
        load_model(broken)


@pytest.mark.parametrize(
    "quantization_config,message",
    [
        ({"quant_method": "gptq", "bits": 4}, "quantization method 'gptq' is not supported"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8-bit"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "'fp4' is not supported"),
        (
            {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
             "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}}}},
            "format 'float-quantized' is not supported",
        ),
        ({"quant_method": "compressed-tensors", "quantization_status": "frozen"}, "status 'frozen'"),
    ],
    ids=["gptq", "bnb-8bit", "bnb-fp4", "ct-fp8", "ct-frozen"],
)
def test_quantization_configs_quadapt_cannot_run_are_refused(source, tmp_path, quantization_config, message):
    path = tmp_path / "model"
    path.mkdir()
    config = json.loads((source / "config.json").read_text()) | {"quantization_config": quantization_config}
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    with pytest.raises(UnsupportedError, match=message):
        load_model(path)
