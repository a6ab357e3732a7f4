"""Text around the engine: many prompts at once, stop strings, async streaming and cancellation.

Each request's text must equal what the reference text generator gives it alone.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from peft import LoraConfig

from quadapt.runtime.checkpoints.adapters import apply_adapter
from quadapt.runtime.checkpoints import open_checkpoint
from quadapt.runtime.engine.engine import Engine, EngineConfig
from quadapt.runtime.errors import EngineDeadError, InvalidParameterError, RequestFailedError
from quadapt.runtime.api.generate import generate_text
from quadapt.runtime.api.async_llm import AsyncLLM
from quadapt.runtime.api.llm import LLM, GenerateRequest
from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.engine.sampling import SamplingParams
from quadapt.runtime.text.tokenizer import Tokenizer

from .conftest import fails_on_call
from .test_adapters import make_base, make_peft_adapter


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("llm-base"))


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return make_peft_adapter(base, tmp_path_factory.mktemp("llm-adapter") / "a", config=config, seed=3)


@pytest.fixture(scope="module")
def tokenizer(base) -> Tokenizer:
    return Tokenizer.from_files(open_checkpoint(base).tokenizer_files())


def make_engine(base, adapter=None) -> Engine:
    engine = Engine.for_model(
        load_model(base), eos_token_ids={2}, config=EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, max_loras=2,
                                                                  max_lora_rank=8),
        kv_cache_bytes=4 * 2**20, block_size=4,
    )
    if adapter is not None:
        engine.adapters.load("a", adapter)
    return engine


def reference_text(base, adapter, tokenizer, prompt, params) -> tuple[str, str | int | None]:
    model = load_model(base)
    if adapter is not None:
        apply_adapter(model, adapter)
    generation = generate_text(model, tokenizer, tokenizer.encode_prompt(prompt), params)
    text = "".join(generation)
    return text, generation.result.stop_reason


def test_many_prompts_equal_the_reference_one_by_one(base, adapter, tokenizer):
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    first = reference_text(base, None, tokenizer, "hello world", greedy)[0]
    stop = first[3:5]  # a stop string the base output is known to contain
    requests = [
        GenerateRequest("hello world", greedy, request_id="plain"),
        GenerateRequest("hello world", SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop]),
                        request_id="stopped"),
        GenerateRequest([{"role": "user", "content": "hi there"}], greedy, adapter="a", request_id="chat"),
        GenerateRequest("the quick brown", SamplingParams(max_new_tokens=9, temperature=0.8, seed=5, ignore_eos=True),
                        adapter="a", request_id="seeded"),
    ]
    llm = LLM.from_engine(make_engine(base, adapter), tokenizer)
    got = {c.request_id: c for c in llm.generate(requests)}
    assert [c.request_id for c in llm.generate(requests[:1])] == ["plain"]
    for r in requests:
        text, stop_reason = reference_text(base, adapter if r.adapter else None, tokenizer, r.prompt, r.params)
        assert got[r.request_id].text == text, r.request_id
    assert got["stopped"].finish_reason == "stop" and got["stopped"].stop_reason == stop
    assert got["stopped"].text == first[:3]
    assert llm.engine.allocator.num_used == 0


def test_bad_prompts_are_refused_before_anything_runs(base, tokenizer):
    llm = LLM.from_engine(make_engine(base), tokenizer)
    with pytest.raises(InvalidParameterError, match="list of messages"):
        llm.generate([GenerateRequest("fine"), GenerateRequest([{"role": "user"}])])
    assert not llm.engine.has_unfinished()  # the good request was taken back too


def test_async_streams_concurrently_and_cancellation_frees_blocks(base, adapter, tokenizer):
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    long = SamplingParams(max_new_tokens=200, temperature=0.0, ignore_eos=True)
    engine = make_engine(base, adapter)

    async def collect(llm: AsyncLLM, prompt, adapter_name=None) -> str:
        return "".join([d.text async for d in llm.stream(prompt, params, adapter=adapter_name)])

    async def cancel_early(llm: AsyncLLM) -> int:
        seen = 0
        async for _ in llm.stream("a long one", long):
            seen += 1
            if seen == 3:
                break  # the consumer goes away: the request is aborted
        return seen

    async def main():
        async with AsyncLLM.from_engine(engine, tokenizer) as llm:
            texts = await asyncio.gather(collect(llm, "hello world"), collect(llm, "hello world", "a"), cancel_early(llm))
            return texts

    plain, adapted, seen = asyncio.run(main())
    assert seen == 3
    assert plain == reference_text(base, None, tokenizer, "hello world", params)[0]
    assert adapted == reference_text(base, adapter, tokenizer, "hello world", params)[0]
    assert engine.allocator.num_used == 0 and not engine.has_unfinished()


def test_a_busy_engine_takes_new_requests_aborts_and_reads_within_one_step(base, tokenizer):
    """Adding, aborting and reading metrics wait at most the step in progress, however long the
    running requests have left (a lock re-taken by the engine thread after every step could keep
    a new request waiting until the running ones had finished). Each step notes the commands
    waiting when it starts and when it ends: none may be seen waiting in two steps."""
    engine = make_engine(base)
    llm = AsyncLLM.from_engine(engine, tokenizer)
    execute = engine.executor.execute
    waited: dict[object, set[int]] = {}  # a command's future -> the steps it was seen waiting in
    steps = 0

    def note(step: int) -> None:
        for _, future in list(llm._commands):
            waited.setdefault(future, set()).add(step)

    def slow(specs):
        nonlocal steps
        steps += 1
        note(steps)
        time.sleep(0.01)
        out = execute(specs)
        note(steps)
        return out

    engine.executor.execute = slow
    long = SamplingParams(max_new_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        async with llm:
            running = [llm.stream(f"running {i}", long) for i in range(2)]
            for stream in running:
                await anext(stream)
            for i in range(5):
                stream = llm.stream(f"new {i}", long)
                await anext(stream)
                await asyncio.to_thread(llm.metrics)
                await stream.aclose()  # aborts it
            for stream in running:
                await stream.aclose()

    asyncio.run(main())
    assert waited, "no command was seen waiting: the check saw nothing"
    assert max(len(seen) for seen in waited.values()) == 1, sorted(map(sorted, waited.values()))
    assert engine.allocator.num_used == 0 and not engine.has_unfinished()


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(base, tokenizer):
    engine = make_engine(base)
    engine.executor.execute = fails_on_call(engine.executor.execute, 3, "out of memory (injected)")
    params = SamplingParams(max_new_tokens=50, temperature=0.0, ignore_eos=True)

    async def main():
        async with AsyncLLM.from_engine(engine, tokenizer) as llm:
            with pytest.raises(RequestFailedError, match=r"engine step running this request failed \(RuntimeError\)"):
                async for _ in llm.stream("hello", params):
                    pass
            deltas = [d async for d in llm.stream("after", SamplingParams(max_new_tokens=4, ignore_eos=True))]
            assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 4
            return llm.metrics()

    metrics = asyncio.run(main())
    assert (metrics.requests_failed, metrics.requests_finished, metrics.kv_blocks_used) == (1, 1, 0)


def test_an_engine_thread_that_stops_ends_every_stream_with_the_error(base, tokenizer):
    engine = make_engine(base)
    engine.scheduler.schedule = fails_on_call(engine.scheduler.schedule, 3, "scheduler bug (injected)")
    params = SamplingParams(max_new_tokens=50, temperature=0.0, ignore_eos=True)
    seen: list[BaseException] = []

    async def main():
        async with AsyncLLM.from_engine(engine, tokenizer) as llm:
            llm.add_failure_callback(seen.append)
            with pytest.raises(EngineDeadError, match=r"engine stopped after an error.*scheduler bug \(injected\)"):
                async for _ in llm.stream("hello", params):
                    pass
            with pytest.raises(EngineDeadError, match="engine stopped after an error"):
                await anext(llm.stream("after", params))  # refused, not left waiting
            assert llm.failed is seen[0]
            return llm.metrics()  # still answers, on the caller's thread

    assert asyncio.run(main()).requests_aborted == 1
    assert [str(e) for e in seen] == ["scheduler bug (injected)"]


def test_streaming_before_start_is_refused(base, tokenizer):
    llm = AsyncLLM.from_engine(make_engine(base), tokenizer)
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    with pytest.raises(RuntimeError, match=r"not running .*start\(\) it first"):
        asyncio.run(anext(llm.stream("hello", params)))
    assert not llm.engine.has_unfinished()


def test_completions_come_in_the_order_given_with_some_ids_unset(base, tokenizer):
    greedy = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    llm = LLM.from_engine(make_engine(base), tokenizer)
    requests = [GenerateRequest("a b c d e f", greedy, request_id="named"), GenerateRequest("hi", greedy),
                GenerateRequest("x", SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True))]
    completions = llm.generate(requests)
    assert completions[0].request_id == "named" and completions[0].completion_tokens == 3
    assert [c.completion_tokens for c in completions] == [3, 3, 1]
    assert len({c.request_id for c in completions}) == 3
