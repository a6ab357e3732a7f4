"""QLoRA training on tiny random models: the frozen-base autograd against autograd through the
dequantized float weights, LoftQ's start, what changes in a step, the loss going down, and an
interrupted run resumed exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.model.fused import checkpoint_module
from quadapt.train.autograd import frozen_quant_matmul
from quadapt.train.command import quantize_in_memory
from quadapt.train.data import Example, collate
from quadapt.train.forward import completion_loss, hidden_states
from quadapt.train.lora import QLoRALinear, StackedQLoRA, add_lora, lora_parameters
from quadapt.train.loop import TrainConfig, learning_rate, train

from .conftest import assert_close
from .test_model import save_hf_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    # Input sizes 64 and 128: int4 in memory takes convert's group size, which must divide them all.
    _, path = save_hf_model(tmp_path_factory.mktemp("train"), "llama", vocab_size=256, intermediate_size=128)
    return path


def quantized_model(path, scheme: str = "nf4"):
    model = load_model(path)
    floats = quantize_in_memory(model, scheme)
    return model, floats


def dequantized_twin(model: nn.Module) -> nn.Module:
    """The same model with each quantized base replaced by an nn.Linear of its dequantized weight."""
    import copy

    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, (QLoRALinear, StackedQLoRA)) and not isinstance(m.base, nn.Linear):
            linear = nn.Linear(m.in_features, m.out_features, bias=m.base.bias is not None)
            linear.weight = nn.Parameter(m.base.dequantize().detach().clone(), requires_grad=False)
            if m.base.bias is not None:
                linear.bias = nn.Parameter(m.base.bias.detach().clone(), requires_grad=False)
            m.base = linear
    return twin


def examples(n: int, seed: int = 0, vocab: int = 256) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        cut = length // 2
        out.append(Example(ids, [-100] * cut + ids[cut:], i + 1))
    return out


@pytest.mark.parametrize("scheme", ["nf4", "int4"])
@pytest.mark.parametrize("dense", [False, True], ids=["packed", "dense-copy"])
def test_gradients_equal_autograd_through_the_dequantized_weights(float_dir, scheme, dense):
    model, _ = quantized_model(float_dir, scheme)
    modules = add_lora(model, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8)
    for m in modules.values():
        with torch.no_grad():
            m.lora_B.normal_(std=0.1)  # non-zero B, so A's gradient is not zero
        if dense:
            m.keep_dense_copy(torch.float32)
    twin = dequantized_twin(model)
    ids, labels = collate(examples(3), pad_id=0)
    grads = []
    for net in (model, twin):
        net.train()
        torch.manual_seed(0)
        loss, _ = completion_loss(net, ids, labels, checkpointing=True)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in lora_parameters(
            {k: v for k, v in net.named_modules() if isinstance(v, QLoRALinear)}).items()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 6 * 2
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        assert_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.parametrize("scheme", ["nf4", "int4"])
def test_input_gradient_of_the_frozen_matmul(float_dir, scheme):
    model, _ = quantized_model(float_dir, scheme)
    base = checkpoint_module(model, "model.layers.0.mlp.up_proj")
    x = torch.randn(2, 5, base.in_features, requires_grad=True)
    y = frozen_quant_matmul(x, base)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    w = base.dequantize()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = x2 @ w.T
    y2.backward(grad_y)
    assert_close(y, y2)
    assert_close(x.grad, x2.grad)
    assert not any(t.requires_grad for t in base.buffers())


def test_only_lora_parameters_change_and_the_loss_falls(float_dir):
    model, _ = quantized_model(float_dir)
    modules = add_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], rank=4, alpha=8)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    data = examples(8)
    ids, labels = collate(data, pad_id=0)
    with torch.no_grad():
        start = completion_loss(model, ids, labels)
    train(model, modules, data, TrainConfig(steps=12, lr=2e-2, batch_size=8, warmup_steps=1), pad_id=0)
    with torch.no_grad():
        end = completion_loss(model, ids, labels)
    assert end[0] / end[1] < 0.95 * start[0] / start[1], (start, end)
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    lora = {n for n in before if n.endswith((".lora_A", ".lora_B"))}
    assert len(lora) == 2 * 4 * 2 and changed == lora  # every factor moved, nothing else did
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for p in lora_parameters(modules).values()
    )


def test_an_interrupted_run_resumed_follows_the_uninterrupted_one(float_dir, tmp_path):
    data = examples(10)
    config = TrainConfig(steps=6, lr=1e-2, batch_size=3, grad_accum=2, warmup_steps=2, save_every=3)

    def run(out, stop_at=None, resume=False):
        torch.manual_seed(123)  # the same fresh A on every run, as the same seed gives
        model, _ = quantized_model(float_dir)
        modules = add_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8, dropout=0.1)

        class Interrupted(Exception):
            pass

        def on_step(info):
            if info.step == stop_at:
                raise Interrupted

        try:
            result = train(model, modules, data, config, pad_id=0, out_dir=out, resume=resume, on_step=on_step)
        except Interrupted:
            return None
        return result, {n: p.detach().clone() for n, p in lora_parameters(modules).items()}

    whole, whole_params = run(tmp_path / "whole")
    assert run(tmp_path / "cut", stop_at=3) is None
    resumed, resumed_params = run(tmp_path / "cut", resume=True)
    assert [s for s, _ in resumed.losses] == [1, 2, 3, 4, 5, 6]
    for (s1, a), (s2, b) in zip(whole.losses, resumed.losses):
        assert s1 == s2 and math.isclose(a, b, rel_tol=1e-5), (s1, a, b)
    for name, value in whole_params.items():
        assert_close(resumed_params[name], value, msg=name)


def test_resuming_another_runs_state_names_what_differs_by_flag(float_dir, tmp_path):
    from quadapt.runtime.errors import InvalidParameterError

    model, _ = quantized_model(float_dir)
    modules = add_lora(model, ["q_proj"], rank=2, alpha=4)
    data = examples(4)
    train(model, modules, data, TrainConfig(steps=2, lr=1e-2, batch_size=2), pad_id=0, out_dir=tmp_path)
    with pytest.raises(InvalidParameterError, match=r"another run \(--lr \(lr\) was 0.01, now 0.02\); resume with"):
        train(model, modules, data, TrainConfig(steps=2, lr=2e-2, batch_size=2), pad_id=0, out_dir=tmp_path, resume=True)
    with pytest.raises(InvalidParameterError, match=r"training examples were 4, now 3"):
        train(model, modules, data[:3], TrainConfig(steps=2, lr=1e-2, batch_size=2), pad_id=0, out_dir=tmp_path,
              resume=True)


def test_loftq_start_lowers_the_quantized_models_perplexity(tmp_path):
    # Larger weights than the default init: a peaked model, whose quantization error shows.
    _, path = save_hf_model(tmp_path, "llama", vocab_size=256, initializer_range=0.2)
    reference = load_model(path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # text the float model finds likely: its own samples
        ids = torch.randint(3, 256, (4, 1), generator=g)
        for _ in range(40):
            probs = torch.softmax(reference(ids)[:, -1].float(), -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    labels = ids.clone()

    def perplexity(model):
        with torch.no_grad():
            loss, n = completion_loss(model, ids, labels)
        return math.exp(float(loss) / n)

    plain, _ = quantized_model(path)
    add_lora(plain, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], rank=8, alpha=16)
    loftq, floats = quantized_model(path)
    modules = add_lora(loftq, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                       rank=8, alpha=16)
    errors = [m.loftq_init(floats[n]) for n, m in modules.items()]
    assert all(0 < e < 1 for e in errors)
    ppl_float, ppl_plain, ppl_loftq = perplexity(reference), perplexity(plain), perplexity(loftq)
    assert ppl_float < ppl_plain, (ppl_float, ppl_plain)
    assert ppl_loftq < ppl_plain, (ppl_loftq, ppl_plain)


def test_training_forward_equals_the_inference_forward(float_dir):
    model, _ = quantized_model(float_dir)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert_close(model.lm_head(hidden_states(model, ids)), model(ids))


def test_the_int4_base_is_what_convert_writes(tmp_path):
    """The base quantized in memory holds the packed tensors of `quadapt convert`'s checkpoint, group
    size included: the largest of 128, 64, 32 that divides every input size (here 128)."""
    from quadapt.converters.convert import convert_checkpoint
    from quadapt.runtime.errors import InvalidParameterError
    from quadapt.runtime.model.quant import PackedIntLinear

    _, path = save_hf_model(tmp_path, "llama", vocab_size=256, hidden_size=128, intermediate_size=256)
    model, _ = quantized_model(path, "int4")
    converted = load_model(convert_checkpoint(path, tmp_path / "int4", "int4"))
    assert {m.group_size for m in model.modules() if isinstance(m, PackedIntLinear)} == {128}
    expected = converted.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())

    _, odd = save_hf_model(tmp_path / "odd", "llama", vocab_size=256)  # input sizes 64 and 112
    with pytest.raises(InvalidParameterError, match=r"--quantize int4: no int4 group size .* or use --quantize nf4"):
        quantized_model(odd, "int4")


def test_learning_rate_warms_up_then_decays_to_zero():
    rates = [learning_rate(s, 10, 1.0, 2) for s in range(10)]
    assert rates[0] == 0.5 and rates[1] == 1.0 and rates[2] == 1.0
    assert all(a >= b for a, b in zip(rates[1:], rates[2:])) and rates[-1] < 0.05
