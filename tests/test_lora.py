"""LoRA slot stacks: the invariants of the math, on single modules and on a whole tiny model.

B = 0 changes nothing and a perturbed B does (negative control); a batch mixing slots (and -1)
equals each row computed alone with its adapter; zero-padding a rank to the stack's max rank
changes nothing; any linear-like base works, not just nn.Linear; merged weights equal the
unmerged LoRA. Parity with peft itself is in test_adapters.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quadapt.runtime.checkpoints.adapters import add_lora_slots, load_into_slot, lora_modules
from quadapt.runtime.checkpoints.peft_fit import BaseModules
from quadapt.runtime.model.config import ModelConfig
from quadapt.runtime.model.fused import checkpoint_module, checkpoint_tensor
from quadapt.runtime.errors import AdapterError, InvalidParameterError
from quadapt.kernels.reference import add_lora
from quadapt.runtime.model.lora import NO_SLOT, LoRALinear, LoRAWeights, SlotMapping
from quadapt.runtime.model.model import CausalLM

from .conftest import assert_close, tiny_llama_config

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_lora(out_f: int, in_f: int, rank: int, *, alpha: float = 16.0, rslora: bool = False, b_std: float = 0.1) -> LoRAWeights:
    return LoRAWeights(a=torch.randn(rank, in_f) * 0.2, b=torch.randn(out_f, rank) * b_std, alpha=alpha, use_rslora=rslora)


def make_model() -> CausalLM:
    torch.manual_seed(3)
    model = CausalLM(ModelConfig.from_dict(tiny_llama_config())).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.requires_grad_(False)


def model_adapter(model: nn.Module, rank: int, seed: int, *, b_std: float = 0.1) -> dict[str, LoRAWeights]:
    """A random adapter on every projection of `model`."""
    torch.manual_seed(seed)
    return {
        name: random_lora(m.out_features, m.in_features, rank, alpha=2.0 * rank, b_std=b_std)
        for name, m in ((n, checkpoint_module(model, n)) for n in BaseModules.of_model(model).linear)
        if name.rsplit(".", 1)[-1] in TARGETS
    }


class Int8Linear(nn.Module):
    """A stand-in for a quantized base: no `weight` attribute, just in/out features and forward."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(linear.weight / scale).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.qweight.float() * self.scale).T


# --- single module -----------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_module_equals_the_peft_formula(rslora):
    base = nn.Linear(24, 40)
    w = random_lora(40, 24, 5, alpha=7.0, rslora=rslora)
    mapping = SlotMapping(1)
    layer = LoRALinear(base, mapping, max_rank=8)
    layer.set_slot(0, w)
    mapping.set(0)
    x = torch.randn(3, 6, 24)
    scale = 7.0 / (5**0.5 if rslora else 5)
    expected = base(x) + (x @ w.a.T @ w.b.T) * scale  # peft: lora_B(lora_A(x)) * scaling
    assert_close(layer(x), expected)
    assert_close(x @ (base.weight + w.delta()).T + base.bias, expected)


def test_zero_b_changes_nothing_and_a_perturbed_b_does():
    base = nn.Linear(16, 12)
    mapping = SlotMapping(1)
    layer = LoRALinear(base, mapping, max_rank=4)
    mapping.set(0)
    x = torch.randn(5, 16)
    w = random_lora(12, 16, 4)
    layer.set_slot(0, LoRAWeights(a=w.a, b=torch.zeros_like(w.b), alpha=w.alpha))
    assert torch.equal(layer(x), base(x))
    layer.set_slot(0, w)
    assert (layer(x) - base(x)).abs().max() > 1e-3  # negative control: the test can fail
    layer.clear_slot(0)
    assert torch.equal(layer(x), base(x))


def test_zero_padding_to_max_rank_is_exact():
    base = nn.Linear(32, 20)
    w = random_lora(20, 32, 3)
    x = torch.randn(7, 32)
    outputs = []
    for max_rank in (3, 16):
        mapping = SlotMapping(1)
        layer = LoRALinear(base, mapping, max_rank=max_rank)
        layer.set_slot(0, w)
        mapping.set(0)
        outputs.append(layer(x))
    # The padded columns add exact zeros; only the matmul's blocking could reorder sums.
    assert_close(outputs[1], outputs[0])
    assert torch.allclose(outputs[1], outputs[0], rtol=0, atol=1e-6)


def test_wraps_any_linear_like_base():
    linear = nn.Linear(16, 24, bias=False)
    base = Int8Linear(linear)
    mapping = SlotMapping(1)
    layer = LoRALinear(base, mapping, max_rank=4)
    w = random_lora(24, 16, 4)
    layer.set_slot(0, w)
    mapping.set(0)
    x = torch.randn(2, 3, 16)
    assert_close(layer(x), base(x) + x @ w.delta().T)


def test_mixed_slots_equal_each_row_alone():
    base = nn.Linear(16, 24)
    mapping = SlotMapping(3)
    layer = LoRALinear(base, mapping, max_rank=8)
    adapters = [random_lora(24, 16, r) for r in (8, 2, 5)]
    for slot, w in enumerate(adapters):
        layer.set_slot(slot, w)
    x = torch.randn(5, 16)
    slots = torch.tensor([2, NO_SLOT, 0, 1, 2])
    mapping.set(slots)
    mixed = layer(x)
    for row, slot in enumerate(slots.tolist()):
        expected = base(x[row]) if slot == NO_SLOT else base(x[row]) + x[row] @ adapters[slot].delta().T
        assert_close(mixed[row], expected, msg=f"row {row} slot {slot}")


def test_add_lora_reference_leaves_its_input_alone():
    y, x = torch.randn(4, 6), torch.randn(4, 5)
    a, b = torch.randn(2, 3, 5), torch.randn(2, 6, 3)
    before = y.clone()
    out = add_lora(y, x, a, b, torch.tensor([0, 1, -1, 0]))
    assert torch.equal(y, before)
    assert torch.equal(out[2], y[2])
    assert_close(out[3], y[3] + b[0] @ (a[0] @ x[3]))


def test_slot_errors():
    mapping = SlotMapping(2)
    layer = LoRALinear(nn.Linear(8, 8), mapping, max_rank=4)
    with pytest.raises(InvalidParameterError, match="slot 2 is out of range"):
        mapping.set(2)
    with pytest.raises(InvalidParameterError, match="slot 5 is out of range"):
        mapping.set(torch.tensor([0, 5]))
    with pytest.raises(InvalidParameterError, match="rank 6 exceeds"):
        layer.set_slot(0, random_lora(8, 8, 6))
    with pytest.raises(InvalidParameterError, match="do not fit"):
        layer.set_slot(0, random_lora(8, 12, 2))
    with pytest.raises(InvalidParameterError, match="at least one slot"):
        SlotMapping(0)


# --- whole model -------------------------------------------------------------------------------


def test_model_mixed_batch_equals_each_sequence_alone():
    model = make_model()
    ids = torch.randint(0, 256, (4, 11))
    with torch.no_grad():
        plain = model(ids)
    adapters = [model_adapter(model, 4, seed=10), model_adapter(model, 2, seed=11)]
    mapping = add_lora_slots(model, adapters[0], num_slots=2, max_rank=4)
    for slot, adapter in enumerate(adapters):
        load_into_slot(model, adapter, slot)

    with torch.no_grad():
        assert_close(model(ids), plain, msg="fresh slots, slot -1")  # no slot selected yet
        per_seq = torch.tensor([1, NO_SLOT, 0, 1])
        mapping.set(per_seq)
        mixed = model(ids)
        mapping.set(per_seq[:, None].expand(4, 11))  # the same choice, per token
        assert_close(model(ids), mixed, msg="per-token slots")
        for row, slot in enumerate(per_seq.tolist()):
            mapping.set(slot)
            alone = model(ids[row : row + 1])
            assert_close(mixed[row : row + 1], alone, msg=f"sequence {row} slot {slot}")
        assert (mixed[0] - plain[0]).abs().max() > 1e-3  # the adapters do something
        assert_close(mixed[1], plain[1], msg="slot -1 row")


def test_model_zero_b_equals_base_and_merged_equals_unmerged():
    model, merged = make_model(), make_model()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        plain = model(ids)
    adapter = model_adapter(model, 4, seed=12)
    mapping = add_lora_slots(model, adapter, num_slots=1, max_rank=4)
    mapping.set(0)
    zero_b = {n: LoRAWeights(a=w.a, b=torch.zeros_like(w.b), alpha=w.alpha) for n, w in adapter.items()}
    load_into_slot(model, zero_b, 0)
    with torch.no_grad():
        assert torch.equal(model(ids), plain)
        load_into_slot(model, adapter, 0)
        unmerged = model(ids)
        for name, w in adapter.items():
            checkpoint_tensor(merged, f"{name}.weight").add_(w.delta())
        assert_close(unmerged, merged(ids))
    assert (unmerged - plain).abs().max() > 1e-3


def test_partial_adapter_clears_the_slot_elsewhere():
    model = make_model()
    full = model_adapter(model, 4, seed=13)
    mapping = add_lora_slots(model, full, num_slots=1, max_rank=4)
    mapping.set(0)
    load_into_slot(model, full, 0)
    q_only = {n: w for n, w in full.items() if n.endswith("q_proj")}
    load_into_slot(model, q_only, 0)
    for name, target in lora_modules(model).items():
        # a one-section stack, or one section (its rows and rank columns) of a stacked one
        b = target.lora_b[0] if isinstance(target, LoRALinear) else target.stack.lora_b[0, target._rows, target._cols]
        assert bool(b.any()) == name.endswith("q_proj"), name


def test_model_slot_errors():
    model = make_model()
    adapter = model_adapter(model, 4, seed=14)
    with pytest.raises(AdapterError, match="has no module"):
        add_lora_slots(model, ["model.layers.9.self_attn.q_proj"], num_slots=1, max_rank=4)
    with pytest.raises(AdapterError, match="not a linear layer"):
        add_lora_slots(model, ["model.norm"], num_slots=1, max_rank=4)
    add_lora_slots(model, [n for n in adapter if n.endswith("q_proj")], num_slots=1, max_rank=4)
    with pytest.raises(AdapterError, match="no LoRA slots there"):
        load_into_slot(model, adapter, 0)
    with pytest.raises(AdapterError, match="already carries LoRA slots"):
        add_lora_slots(model, adapter, num_slots=1, max_rank=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stored_out_first", [True, False], ids=["B [out,S,R]", "B [S,out,R]"])
def test_cpu_add_lora_equals_the_reference(dtype, stored_out_first):
    """The CPU op (every slot in two dense matmuls, masked per token) against the reference,
    on ragged shapes with rows of every slot and rows without one."""
    from quadapt.kernels import cpu, reference

    g = torch.Generator().manual_seed(3)
    M, K, N, S, R = 13, 40, 27, 5, 6
    x = torch.randn(M, K, generator=g).to(dtype)
    y = torch.randn(M, N, generator=g).to(dtype)
    a = torch.randn(S, R, K, generator=g).to(dtype)
    b = torch.randn(N, S, R, generator=g).to(dtype).permute(1, 0, 2) if stored_out_first else torch.randn(
        S, N, R, generator=g).to(dtype)
    slots = torch.tensor([0, -1, 4, 2, 2, -1, 1, 3, 0, 4, -1, 3, 1])
    assert_close(cpu.add_lora(y, x, a, b, slots), reference.add_lora(y, x, a, b, slots), dtype)
    assert torch.equal(cpu.add_lora(y, x, a, b, -1), y)
    assert_close(cpu.add_lora(y, x, a, b, 2), reference.add_lora(y, x, a, b, 2), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_cpu_lora_linear_equals_the_reference(dtype, bias):
    """`lora_linear` (base weight stored above the A stack, one GEMM for both on CPU) against its
    reference, per token, for one slot, and for none; the reference is the base linear plus
    `add_lora`, so a wrong split of the stored matrix shows."""
    from quadapt import kernels
    from quadapt.kernels import cpu, reference

    g = torch.Generator().manual_seed(4)
    M, K, N, S, R = 11, 40, 27, 3, 6
    x = torch.randn(M, K, generator=g).to(dtype)
    weight_and_a = torch.randn(N + S * R, K, generator=g).to(dtype)
    b = torch.randn(N, S, R, generator=g).to(dtype).permute(1, 0, 2)
    bias_ = torch.randn(N, generator=g).to(dtype) if bias else None
    base = torch.nn.functional.linear(x, weight_and_a[:N], bias_)
    slots = torch.tensor([0, -1, 2, 2, 1, -1, 0, 1, 2, 0, -1])
    expected = reference.lora_linear(x, weight_and_a, bias_, b, slots)
    assert_close(expected, reference.add_lora(base, x, weight_and_a[N:].view(S, R, K), b, slots), dtype)
    assert_close(cpu.lora_linear(x, weight_and_a, bias_, b, slots), expected, dtype)
    assert_close(kernels.lora_linear(x, weight_and_a, bias_, b, slots, backend="cpu"), expected, dtype)
    assert torch.equal(cpu.lora_linear(x, weight_and_a, bias_, b, -1), base)
    assert_close(cpu.lora_linear(x, weight_and_a, bias_, b, 1), reference.lora_linear(x, weight_and_a, bias_, b, 1), dtype)
    assert not torch.allclose(expected.float(), base.float())  # negative control: the slots do add


def test_fused_shrink_equals_the_unfused_layer():
    """`fuse_shrink` (base weight and every slot's A in one matrix, one GEMM for both) gives the
    unfused layer's output, with a bias, for a mixed batch, a batch without slots and a slot
    written after fusing; a base it cannot fuse is refused by name."""
    torch.manual_seed(5)
    base = nn.Linear(16, 24, bias=True)
    mapping = SlotMapping(3)
    plain = LoRALinear(base, mapping, max_rank=8, backend="cpu")
    fused = LoRALinear(nn.Linear(16, 24, bias=True), mapping, max_rank=8, backend="cpu")
    fused.base.load_state_dict(base.state_dict())
    adapters = [random_lora(24, 16, r) for r in (8, 2, 5)]
    for slot, w in enumerate(adapters[:2]):
        plain.set_slot(slot, w)
        fused.set_slot(slot, w)
    fused.fuse_shrink()
    # A is a view of the fused matrix's rows under the base weight, so set_slot writes land in it.
    assert fused.lora_a.data_ptr() == fused.fused_weight[24:].data_ptr()
    assert fused.base.weight.data_ptr() == fused.fused_weight.data_ptr()
    plain.set_slot(2, adapters[2])
    fused.set_slot(2, adapters[2])  # lands in the fused matrix
    x = torch.randn(5, 16)
    mapping.set(torch.tensor([2, NO_SLOT, 0, 1, 2]))
    assert_close(fused(x), plain(x))
    mapping.set(NO_SLOT)
    assert_close(fused(x), base(x))
    mapping.set(torch.tensor([NO_SLOT] * 5))
    assert_close(fused(x), base(x))
    assert torch.equal(fused.state_dict()["lora_a"], plain.state_dict()["lora_a"])

    with pytest.raises(InvalidParameterError, match="fuse_shrink needs a float nn.Linear"):
        LoRALinear(nn.Linear(16, 24), mapping, max_rank=8, backend="reference").fuse_shrink()
