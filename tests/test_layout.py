"""One serving layout for every weight format: float, int4, int8 and NF4 checkpoints of one tiny
model run as the same modules on CPU (packed weights dequantized once, q/k/v and gate/up stacked,
one sectioned LoRA stack per projection group), and decode the tokens they decoded before and the
reference generator's tokens on the same checkpoint."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from quadapt.runtime.checkpoints.adapters import apply_adapter, lora_modules
from quadapt.runtime.engine.engine import Engine, EngineConfig
from quadapt.runtime.api.generate import generate_ids
from quadapt.runtime.checkpoints.loader import load_model, serving_layout
from quadapt.runtime.model.lora import LoRALinear
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


def serve(path, adapter) -> Engine:
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, max_loras=1, max_lora_rank=8)
    engine = Engine.for_model(load_model(path), eos_token_ids={2}, config=config, kv_cache_bytes=2**20, block_size=4)
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


@pytest.mark.parametrize("fmt", ["float", "nf4"])
def test_apply_adapter_on_the_stacked_layout_equals_the_checkpoints(checkpoints, fmt):
    """A PEFT adapter applied by its HF module names to the stacked layout (sections of q/k/v and
    gate/up) gives the logits it gives on the checkpoint's separate projections."""
    paths, adapter = checkpoints
    plain, stacked = load_model(paths[fmt]), serving_layout(load_model(paths[fmt]))
    assert not hasattr(stacked.model.layers[0].self_attn, "q_proj")
    for model in (plain, stacked):
        apply_adapter(model, adapter)
    ids = torch.tensor([PROMPTS["0"]])
    with torch.no_grad():
        assert_close(stacked(ids), plain(ids))
        assert not torch.allclose(plain(ids), load_model(paths[fmt])(ids))  # negative control: the adapter acts


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
                              block_size=4, dequantize=False)
    engine.adapters.load("a", adapter)
    qkv = engine.executor.model.model.layers[0].self_attn.qkv_proj
    assert type(qkv.base).__name__ == ("NF4Linear" if fmt == "nf4" else "PackedIntLinear") and qkv.kernel_backend == "triton"
    assert greedy(engine) == PREVIOUS[fmt]
