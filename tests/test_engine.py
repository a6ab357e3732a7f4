"""The batching engine against the reference generator, request by request.

Every request in a mixed batch (three adapters and the base model, rows of different lengths, a
prompt long enough to be chunked) must produce the tokens it produces alone through
`generate_ids` with its adapter applied. Cancellation and preemption are checked through the
block allocator's accounting; adapter loading and unloading while requests run through their
outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from quadapt.runtime.checkpoints.adapters import apply_adapter
from quadapt.runtime.engine.engine import Engine, EngineConfig
from quadapt.runtime.errors import AdapterError, ContextLengthError, InvalidParameterError
from quadapt.runtime.api.generate import generate_ids
from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.engine.registry import AdapterInUseError, AdapterNotFoundError
from quadapt.runtime.engine.sampling import SamplingParams

from .test_adapters import VOCAB, make_base, make_peft_adapter
from .test_model import save_hf_model
from .test_tokenizer import build_chatml_dir

GREEDY = dict(temperature=0.0, ignore_eos=True)
ADAPTER_CONFIGS = {
    "a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": LoraConfig(r=8, lora_alpha=16, target_modules=["o_proj", "down_proj", "up_proj"]),
    "c": LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "gate_proj", "q_proj"]),
}
try:
    import onnxruntime  # noqa: F401

    _HAS_ONNX = True
except ImportError:
    _HAS_ONNX = False
EXECUTORS = ["torch", pytest.param("onnx", marks=pytest.mark.skipif(not _HAS_ONNX, reason="needs onnxruntime"))]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("engine-base"))


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Three random, non-zero PEFT adapters of different targets and ranks."""
    root = tmp_path_factory.mktemp("engine-adapters")
    return {name: make_peft_adapter(base, root / name, config=c, seed=i + 1) for i, (name, c) in enumerate(ADAPTER_CONFIGS.items())}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """An int4 checkpoint (group 32) whose every linear MatMulNBits holds bit for bit, and the
    three adapters made on its float base."""
    from quadapt.converters.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("engine-packed")
    _, path = save_hf_model(root, "llama", vocab_size=VOCAB, intermediate_size=128)
    float_base = build_chatml_dir(path)
    adapters = {
        name: make_peft_adapter(float_base, root / name, config=c, seed=i + 1)
        for i, (name, c) in enumerate(ADAPTER_CONFIGS.items())
    }
    return convert_checkpoint(float_base, root / "int4", "int4", group_size=32), adapters


@pytest.fixture(params=EXECUTORS)
def served(request, base, adapters):
    """(checkpoint, adapters, executor): the float base on the torch executor; an int4 checkpoint
    on the ONNX executor, whose export computes in float32 with a float vocabulary projection
    (accuracy level 1, `lm_head="float"`), so both are held to the reference generator's tokens."""
    if request.param == "torch":
        return base, adapters, "torch"
    checkpoint, packed_adapters = request.getfixturevalue("packed")
    return checkpoint, packed_adapters, "onnx"


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 11, 1, 40, 7, 19, 5, 2, 13, 9]
    return [torch.randint(3, VOCAB, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def reference(base, adapter_dir, prompt, params) -> list[int]:
    model = load_model(base)
    if adapter_dir is not None:
        apply_adapter(model, adapter_dir)
    return list(generate_ids(model, prompt, params, eos_token_ids={2}))


def make_engine(base, adapters=None, executor="torch", **config) -> Engine:
    kv_bytes = config.pop("kv_cache_bytes", 4 * 2**20)
    settings = dict(max_num_seqs=8, max_num_batched_tokens=24, max_loras=3, max_lora_rank=8)
    settings.update(config)
    if executor == "onnx":
        engine = onnx_engine(base, EngineConfig(**settings), kv_bytes)
    else:
        engine = Engine.for_model(  # loaded as `build_engine` loads on CPU: packed weights dequantized once
            load_model(base, dequantize=True), eos_token_ids={2}, config=EngineConfig(**settings),
            kv_cache_bytes=kv_bytes, block_size=4,
        )
    for name, path in (adapters or {}).items():
        engine.adapters.load(name, path)
    return engine


def onnx_engine(checkpoint, config: EngineConfig, kv_bytes: int, **export) -> Engine:
    """An engine over the ONNX executor on `checkpoint`'s serving export (float32 compute and
    vocabulary projection unless `export` says otherwise), 4-position blocks."""
    import tempfile

    from quadapt.converters.onnx_serving import export_serving
    from quadapt.runtime.checkpoints import open_checkpoint
    from quadapt.runtime.checkpoints.peft_fit import BaseModules
    from quadapt.runtime.engine.onnx_executor import OnnxExecutor
    from quadapt.runtime.engine.paged_cache import blocks_for_budget

    reader = open_checkpoint(checkpoint)
    model_config = load_model(reader).config
    settings = {"accuracy_level": 1, "lm_head": "float", **export}
    out = export_serving(
        checkpoint, Path(tempfile.mkdtemp(prefix="serving-", dir=Path(checkpoint).parent)) / "export",
        num_slots=config.max_loras, max_rank=config.max_lora_rank, **settings,
    )
    executor = OnnxExecutor(
        out, model_config, num_blocks=blocks_for_budget(model_config, kv_bytes, 4, torch.float32), block_size=4,
        max_num_seqs=config.max_num_seqs, threads=1,
    )
    base = BaseModules.of_checkpoint(reader) if config.max_loras else None
    return Engine(executor, eos_token_ids={2}, config=config, base=base)


def run(engine: Engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def test_mixed_batch_equals_each_request_alone(served):
    """8 requests, three adapters and the base, different lengths, a 40-token prompt chunked by a
    24-token step budget: each yields what the reference generator yields for it alone."""
    base, adapters, executor = served
    engine = make_engine(base, adapters, executor)
    names = ["a", None, "b", "c", "a", None, "b", "c"]
    params = SamplingParams(max_new_tokens=10, **GREEDY)
    requests = {}
    for i, (prompt, name) in enumerate(zip(prompts(8), names)):
        requests[engine.add_request(prompt, params, adapter=name, request_id=f"r{i}")] = (prompt, name)
    got = run(engine)
    for rid, (prompt, name) in requests.items():
        expected = reference(base, adapters[name] if name else None, prompt, params)
        assert got[rid] == expected, f"{rid} (adapter {name})"
    assert engine.allocator.num_used == 0


def test_adapters_change_the_output(base, adapters):
    """Negative control: the comparison above would pass vacuously if adapters did nothing."""
    prompt, params = prompts(1)[0], SamplingParams(max_new_tokens=10, **GREEDY)
    outputs = {name: reference(base, adapters.get(name), prompt, params) for name in ("a", "b", None)}
    assert len({tuple(v) for v in outputs.values()}) == 3


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(base, adapters):
    engine = make_engine(base, adapters)
    sampled = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    penalized = SamplingParams(max_new_tokens=8, temperature=0.7, repetition_penalty=1.3, seed=7, ignore_eos=True)
    ps = prompts(6, seed=3)
    engine.add_request(ps[0], sampled, adapter="b", request_id="seeded")
    engine.add_request(ps[1], penalized, request_id="penalized")
    for i, prompt in enumerate(ps[2:]):
        engine.add_request(prompt, SamplingParams(max_new_tokens=6, temperature=1.0, seed=i), adapter="a")
    got = run(engine)
    assert got["seeded"] == reference(base, adapters["b"], ps[0], sampled)
    assert got["penalized"] == reference(base, None, ps[1], penalized)


def test_requests_join_mid_flight_and_cancel_frees_blocks(served):
    base, adapters, executor = served
    engine = make_engine(base, adapters, executor)
    params = SamplingParams(max_new_tokens=12, **GREEDY)
    ps = prompts(4, seed=5)
    engine.add_request(ps[0], params, adapter="a", request_id="first")
    engine.add_request(ps[1], params, request_id="cancelled")
    tokens: dict[str, list[int]] = {}
    for _ in range(3):
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    used = engine.allocator.num_used
    assert engine.abort("cancelled")
    assert engine.allocator.num_used < used  # freed at once, not at the next step
    if executor == "onnx":
        assert engine.executor.lanes_used == 1  # its KV lane too
    engine.add_request(ps[2], params, adapter="c", request_id="late")
    for rid, new in run(engine).items():
        tokens.setdefault(rid, []).extend(new)
    assert engine.allocator.num_used == 0
    assert executor != "onnx" or engine.executor.lanes_used == 0
    assert tokens["first"] == reference(base, adapters["a"], ps[0], params)
    assert tokens["late"] == reference(base, adapters["c"], ps[2], params)
    assert not engine.abort("cancelled")  # already gone


def test_tiny_kv_budget_preempts_and_every_request_completes(served):
    # 12 blocks of 4 positions: three requests of up to 4 blocks each fit, eight do not.
    from quadapt.runtime.engine.paged_cache import bytes_per_block

    base, adapters, executor = served
    model = load_model(base)
    per_block = bytes_per_block(model.config, 4, torch.float32)
    engine = make_engine(base, adapters, executor, kv_cache_bytes=12 * per_block)
    params = SamplingParams(max_new_tokens=10, **GREEDY)
    ps = [p[:6] for p in prompts(8, seed=9)]
    names = ["a", None, "b", "c", None, "a", "b", None]
    for i, (prompt, name) in enumerate(zip(ps, names)):
        engine.add_request(prompt, params, adapter=name, request_id=f"r{i}")
    got = run(engine)
    assert engine.scheduler.num_preemptions > 0
    assert engine.allocator.num_used == 0
    for i, (prompt, name) in enumerate(zip(ps, names)):
        assert got[f"r{i}"] == reference(base, adapters[name] if name else None, prompt, params), f"r{i}"


def test_loading_an_adapter_while_requests_run_changes_nothing(served):
    base, adapters, executor = served
    params = SamplingParams(max_new_tokens=8, **GREEDY)
    ps = prompts(8, seed=11)
    names = ["a", "b", None, "a", "b", None, "a", "b"]
    quiet = make_engine(base, {"a": adapters["a"], "b": adapters["b"]}, executor)
    for i, (p, n) in enumerate(zip(ps, names)):
        quiet.add_request(p, params, adapter=n, request_id=str(i))
    expected = run(quiet)

    busy = make_engine(base, {"a": adapters["a"], "b": adapters["b"]}, executor, max_loras=2)
    for i, (p, n) in enumerate(zip(ps, names)):
        busy.add_request(p, params, adapter=n, request_id=str(i))
    got: dict[str, list[int]] = {}
    for step in range(4):
        for out in busy.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        if step == 1:
            busy.adapters.load("c", adapters["c"])  # while 8 requests stream
            busy.adapters.load("a", adapters["c"])  # a new version of a name in use: running ones keep theirs
    for rid, new in run(busy).items():
        got.setdefault(rid, []).extend(new)
    assert got == expected


def test_unload_in_use_is_refused_and_unknown_adapter_is_an_error(base, adapters):
    engine = make_engine(base, adapters)
    params = SamplingParams(max_new_tokens=4, **GREEDY)
    engine.add_request(prompts(1)[0], params, adapter="a", request_id="x")
    engine.step()
    with pytest.raises(AdapterInUseError, match="'a' is used by 1 unfinished request"):
        engine.adapters.unload("a")
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'nope'.*loaded adapters: a, b, c"):
        engine.add_request([5, 6], params, adapter="nope")
    assert isinstance(AdapterNotFoundError("x"), AdapterError)
    run(engine)
    engine.adapters.unload("a")  # free once its request finished
    with pytest.raises(AdapterNotFoundError):
        engine.add_request([5, 6], params, adapter="a")


def test_bad_requests_are_clear_errors(base):
    engine = make_engine(base, max_loras=0)
    params = SamplingParams(max_new_tokens=4, **GREEDY)
    with pytest.raises(InvalidParameterError, match="empty"):
        engine.add_request([], params)
    with pytest.raises(InvalidParameterError, match="outside the model's vocabulary"):
        engine.add_request([VOCAB + 5], params)
    with pytest.raises(ContextLengthError, match="leaves no room"):
        engine.add_request([5] * engine.executor.config.max_position_embeddings, params)
    with pytest.raises(InvalidParameterError, match="serves no adapters"):
        engine.add_request([5], params, adapter="a")
    engine.add_request([5], params, request_id="dup")
    with pytest.raises(InvalidParameterError, match="already in use"):
        engine.add_request([5], params, request_id="dup")


def test_metrics_follow_the_requests(base, adapters):
    engine = make_engine(base, adapters)
    params = SamplingParams(max_new_tokens=5, **GREEDY)
    for i, name in enumerate(["a", "a", None, "b"]):
        engine.add_request(prompts(4, seed=13)[i], params, adapter=name)
    before = engine.metrics()
    assert (before.waiting, before.running) == (4, 0)
    assert before.waiting_per_adapter == {"a": 2, "": 1, "b": 1}
    engine.step()
    during = engine.metrics()
    assert during.running == 4 and during.running_per_adapter == {"a": 2, "": 1, "b": 1}
    assert during.kv_blocks_used > 0 and during.adapter_slot_loads == 2
    run(engine)
    after = engine.metrics()
    assert after.requests_finished == 4 and after.generation_tokens == 20
    assert after.kv_blocks_used == 0 and after.waiting == after.running == 0
    assert len(after.time_to_first_token_s) == 4 and len(after.inter_token_latency_s) == 16
    assert after.prompt_tokens == sum(len(p) for p in prompts(4, seed=13))


def _layout(engine: Engine) -> dict[str, object]:
    """Every module's type and every tensor's dtype, shape and strides in the engine's model."""
    model = engine.executor.model
    layout: dict[str, object] = {name: type(m).__name__ for name, m in model.named_modules()}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        layout[name] = (t.dtype, tuple(t.shape), t.stride())
    return layout


@pytest.mark.parametrize("scheme", ["int4", "nf4"])
def test_a_quantized_checkpoint_runs_the_float_engines_kernels_on_cpu(base, adapters, tmp_path, scheme):
    """On CPU `build_engine` loads packed weights dequantized once, at start: the quantized engine's
    modules and tensors are laid out as the float engine's, so both run the same matmuls and a
    competing process slows both alike (benchmarks/engine.py --cpu-contention measures it). Its
    tokens, with and without an adapter, are the reference generator's on the packed checkpoint."""
    from quadapt.converters.convert import convert_checkpoint

    # int4: down_proj's 112 inputs take no allowed group size, so it stays float; nf4 packs every linear.
    options = dict(group_size=32, keep=["down_proj"]) if scheme == "int4" else {}
    quantized = convert_checkpoint(base, tmp_path / scheme, scheme, **options)
    engine = make_engine(quantized, adapters)
    assert _layout(engine) == _layout(make_engine(base, adapters))
    params = SamplingParams(max_new_tokens=8, **GREEDY)
    requests = {}
    for i, (prompt, name) in enumerate(zip(prompts(4), ["a", None, "b", None])):
        requests[engine.add_request(prompt, params, adapter=name, request_id=f"r{i}")] = (prompt, name)
    got = run(engine)
    for rid, (prompt, name) in requests.items():
        assert got[rid] == reference(quantized, adapters[name] if name else None, prompt, params), f"{rid} (adapter {name})"
