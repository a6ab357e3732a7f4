"""One layout for every weight format: float, int4, int8 and NF4 checkpoints of one tiny model load
with q/k/v and gate/up stacked (packed formats stacked packed), load as the same modules on CPU when
dequantized (as the engine asks), serve with one sectioned LoRA stack per projection group, and
decode the tokens they decoded before and the reference generator's tokens on the same checkpoint.
The engine's executor changes no module of the model it is given."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from quadapt.runtime.checkpoints.adapters import apply_adapter, lora_modules
from quadapt.runtime.engine.engine import Engine, EngineConfig
from quadapt.runtime.api.generate import generate_ids
from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.model.fused import FusedLinear, checkpoint_module
from quadapt.runtime.model.lora import LoRALinear
from quadapt.runtime.model.quant import NF4Linear, PackedIntLinear
from quadapt.runtime.engine.sampling import SamplingParams

from .conftest import assert_close
from .test_adapters import make_base, make_peft_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

FORMATS = ("float", "int4", "int8", "nf4")
PROMPTS = {"0": [5, 17, 300, 41, 9], "1": [200, 3, 77]}
PARAMS = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Greedy tokens of these checkpoints and prompts, recorded with the layout before the sectioned LoRA
# stacks and the `lora_linear` op (separate fused and plain LoRA modules, the CPU expand called
# directly); request id "<prompt>-<adapter>", adapter None (the base) or "a". The reference generator
# gave the same tokens then.
PREVIOUS = {
    "float": {"0-None": [154, 195, 381, 49, 216, 16], "0-a": [7, 269, 7, 269, 7, 269],
              "1-None": [367, 294, 211, 508, 466, 309], "1-a": [162, 417, 417, 89, 414, 89]},
    "int4": {"0-None": [154, 195, 381, 49, 216, 16], "0-a": [7, 269, 7, 269, 7, 269],
             "1-None": [367, 420, 37, 291, 291, 291], "1-a": [162, 417, 417, 110, 89, 414]},
    "int8": {"0-None": [154, 195, 381, 49, 216, 16], "0-a": [7, 269, 7, 269, 7, 269],
             "1-None": [367, 294, 211, 508, 466, 309], "1-a": [162, 417, 417, 89, 414, 89]},
    "nf4": {"0-None": [154, 131, 511, 145, 340, 146], "0-a": [7, 269, 7, 269, 7, 269],
            "1-None": [441, 502, 367, 202, 187, 98], "1-a": [162, 417, 417, 110, 89, 414]},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from quadapt.converters.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("layout")
    base = make_base(root)
    torch.manual_seed(0)
    adapter = make_peft_adapter(base, root / "adapter", seed=3, config=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    paths = {
        "float": base,
        # down_proj's 112 inputs take no int4 group size of 32, so it stays float there.
        "int4": convert_checkpoint(base, root / "int4", "int4", group_size=32, keep=["down_proj"]),
        "int8": convert_checkpoint(base, root / "int8", "int8"),
        "nf4": convert_checkpoint(base, root / "nf4", "nf4"),
    }
    return paths, adapter


def serve(path, adapter, *, dequantize: bool = True) -> Engine:
    """An engine on the checkpoint as `build_engine` loads it on CPU (packed weights dequantized at load)."""
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, max_loras=1, max_lora_rank=8)
    engine = Engine.for_model(load_model(path, dequantize=dequantize), eos_token_ids={2}, config=config,
                              kv_cache_bytes=2**20, block_size=4)
    engine.adapters.load("a", adapter)
    return engine


def module_types(engine: Engine) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in engine.executor.model.named_modules()}


def greedy(engine: Engine) -> dict[str, list[int]]:
    for key, prompt in PROMPTS.items():
        for name in (None, "a"):
            engine.add_request(prompt, PARAMS, adapter=name, request_id=f"{key}-{name}")
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def test_every_format_runs_the_same_modules(checkpoints):
    paths, adapter = checkpoints
    layouts = {fmt: module_types(serve(paths[fmt], adapter)) for fmt in FORMATS}
    for fmt in FORMATS[1:]:
        assert layouts[fmt] == layouts["float"], fmt
    layer = "model.layers.0"
    assert layouts["float"][f"{layer}.self_attn.qkv_proj"] == layouts["float"][f"{layer}.mlp.gate_up_proj"] == "LoRALinear"
    assert layouts["float"][f"{layer}.self_attn.qkv_proj.base"] == "FusedLinear"
    assert layouts["float"][f"{layer}.mlp.down_proj.base"] == "Linear"
    assert f"{layer}.self_attn.q_proj" not in layouts["float"]


def test_adapters_load_by_their_hf_names_into_the_sections(checkpoints):
    paths, adapter = checkpoints
    engine = serve(paths["nf4"], adapter)
    stacks = lora_modules(engine.executor.model)
    assert sorted(stacks) == sorted(f"model.layers.{i}.{part}.{t}" for i in range(2) for t in TARGETS
                                    for part in ("self_attn" if t in TARGETS[:4] else "mlp",))
    qkv = engine.executor.model.model.layers[1].self_attn.qkv_proj
    assert isinstance(qkv, LoRALinear) and qkv.section_names == ("q_proj", "k_proj", "v_proj")
    assert stacks["model.layers.1.self_attn.k_proj"] is qkv.sections["k_proj"]


def loaded_types(model) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules()}


def test_loading_dequantized_gives_every_format_the_same_modules(checkpoints):
    paths, _ = checkpoints
    layouts = {fmt: loaded_types(load_model(paths[fmt], dequantize=True)) for fmt in FORMATS}
    for fmt in FORMATS[1:]:
        assert layouts[fmt] == layouts["float"], fmt
    assert layouts["float"]["model.layers.0.self_attn.qkv_proj"] == "FusedLinear"
    assert layouts["float"]["model.layers.0.mlp.gate_up_proj"] == "FusedLinear"
    assert layouts["float"]["model.layers.1.mlp.down_proj"] == "Linear"
    separate = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    assert not any(name.rpartition(".")[2] in separate for name in layouts["float"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_loading_stacks_every_format_in_its_own_format(checkpoints, fmt):
    """Packed checkpoints load packed and stacked: one module of their format per group, whose
    sections hold the checkpoint's projections (the separate module each one loads as alone)."""
    from safetensors.torch import load_file

    paths, _ = checkpoints
    model = load_model(paths[fmt])
    kind = {"float": FusedLinear, "int4": PackedIntLinear, "int8": PackedIntLinear, "nf4": NF4Linear}[fmt]
    tensors = load_file(str(next(paths[fmt].glob("*.safetensors"))))
    for layer in model.model.layers:
        for stacked in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj):
            assert type(stacked) is kind
    qkv = model.model.layers[1].self_attn.qkv_proj
    assert qkv.section_names == ("q_proj", "k_proj", "v_proj")
    for name in ("model.layers.1.self_attn.k_proj", "model.layers.0.mlp.up_proj"):
        section = checkpoint_module(model, name)
        if fmt == "float":
            assert torch.equal(section.weight, tensors[f"{name}.weight"])
        elif fmt == "nf4":
            assert torch.equal(section.weight_packed, tensors[f"{name}.weight"].reshape(-1))
        else:
            assert torch.equal(section.weight_packed, tensors[f"{name}.weight_packed"])
            assert torch.equal(section.weight_scale, tensors[f"{name}.weight_scale"].to(section.weight_scale.dtype))
    dequantized = load_model(paths[fmt], dequantize=True)
    ids = torch.tensor([PROMPTS["0"]])
    with torch.no_grad():
        assert torch.equal(model(ids), dequantized(ids))  # the reference computes x @ dequantize(W).T


def test_a_group_that_cannot_stack_packed_is_dequantized_and_stacked_float(checkpoints, tmp_path):
    """`convert --keep` on one projection of q/k/v leaves a group of mixed formats: it loads as a
    float `FusedLinear` of the same values; the other layers' groups stay packed."""
    from quadapt.converters.convert import convert_checkpoint

    paths, _ = checkpoints
    kept = convert_checkpoint(paths["float"], tmp_path / "kept", "int4", group_size=32,
                              keep=["down_proj", "model.layers.0.self_attn.q_proj"])
    model = load_model(kept)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, FusedLinear)
    assert isinstance(model.model.layers[1].self_attn.qkv_proj, PackedIntLinear)
    float_q = load_model(paths["float"]).model.layers[0].self_attn.qkv_proj.section("q_proj").weight
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.section("q_proj").weight, float_q)
    ids = torch.tensor([PROMPTS["1"]])
    with torch.no_grad():
        assert torch.equal(model(ids), load_model(kept, dequantize=True)(ids))


def test_the_executor_leaves_the_model_it_is_given_unchanged(checkpoints):
    """Building an engine changes no module: every module is still there, the same object, at its
    name or as the base of the LoRA stack put there; its weights hold the same values."""
    paths, adapter = checkpoints
    for fmt in ("float", "nf4"):
        model = load_model(paths[fmt], dequantize=fmt == "float")
        before = dict(model.named_modules())
        values = {name: t.clone() for name, t in model.state_dict().items()}
        config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, max_loras=1, max_lora_rank=8)
        engine = Engine.for_model(model, eos_token_ids={2}, config=config, kv_cache_bytes=2**20, block_size=4)
        assert engine.executor.model is model
        after = dict(model.named_modules())
        for name, module in before.items():
            now = after[name]
            assert now is module or (isinstance(now, LoRALinear) and now.base is module), (fmt, name)
        state = {name.replace(".base.", "."): t for name, t in model.state_dict().items()}
        for name, value in values.items():
            assert torch.equal(state[name], value), (fmt, name)
        unslotted = Engine.for_model(load_model(paths[fmt]), eos_token_ids={2}, kv_cache_bytes=2**20, block_size=4,
                                     config=EngineConfig(max_loras=0))
        plain = load_model(paths[fmt])
        assert loaded_types(unslotted.executor.model) == loaded_types(plain)


@pytest.mark.parametrize("fmt", ["float", "nf4"])
def test_apply_adapter_on_the_stacked_layout_equals_the_merged_weights(checkpoints, fmt):
    """A PEFT adapter applied by its HF module names to the stacked layout (sections of q/k/v and
    gate/up) gives the logits of the base with each section's delta merged into its rows."""
    from quadapt.runtime.checkpoints.peft import read_peft_adapter
    from quadapt.runtime.model.fused import checkpoint_tensor

    paths, adapter = checkpoints
    served, merged = load_model(paths[fmt]), load_model(paths[fmt], dequantize=True)
    apply_adapter(served, adapter)
    with torch.no_grad():
        for name, weights in read_peft_adapter(adapter).modules.items():
            checkpoint_tensor(merged, f"{name}.weight").add_(weights.delta())
    ids = torch.tensor([PROMPTS["0"]])
    with torch.no_grad():
        assert_close(served(ids), merged(ids))
        assert not torch.allclose(served(ids), load_model(paths[fmt])(ids))  # negative control: the adapter acts


@pytest.mark.parametrize("fmt", FORMATS)
def test_greedy_tokens_are_the_previous_layouts_and_the_reference_generators(checkpoints, fmt):
    paths, adapter = checkpoints
    got = greedy(serve(paths[fmt], adapter))
    assert got == PREVIOUS[fmt]
    for rid, tokens in got.items():
        key, name = rid.split("-")
        model = load_model(paths[fmt])
        if name == "a":
            apply_adapter(model, adapter)
        assert tokens == list(generate_ids(model, PROMPTS[key], PARAMS, eos_token_ids={2})), rid


@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_stacked_packed_weights_through_the_triton_kernels(checkpoints, fmt, monkeypatch):
    """The GPU's layout: packed weights kept packed, q/k/v and gate/up stacked into one packed
    module each, LoRA sections on them, all through the Triton kernels (the interpreter on CPU).
    The tokens are the reference generator's on the separate projections."""
    pytest.importorskip("triton")
    paths, adapter = checkpoints
    monkeypatch.setenv("QUADAPT_KERNELS", "triton")
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, max_loras=1, max_lora_rank=8)
    engine = Engine.for_model(load_model(paths[fmt]), eos_token_ids={2}, config=config, kv_cache_bytes=2**20,
                              block_size=4)
    engine.adapters.load("a", adapter)
    qkv = engine.executor.model.model.layers[0].self_attn.qkv_proj
    assert type(qkv.base).__name__ == ("NF4Linear" if fmt == "nf4" else "PackedIntLinear") and qkv.kernel_backend == "triton"
    assert greedy(engine) == PREVIOUS[fmt]
