"""Fused projections (runtime/model/fused.py): q/k/v and gate/up in one matmul, with per-section LoRA
slots, give the separate projections' outputs; a section's adapter reaches its own output only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quadapt.runtime.checkpoints.adapters import add_lora_slots, load_into_slot, lora_modules
from quadapt.runtime.errors import InvalidParameterError
from quadapt.runtime.model.fused import FusedLinear, fuse_projections
from quadapt.runtime.model.lora import NO_SLOT, LoRALinear, SlotMapping

from .conftest import assert_close
from .test_lora import TARGETS, make_model, model_adapter, random_lora


def test_fused_projections_equal_the_separate_ones():
    model = make_model()
    fused = copy.deepcopy(model)
    assert fuse_projections(fused) == 2 * fused.config.num_hidden_layers
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert isinstance(attn.qkv_proj, FusedLinear) and isinstance(mlp.gate_up_proj, FusedLinear)
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "up_proj")
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    assert_close(fused(ids), model(ids))


def test_fused_lora_sections_equal_separate_stacks_in_a_mixed_batch():
    """The same two adapters in separate `LoRALinear` stacks and in fused stacks, rows of both
    slots and rows of none in one batch: the same logits."""
    model = make_model()
    adapters = [model_adapter(model, rank=4, seed=s) for s in (1, 2)]
    names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    separate = copy.deepcopy(model)
    sep_mapping = add_lora_slots(separate, names, num_slots=2, max_rank=4)

    fused = copy.deepcopy(model)
    fuse_projections(fused)
    rest = [n for n, m in fused.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    mapping = add_lora_slots(fused, rest, num_slots=2, max_rank=4)
    for name, module in list(fused.named_modules()):
        if isinstance(module, FusedLinear):
            parent, _, child = name.rpartition(".")
            setattr(fused.get_submodule(parent), child, LoRALinear(module, mapping, 4, targets=TARGETS))
    assert sorted(lora_modules(fused)) == sorted(names)  # every section by its own HF name

    for slot, adapter in enumerate(adapters):
        load_into_slot(separate, adapter, slot)
        load_into_slot(fused, adapter, slot)
    ids = torch.randint(0, model.config.vocab_size, (3, 5))
    slots = torch.tensor([0, NO_SLOT, 1]).repeat_interleave(5)
    sep_mapping.set(slots)
    mapping.set(slots)
    assert_close(fused(ids), separate(ids))
    sep_mapping.set(NO_SLOT)
    mapping.set(NO_SLOT)
    assert_close(fused(ids), model(ids))


def test_a_section_adapter_reaches_its_own_output_only():
    torch.manual_seed(0)
    q, k, v = nn.Linear(16, 12), nn.Linear(16, 6), nn.Linear(16, 6)
    base = FusedLinear([("q_proj", q), ("k_proj", k), ("v_proj", v)])
    mapping = SlotMapping(2)
    stack = LoRALinear(base, mapping, max_rank=4, targets=TARGETS)
    w = random_lora(6, 16, 3)
    stack.sections["k_proj"].set_slot(1, w)
    x = torch.randn(3, 16)
    mapping.set(torch.tensor([1, 0, NO_SLOT]))
    out_q, out_k, out_v = stack(x).split((12, 6, 6), dim=-1)
    assert_close(out_q, q(x))
    assert_close(out_v, v(x))
    assert_close(out_k[0], k(x[0]) + x[0] @ w.delta().T)
    assert_close(out_k[1:], k(x[1:]))  # slot 0 is empty, and the third row has none
    assert not torch.allclose(out_k[0], k(x[0]))  # negative control: the adapter does change k

    stack.sections["k_proj"].clear_slot(1)
    assert_close(stack(x), base(x))
    with pytest.raises(InvalidParameterError, match="rank 5 exceeds"):
        stack.sections["q_proj"].set_slot(0, random_lora(12, 16, 5))
    with pytest.raises(InvalidParameterError, match="do not fit"):
        stack.sections["q_proj"].set_slot(0, random_lora(6, 16, 2))
    with pytest.raises(InvalidParameterError, match="out of range"):
        stack.sections["v_proj"].set_slot(2, random_lora(6, 16, 2))


def test_only_float_linears_fuse():
    with pytest.raises(InvalidParameterError, match="cannot fuse"):
        FusedLinear([("a", nn.Linear(8, 4)), ("b", nn.Linear(9, 4))])


def test_the_cpu_engine_serves_through_fused_stacks(tmp_path):
    """The engine's CPU executor uses this layout, so the engine's batch-invariance tests
    (tests/test_engine.py) check it against the reference generator."""
    from quadapt.runtime.engine.engine import Engine, EngineConfig
    from quadapt.runtime.checkpoints.loader import load_model

    from .test_adapters import make_base

    engine = Engine.for_model(load_model(make_base(tmp_path)), eos_token_ids={2},
                              config=EngineConfig(max_loras=2, max_lora_rank=4), kv_cache_bytes=2**20)
    layer = engine.executor.model.model.layers[0]
    for stack in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj):
        assert isinstance(stack, LoRALinear) and isinstance(stack.base, FusedLinear) and stack.fused_weight is not None
    assert layer.self_attn.o_proj.fused_weight is not None


def test_one_slot_for_every_token_equals_the_per_token_form():
    """A batch whose tokens all use one slot reads that slot's factors alone; same output."""
    torch.manual_seed(1)
    base = FusedLinear([("gate_proj", nn.Linear(16, 10)), ("up_proj", nn.Linear(16, 10))])
    mapping = SlotMapping(3)
    stack = LoRALinear(base, mapping, max_rank=4, targets=TARGETS)
    for slot in range(3):
        stack.sections["gate_proj"].set_slot(slot, random_lora(10, 16, 3))
        stack.sections["up_proj"].set_slot(slot, random_lora(10, 16, 4))
    x = torch.randn(2, 5, 16)
    mapping.set(torch.full((10,), 2))
    per_token = stack(x)
    mapping.set(2)
    assert_close(stack(x), per_token)
    assert not torch.allclose(per_token, base(x), atol=1e-3)  # negative control: slot 2 is not empty


def packed(linear: nn.Linear, scheme: str) -> nn.Module:
    """`linear` quantized to a packed module of `scheme` (int4 asymmetric grouped, int8 per channel, nf4)."""
    from quadapt.converters.formats import pack_int32
    from quadapt.converters.quantize import quantize_int, quantize_nf4
    from quadapt.runtime.model.quant import NF4Linear, PackedIntLinear

    w, shape = linear.weight.detach(), dict(in_features=linear.in_features, out_features=linear.out_features, bias=True)
    if scheme == "nf4":
        module, q = NF4Linear(**shape), quantize_nf4(w)
        module._buffers.update(weight_packed=q.packed.reshape(-1), absmax=q.float_absmax())
    else:
        bits, group, symmetric = (4, 16, False) if scheme == "int4" else (8, None, True)
        module = PackedIntLinear(**shape, num_bits=bits, group_size=group, symmetric=symmetric)
        q = quantize_int(w, num_bits=bits, group_size=group, symmetric=symmetric, scale_dtype=w.dtype)
        module._buffers.update(weight_packed=pack_int32(q.q, bits), weight_scale=q.scale, weight_zero_point=q.zero_point)
    module.bias = nn.Parameter(torch.randn(linear.out_features) * 0.1, requires_grad=False)
    return module


@pytest.mark.parametrize("scheme", ["int4", "int8", "nf4"])
def test_packed_projections_stack_in_their_format(scheme):
    """q/k/v and gate/up of packed weights stack into one packed module of their format whose
    output is the separate modules' side by side; LoRA sections on it load by HF name."""
    model = make_model()
    for name, m in list(model.named_modules()):
        if name.startswith("model.layers.") and isinstance(m, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, packed(m, scheme))
    stacked = copy.deepcopy(model)
    assert fuse_projections(stacked) == 2 * model.config.num_hidden_layers
    attn = stacked.model.layers[0].self_attn
    assert type(attn.qkv_proj) is type(model.model.layers[0].self_attn.q_proj)
    assert attn.qkv_proj.section_names == ("q_proj", "k_proj", "v_proj")
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    assert_close(stacked(ids), model(ids))

    adapter = model_adapter(model, rank=4, seed=3)
    names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    mappings = [add_lora_slots(m, names, num_slots=1, max_rank=4) for m in (model, stacked)]
    assert sorted(lora_modules(stacked)) == sorted(names)
    for m, mapping in zip((model, stacked), mappings):
        load_into_slot(m, adapter, 0)
        mapping.set(0)
    assert_close(stacked(ids), model(ids))


def test_nf4_projections_that_split_a_block_stay_apart():
    """An NF4 weight whose size is not a whole number of 64-weight blocks would share its last
    block with the next projection's rows: such a group keeps its separate modules."""
    torch.manual_seed(0)
    parent = nn.Module()
    parent.gate_proj, parent.up_proj = packed(nn.Linear(24, 10), "nf4"), packed(nn.Linear(24, 10), "nf4")  # 240 weights
    assert fuse_projections(parent) == 0
    assert hasattr(parent, "gate_proj") and not hasattr(parent, "gate_up_proj")
