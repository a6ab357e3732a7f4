"""Stacked projections (runtime/model/fused.py): q/k/v and gate/up in one module of their format,
with per-section LoRA slots, give the separate projections' outputs; a section's adapter reaches
its own output only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quadapt.runtime.checkpoints.adapters import add_lora_slots, load_into_slot, lora_modules
from quadapt.runtime.errors import InvalidParameterError
from quadapt.runtime.model.fused import FusedLinear, checkpoint_tensor, stack_modules
from quadapt.runtime.model.lora import NO_SLOT, LoRALinear, SlotMapping
from quadapt.runtime.model.quant import NF4Linear

from .conftest import assert_close
from .test_lora import TARGETS, make_model, model_adapter, random_lora


def test_the_stacked_projections_are_their_sections_side_by_side():
    """`CausalLM` holds q/k/v and gate/up stacked; each section is a view of its rows, and the
    stacked output is the sections' outputs side by side."""
    model = make_model()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.qkv_proj, FusedLinear) and isinstance(mlp.gate_up_proj, FusedLinear)
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "up_proj")
    x = torch.randn(2, 5, model.config.hidden_size)
    for stacked in (attn.qkv_proj, mlp.gate_up_proj):
        sections = [stacked.section(name) for name in stacked.section_names]
        assert_close(stacked(x), torch.cat([section(x) for section in sections], dim=-1))
        assert all(s.weight.untyped_storage().data_ptr() == stacked.weight.untyped_storage().data_ptr() for s in sections)
    k = checkpoint_tensor(model, "model.layers.0.self_attn.k_proj.weight")
    assert torch.equal(k, attn.qkv_proj.weight[attn.q_dim: attn.q_dim + attn.kv_dim])


def merged(model, adapter) -> nn.Module:
    """A copy of `model` with each module's LoRA delta added into its (section's) weight rows."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, weights in adapter.items():
            checkpoint_tensor(out, f"{name}.weight").add_(weights.delta())
    return out


def test_lora_sections_equal_merged_weights_in_a_mixed_batch():
    """Two adapters in the stacked modules' LoRA sections, rows of both slots and rows of none in
    one batch: each row's logits are those of the base with its adapter merged into the weights."""
    model = make_model()
    adapters = [model_adapter(model, rank=4, seed=s) for s in (1, 2)]
    names = sorted(adapters[0])
    served = copy.deepcopy(model)
    mapping = add_lora_slots(served, names, num_slots=2, max_rank=4)
    assert sorted(lora_modules(served)) == names  # every section by its own HF name
    assert isinstance(served.model.layers[0].self_attn.qkv_proj, LoRALinear)
    for slot, adapter in enumerate(adapters):
        load_into_slot(served, adapter, slot)
    ids = torch.randint(0, model.config.vocab_size, (3, 5))
    mapping.set(torch.tensor([0, NO_SLOT, 1]).repeat_interleave(5))
    got = served(ids)
    for row, reference in enumerate((merged(model, adapters[0]), model, merged(model, adapters[1]))):
        assert_close(got[row], reference(ids[row: row + 1])[0])
    mapping.set(NO_SLOT)
    assert_close(served(ids), model(ids))


def test_a_section_adapter_reaches_its_own_output_only():
    torch.manual_seed(0)
    q, k, v = nn.Linear(16, 12), nn.Linear(16, 6), nn.Linear(16, 6)
    base = FusedLinear.from_linears([("q_proj", q), ("k_proj", k), ("v_proj", v)])
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
        FusedLinear.from_linears([("a", nn.Linear(8, 4)), ("b", nn.Linear(9, 4))])


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
    base = FusedLinear.from_linears([("gate_proj", nn.Linear(16, 10)), ("up_proj", nn.Linear(16, 10))])
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
    """q/k/v of packed weights stack into one packed module of their format whose output is the
    separate modules' side by side, whose sections give back the separate buffers, and whose
    LoRA sections equal LoRA stacks on the separate modules."""
    torch.manual_seed(0)
    members = [(name, packed(nn.Linear(64, size), scheme)) for name, size in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32))]
    stacked = stack_modules(members, torch.float32)
    assert type(stacked) is type(members[0][1]) and stacked.section_names == ("q_proj", "k_proj", "v_proj")
    x = torch.randn(2, 3, 64)
    assert_close(stacked(x), torch.cat([m(x) for _, m in members], dim=-1))
    for name, module in members:
        section = stacked.section(name)
        assert type(section) is type(module)
        for key, value in module.named_buffers():
            assert torch.equal(getattr(section, key), value), (name, key)
        assert_close(section(x), module(x))

    mapping = SlotMapping(1)
    stack = LoRALinear(stacked, mapping, max_rank=4, targets=TARGETS)
    separate = [LoRALinear(m, mapping, max_rank=4) for _, m in members]
    for (name, module), plain in zip(members, separate):
        weights = random_lora(module.out_features, 64, 3)
        stack.sections[name].set_slot(0, weights)
        plain.set_slot(0, weights)
    mapping.set(0)
    assert_close(stack(x), torch.cat([plain(x) for plain in separate], dim=-1))


def test_nf4_projections_that_split_a_block_are_dequantized_and_stacked_float():
    """An NF4 weight whose size is not a whole number of 64-weight blocks would share its last
    block with the next projection's rows: such a group is dequantized and stacked as float, with
    the same values; so is a group of mixed formats."""
    torch.manual_seed(0)
    gate, up = packed(nn.Linear(24, 10), "nf4"), packed(nn.Linear(24, 10), "nf4")  # 240 weights
    assert NF4Linear.stack([("gate_proj", gate), ("up_proj", up)]) is None
    stacked = stack_modules([("gate_proj", gate), ("up_proj", up)], torch.float32)
    assert isinstance(stacked, FusedLinear) and stacked.section_names == ("gate_proj", "up_proj")
    assert torch.equal(stacked.section("up_proj").weight, up.dequantize())
    x = torch.randn(4, 24)
    assert_close(stacked(x), torch.cat([gate(x), up(x)], dim=-1))
    mixed = stack_modules([("gate_proj", nn.Linear(24, 10)), ("up_proj", up)], torch.float32)
    assert isinstance(mixed, FusedLinear) and torch.equal(mixed.section("up_proj").weight, up.dequantize())
