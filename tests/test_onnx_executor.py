"""The engine on onnxruntime (`OnnxExecutor`), chosen by `EngineArgs.executor` / `--executor`.

The engine's own tests (`test_engine.py`) run on both executors against the reference generator;
here: the ONNX executor's greedy output equals the edge runtime's (`run-onnx`) for each adapter
with the same export settings, the export is built once and cached under a content hash, slot
writes go into the bound stacks (one session for the engine's life), and the mistakes a user can
make choosing the executor are named.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

import quadapt  # noqa: E402
from quadapt import cli  # noqa: E402
from quadapt.converters.convert import convert_checkpoint  # noqa: E402
from quadapt.converters.onnx_export import export_onnx  # noqa: E402
from quadapt.runtime.edge.generate import generate_ids  # noqa: E402
from quadapt.runtime.edge.model import EdgeModel  # noqa: E402
from quadapt.runtime.engine import onnx_setup  # noqa: E402
from quadapt.runtime.engine.args import EngineArgs, build_engine  # noqa: E402
from quadapt.runtime.engine.onnx_executor import OnnxExecutor  # noqa: E402
from quadapt.runtime.engine.sampling import SamplingParams  # noqa: E402
from quadapt.runtime.errors import AdapterError, InvalidParameterError, UnsupportedError  # noqa: E402
from quadapt.runtime.text.sampling_params import SamplingParams as TextSamplingParams  # noqa: E402
from quadapt.runtime.text.tokenizer import Tokenizer  # noqa: E402

from .test_adapters import make_peft_adapter  # noqa: E402
from .test_model import save_hf_model  # noqa: E402
from .test_tokenizer import build_chatml_dir  # noqa: E402

quadapt._register_serving_exporter()  # as quadapt.LLM and the command line do
KV = 2 * 2**20
GREEDY = dict(temperature=0.0, max_new_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(float base, its int4 checkpoint, adapters "a" and "b" of different ranks and targets)."""
    root = tmp_path_factory.mktemp("onnx-executor")
    _, path = save_hf_model(root / "base", "llama", vocab_size=512, intermediate_size=128)
    base = build_chatml_dir(path)
    a = make_peft_adapter(base, root / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    b = make_peft_adapter(base, root / "b", seed=2, r=8, lora_alpha=16, target_modules=["o_proj", "gate_proj", "up_proj"])
    return base, convert_checkpoint(base, root / "int4", "int4", group_size=32), {"a": str(a), "b": str(b)}


def run(engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


@pytest.mark.parametrize(
    "first_capacity, lora_path", [(256, None), (2, None), (256, "gather"), (256, "masked")],
    ids=["room", "lanes-grow", "gather-only", "masked-only"],
)
def test_greedy_equals_the_edge_runtime_for_each_adapter(tiny, tmp_path, monkeypatch, first_capacity, lora_path):
    """The engine's export (int8 compute, int8 head: the defaults of both) against `export-onnx`
    with the same settings, run by the edge runtime one request at a time; the engine runs the
    three together, with a fourth base request, in one batch. With lanes of 2 positions at first,
    they grow (keeping what they hold) several times during the run. The executor's own choice of
    LoRA path per step uses all three (base, gather, masked); each adapter path alone, forced for
    every step, base rows included, gives the same tokens."""
    from quadapt.runtime.engine import onnx_executor

    monkeypatch.setattr(onnx_executor, "_FIRST_CAPACITY", first_capacity)
    chosen = []
    choose = OnnxExecutor._path

    def path(self, entries):
        chosen.append(lora_path or choose(self, entries))
        return chosen[-1]

    monkeypatch.setattr(OnnxExecutor, "_path", path)
    _, checkpoint, adapters = tiny
    engine, tokenizer, _ = build_engine(
        EngineArgs(model=str(checkpoint), adapters=adapters, executor="onnx", kv_cache_bytes=KV, threads=1, max_loras=2)
    )
    assert isinstance(engine.executor, OnnxExecutor)
    edge = EdgeModel(export_onnx(checkpoint, tmp_path / "edge", adapters=adapters), threads=1)
    prompts = {None: "the sea is calm tonight", "a": "a b c d e f", "b": "once upon a time", "base2": "hello"}
    ids = {name: tokenizer.encode(text) for name, text in prompts.items()}
    for name, prompt in ids.items():
        engine.add_request(prompt, SamplingParams(**GREEDY), adapter=name if name in adapters else None,
                           request_id=str(name))
    got = run(engine)
    for name, prompt in ids.items():
        adapter = name if name in adapters else None
        expected = list(generate_ids(edge, prompt, TextSamplingParams(**GREEDY), set(), adapter))
        assert got[str(name)] == expected, name
    assert got["a"] != got["None"] or got["b"] != got["None"]  # the adapters do something
    assert set(chosen) == ({lora_path} if lora_path else {"base", "gather", "masked"})
    assert engine.allocator.num_used == 0 and engine.executor.lanes_used == 0
    assert engine.executor.capacity >= max(len(p) for p in ids.values()) + GREEDY["max_new_tokens"]


def test_the_export_is_cached_under_a_content_hash(tiny, monkeypatch):
    _, checkpoint, _ = tiny
    built = []
    real = onnx_setup._exporter

    def counting(*args, **kwargs):
        built.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_setup, "_exporter", counting)
    args = EngineArgs(model=str(checkpoint), executor="onnx", kv_cache_bytes=KV, max_loras=2, max_lora_rank=4)
    first, _, _ = build_engine(args)
    second, _, _ = build_engine(args)
    assert first.executor.path == second.executor.path and first.executor.path.parent == checkpoint / ".quadapt"
    other, _, _ = build_engine(EngineArgs(model=str(checkpoint), executor="onnx", kv_cache_bytes=KV, max_loras=3,
                                          max_lora_rank=4))
    assert other.executor.path != first.executor.path  # other slots, another export
    assert len(built) <= 2 and len(set(built)) == len(built)
    # A changed checkpoint is exported again.
    config = checkpoint / "generation_config.json"
    original = config.read_text() if config.exists() else None
    try:
        config.write_text(json.dumps({"eos_token_id": 2, "note": "changed"}))
        changed, _, _ = build_engine(args)
        assert changed.executor.path != first.executor.path
    finally:
        config.unlink()
        if original is not None:
            config.write_text(original)


def test_engines_starting_together_build_the_export_once(tiny, monkeypatch):
    """Replicas of a server start at once on one machine: one builds the export, the others wait
    for it and take it (none replaces it under another's session)."""
    import threading
    import time

    _, checkpoint, _ = tiny
    built = []
    real = onnx_setup._exporter

    def slow(*args, **kwargs):
        built.append(args[1])
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_setup, "_exporter", slow)
    paths = []
    starts = [threading.Thread(target=lambda: paths.append(onnx_setup.serving_export(
        checkpoint, num_slots=5, max_rank=2, bits=4))) for _ in range(3)]
    for thread in starts:
        thread.start()
    for thread in starts:
        thread.join()
    assert len(built) == 1 and len(paths) == 3 and len(set(paths)) == 1
    assert (paths[0] / onnx_setup.SERVING_MANIFEST).is_file()


def test_adapters_load_into_the_bound_stacks_without_a_new_session(tiny, monkeypatch):
    _, checkpoint, adapters = tiny
    engine, tokenizer, _ = build_engine(
        EngineArgs(model=str(checkpoint), executor="onnx", kv_cache_bytes=KV, max_loras=1, max_lora_rank=8, threads=1)
    )
    import onnxruntime as ort

    sessions = []
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: sessions.append(a))
    prompt = tokenizer.encode("the sea is calm tonight")
    outputs = {}
    for name in ("a", "b", "a"):  # one slot: each load evicts the other adapter
        engine.adapters.load(name, adapters[name])
        engine.add_request(prompt, SamplingParams(**GREEDY), adapter=name, request_id="r")
        outputs.setdefault(name, []).append(run(engine)["r"])
        engine.adapters.unload(name)
    assert outputs["a"][0] == outputs["a"][1] and outputs["a"][0] != outputs["b"][0]
    assert not sessions and engine.adapters.stats.slot_loads == 3
    monkeypatch.undo()
    small, _, _ = build_engine(EngineArgs(model=str(checkpoint), executor="onnx", kv_cache_bytes=KV, max_lora_rank=4))
    with pytest.raises(AdapterError, match="rank 8, above the slots' max rank 4"):
        small.adapters.load("b", adapters["b"])


def test_choosing_the_executor_names_the_mistakes(tiny, monkeypatch, capsys):
    base, checkpoint, _ = tiny
    with pytest.raises(InvalidParameterError, match="executor must be one of auto, torch, onnx"):
        EngineArgs(model=str(base), executor="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(UnsupportedError, match=r"packed int4/int8.*quadapt convert --model .* --scheme int4"):
        build_engine(EngineArgs(model=str(base), executor="onnx", kv_cache_bytes=KV))
    with pytest.raises(UnsupportedError, match=r"runs on the CPU.*--executor torch"):
        build_engine(EngineArgs(model=str(checkpoint), executor="onnx", device="cuda", kv_cache_bytes=KV))
    with pytest.raises(InvalidParameterError, match="computes in float32"):
        build_engine(EngineArgs(model=str(checkpoint), executor="onnx", dtype="bfloat16", kv_cache_bytes=KV))
    monkeypatch.setattr(onnx_setup, "onnx_available", lambda: False)
    with pytest.raises(UnsupportedError, match=r"pip install 'quadapt\[onnx\]'"):
        build_engine(EngineArgs(model=str(checkpoint), executor="onnx", kv_cache_bytes=KV))
    # Without the extra, auto is the torch executor; asked for by name, onnx says what to install.
    engine, _, _ = build_engine(EngineArgs(model=str(checkpoint), kv_cache_bytes=KV))
    assert type(engine.executor).__name__ == "TorchExecutor"
    requests = checkpoint.parent / "requests.jsonl"
    requests.write_text(json.dumps({"prompt": "hi", "max_new_tokens": 2}) + "\n")
    assert cli.main(["batch", "--model", str(checkpoint), "--executor", "onnx", "--kv-cache-memory", "2MiB",
                     "--input", str(requests), "--output", str(checkpoint.parent / "out.jsonl")]) != 0
    assert "pip install 'quadapt[onnx]'" in capsys.readouterr().err


def test_auto_is_onnx_for_a_packed_checkpoint_on_the_cpu(tiny, tmp_path, capsys):
    """`executor="auto"` (the default): the ONNX executor for a packed int4 checkpoint on the CPU in
    float32, the torch executor for a float checkpoint or another dtype; `quadapt generate` (no
    flag) on the int4 checkpoint gives `run-onnx`'s greedy text for an export of the same settings."""
    base, checkpoint, _ = tiny
    choices = {
        "int4": build_engine(EngineArgs(model=str(checkpoint), kv_cache_bytes=KV))[0],
        "float": build_engine(EngineArgs(model=str(base), kv_cache_bytes=KV))[0],
        "int4 bfloat16": build_engine(EngineArgs(model=str(checkpoint), dtype="bfloat16", kv_cache_bytes=KV))[0],
    }
    assert {name: type(e.executor).__name__ for name, e in choices.items()} == {
        "int4": "OnnxExecutor", "float": "TorchExecutor", "int4 bfloat16": "TorchExecutor"}
    loaded = quadapt.load(checkpoint, kv_cache_bytes=KV)
    assert loaded.model is None and isinstance(loaded._llm.engine.executor, OnnxExecutor)

    capsys.readouterr()
    assert cli.main(["generate", "--model", str(checkpoint), "--prompt", "once upon a time", "--max-new-tokens", "8",
                     "--ignore-eos", "--temperature", "0", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    edge = EdgeModel(export_onnx(checkpoint, tmp_path / "edge"), threads=1)
    tokenizer = Tokenizer.from_dir(checkpoint)
    params = TextSamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    expected = tokenizer.decode(list(generate_ids(edge, tokenizer.encode("once upon a time"), params, set(), None)))
    assert text == expected + "\n"


def test_batch_on_the_onnx_executor(tiny, tmp_path):
    _, checkpoint, adapters = tiny
    requests, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": str(i), "prompt": "hi there", "adapter": name, "max_new_tokens": 3, "temperature": 0}
             for i, name in enumerate(["a", None, "b"])]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert cli.main(["batch", "--model", str(checkpoint), "--executor", "onnx", "--adapter", f"a={adapters['a']}",
                     "--adapter", f"b={adapters['b']}", "--kv-cache-memory", "2MiB", "--threads", "1",
                     "--input", str(requests), "--output", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["usage"]["completion_tokens"] for r in rows] == [3, 3, 3]
    assert quadapt.__name__ == "quadapt"


def test_async_streams_hot_load_and_cancellation_on_the_onnx_executor(tiny, tmp_path):
    """`quadapt.AsyncLLM(..., executor="onnx")`: streams run together, an adapter loaded while
    they stream serves the next request, and a stream left early frees its blocks and KV lane."""
    import asyncio

    from quadapt.runtime.text.sampling_params import SamplingParams as Params

    _, checkpoint, adapters = tiny
    params = Params(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    long = Params(max_new_tokens=200, temperature=0.0, ignore_eos=True)
    alone = quadapt.LLM(checkpoint, executor="onnx", adapters=adapters, kv_cache_bytes=KV, threads=1)
    expected = {name: alone.generate(["hello world"], params, adapter=name)[0].text for name in (None, "a", "b")}

    async def collect(llm, adapter=None) -> str:
        return "".join([d.text async for d in llm.stream("hello world", params, adapter=adapter)])

    async def cancel_early(llm) -> int:
        seen = 0
        async for _ in llm.stream("a long one", long):
            seen += 1
            if seen == 3:
                break  # the consumer goes away: the request is aborted
        return seen

    async def main(llm):
        async with llm:
            first = await asyncio.gather(collect(llm), collect(llm, "a"), cancel_early(llm))
            llm.load_adapter("b", adapters["b"])
            return [*first, await collect(llm, "b")]

    llm = quadapt.AsyncLLM(checkpoint, executor="onnx", adapters={"a": adapters["a"]}, kv_cache_bytes=KV, threads=1)
    plain, adapted, seen, late = asyncio.run(main(llm))
    assert seen == 3
    assert (plain, adapted, late) == (expected[None], expected["a"], expected["b"])
    assert llm.engine.allocator.num_used == 0 and llm.engine.executor.lanes_used == 0
