"""`quadapt.LLM` and `quadapt.AsyncLLM`: many prompts at once, each with its own adapter and
sampling, give what `quadapt.load(path, adapter=...).generate(prompt)` gives each alone.

On a tiny random Llama with a ChatML tokenizer and two PEFT adapters of different ranks: a mixed
list equals the one-at-a-time API per prompt, a seed reproduces its single-request output, the
async stream gives `generate`'s text and frees its cache when left early, adapters load and
unload by name, mistakes raise clear errors before anything runs, and `import quadapt` stays cheap.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import quadapt
from quadapt.runtime.api import async_llm, llm
from quadapt.runtime.errors import AdapterError, ContextLengthError, InvalidParameterError
from quadapt.runtime.engine.registry import AdapterInUseError, AdapterNotFoundError, NoAdapterSlotsError
from quadapt.runtime.engine.sampling import SamplingParams

from .test_adapters import make_base, make_peft_adapter

GREEDY = {"max_new_tokens": 10, "ignore_eos": True}
SAMPLED = {
    "temperature": 1.2, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1, "max_new_tokens": 10, "ignore_eos": True,
}
HELLO = [{"role": "user", "content": "hello there"}]
KV = 4 * 2**20  # a small cache for a tiny model


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("api-engine"))


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api-engine-adapters")
    return {
        "qv": make_peft_adapter(base, root / "qv", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=1),
        "mlp": make_peft_adapter(
            base, root / "mlp", r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"], seed=2
        ),
    }


@pytest.fixture(scope="module")
def served(base, adapters):
    with quadapt.LLM(base, adapters=adapters, max_num_seqs=4, max_num_batched_tokens=32, kv_cache_bytes=KV) as model:
        yield model


@pytest.fixture(scope="module")
def streaming(base, adapters):
    """The same engine settings behind `AsyncLLM`, its engine thread running."""
    model = quadapt.AsyncLLM(base, adapters=adapters, max_num_seqs=4, max_num_batched_tokens=32, kv_cache_bytes=KV)
    model.start()
    yield model
    model.shutdown()


@pytest.fixture(scope="module")
def alone(base, adapters):
    """`quadapt.load` per adapter (None: the base model), loaded once each."""
    models = {None: quadapt.load(base)} | {name: quadapt.load(base, adapter=path) for name, path in adapters.items()}
    return lambda adapter: models[adapter]


def test_the_api_is_the_root_s(served, streaming):
    assert quadapt.LLM is llm.LLM and quadapt.AsyncLLM is async_llm.AsyncLLM and quadapt.serve is llm.serve
    assert quadapt.SamplingParams is SamplingParams and isinstance(served, quadapt.LLM)
    assert isinstance(streaming, quadapt.AsyncLLM)
    assert {"LLM", "AsyncLLM", "serve", "SamplingParams"} <= set(dir(quadapt))


def test_serve_is_a_deprecated_alias_of_llm(base):
    with pytest.warns(DeprecationWarning, match=r"quadapt.serve\(...\) is deprecated .* use quadapt.LLM\(...\)"):
        model = quadapt.serve(base, max_loras=0, kv_cache_bytes=KV)
    assert isinstance(model, quadapt.LLM) and model.generate(["hi"], max_new_tokens=2)[0].completion_tokens == 2


def test_defaults_follow_the_adapters(served):
    config = served.engine.config
    assert config.max_loras == 4 and config.max_lora_rank == 16  # max(4, 2 adapters); ranks 4 and 8 fit 16
    assert served.list_adapters() == ["mlp", "qv"]


def test_a_mixed_batch_equals_each_prompt_alone(served, alone):
    prompts = ["hello world", HELLO, "the sea", "once upon", [{"role": "user", "content": "hi"}], "hello world"]
    names = ["qv", None, "mlp", "qv", "mlp", None]
    completions = served.generate(prompts, adapter=names, **GREEDY)
    assert [c.text for c in completions] == [alone(a).generate(p, **GREEDY) for p, a in zip(prompts, names)]
    assert all(c.finish_reason == "length" and c.completion_tokens == 10 for c in completions)
    assert completions[0].text != completions[5].text  # negative control: an adapter changed the text
    assert len({c.text for c in served.generate(["hello world"] * 3, adapter=["qv", "mlp", None], **GREEDY)}) == 3
    assert served.metrics().kv_blocks_used == 0 and served.metrics().requests_finished >= 9


def test_one_adapter_for_all_and_a_lone_prompt(served, alone):
    texts = [c.text for c in served.generate(["hello world", "the sea"], adapter="mlp", **GREEDY)]
    assert texts == [alone("mlp").generate(p, **GREEDY) for p in ("hello world", "the sea")]
    assert [c.text for c in served.generate("the sea", adapter="mlp", **GREEDY)] == texts[1:]
    assert [c.text for c in served.generate(HELLO, **GREEDY)] == [alone(None).generate(HELLO, **GREEDY)]
    assert served.generate([], **GREEDY) == []


def test_chat_wraps_every_string(served, alone):
    (completion,) = served.generate(["hello there"], chat=True, **GREEDY)
    assert completion.text == alone(None).generate(HELLO, **GREEDY)


def test_seeded_sampling_equals_the_single_request(served, alone):
    expected = alone("qv").generate("the sea", seed=7, **SAMPLED)
    got = served.generate(["the sea", "hello world", "the sea"], adapter=["qv", None, "qv"], seed=7, **SAMPLED)
    assert got[0].text == got[2].text == expected
    assert served.generate(["the sea"], adapter="qv", seed=8, **SAMPLED)[0].text != expected  # the seed matters


def test_per_request_params(served, alone):
    params = [SamplingParams(max_new_tokens=4, temperature=0.0), SamplingParams(seed=3, **SAMPLED)]
    got = served.generate(["hello world", "the sea"], adapter=[None, "mlp"], params=params)
    assert got[0].text == alone(None).generate("hello world", max_new_tokens=4)
    assert got[1].text == alone("mlp").generate("the sea", seed=3, **SAMPLED)
    stop = got[1].text[2:4]
    (stopped,) = served.generate(["the sea"], adapter="mlp", seed=3, stop=stop, **SAMPLED)
    assert stopped.text == got[1].text[: got[1].text.index(stop)] and stopped.stop_reason == stop


def test_load_use_and_unload_an_adapter(base, adapters, served, alone):
    served.load_adapter("late", adapters["qv"])
    assert "late" in served.list_adapters()
    (late,) = served.generate(["hello world"], adapter="late", **GREEDY)
    assert late.text == alone("qv").generate("hello world", **GREEDY)
    served.unload_adapter("late")
    assert "late" not in served.list_adapters()
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'late'"):
        served.generate(["hello world"], adapter="late", **GREEDY)


def test_stream_gives_generate_s_text(streaming, served, alone):
    requests = [("hello world", "qv"), (HELLO, None), ("the sea", "mlp")]

    async def collect():
        return await asyncio.gather(*(_join(streaming.stream(p, adapter=a, **GREEDY)) for p, a in requests))

    got = asyncio.run(collect())
    assert [text for text, _ in got] == [alone(a).generate(p, **GREEDY) for p, a in requests]
    assert all(last.finished and last.finish_reason == "length" and last.completion_tokens == 10 for _, last in got)
    assert served.generate(["the sea"], adapter="mlp", **GREEDY)[0].text == got[2][0]  # generate after streams
    (after,) = asyncio.run(streaming.generate(["the sea"], adapter="mlp", **GREEDY))
    assert after.text == got[2][0]  # AsyncLLM.generate too


async def _join(deltas) -> tuple[str, object]:
    parts = [d async for d in deltas]
    return "".join(d.text for d in parts), parts[-1]


def test_leaving_a_stream_early_frees_its_cache(streaming, monkeypatch):
    # 200 tokens of the tiny model go by in well under a second: slowed to ~20 ms a step, a request
    # is surely still running when the consumer, a busy machine's event loop, looks at the cache.
    execute = streaming.engine.executor.execute

    def slow_execute(rows):
        time.sleep(0.02)
        return execute(rows)

    monkeypatch.setattr(streaming.engine.executor, "execute", slow_execute)

    async def leave(closing: bool) -> tuple[int, int]:
        deltas = streaming.stream("a long one", adapter="qv", max_new_tokens=200, ignore_eos=True)
        async with contextlib.aclosing(deltas) if closing else contextlib.nullcontext(deltas) as it:
            async for _ in it:
                busy = streaming.metrics().kv_blocks_used
                break
        if not closing:
            del deltas, it  # Python closes a generator no one holds from the event loop, a turn or two later
            for _ in range(5):
                await asyncio.sleep(0)
                if not streaming.metrics().kv_blocks_used:
                    break
        return busy, streaming.metrics().kv_blocks_used

    async def cancel() -> tuple[int, int]:
        started = asyncio.Event()

        async def consume():
            async for _ in streaming.stream("a long one", max_new_tokens=200, ignore_eos=True):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        busy = streaming.metrics().kv_blocks_used
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return busy, streaming.metrics().kv_blocks_used  # freed as the cancellation went through

    for how in (lambda: leave(closing=True), lambda: leave(closing=False), cancel):
        busy, after = asyncio.run(how())
        assert busy > 0 and after == 0
    snapshot = streaming.metrics()
    assert snapshot.requests_aborted >= 3 and snapshot.running == snapshot.waiting == 0


def test_generate_runs_beside_an_open_stream(streaming, base):
    """One engine thread steps both: a generate while a stream is open finishes, batched with it."""
    async def main():
        deltas = streaming.stream("hello world", max_new_tokens=50, ignore_eos=True)
        async with contextlib.aclosing(deltas):
            await anext(deltas)
            (done,) = await streaming.generate(["hi"], max_new_tokens=1)
            assert done.completion_tokens == 1 and streaming.metrics().running == 1  # the stream still runs

    asyncio.run(main())
    assert asyncio.run(streaming.generate(["hi"], max_new_tokens=1))[0].completion_tokens == 1


def test_shutting_down_ends_open_streams_with_a_clear_error(base):
    model = quadapt.AsyncLLM(base, max_loras=0, kv_cache_bytes=KV)

    async def main():
        async with model:
            deltas = model.stream("hello world", max_new_tokens=500, ignore_eos=True)
            await anext(deltas)
            await asyncio.to_thread(model.shutdown)
            with pytest.raises(RuntimeError, match="not running"):
                async for _ in deltas:
                    pass

    asyncio.run(main())


def test_a_stream_started_during_generate_runs_beside_it(streaming, alone):
    """generate from another thread's loop, a stream meanwhile: one engine thread steps both, both texts are right."""
    settings = {"max_new_tokens": 30, "ignore_eos": True}
    out: list = []
    worker = threading.Thread(
        target=lambda: out.append(asyncio.run(streaming.generate(["the sea"] * 4, adapter="qv", **settings)))
    )

    async def main():
        worker.start()
        while not streaming.metrics().running and worker.is_alive():  # wait until generate's requests run
            await asyncio.sleep(0.001)
        return await _join(streaming.stream("hello world", adapter="mlp", **settings))

    streamed, _ = asyncio.run(main())
    worker.join()
    assert streamed == alone("mlp").generate("hello world", **settings)
    assert [c.text for c in out[0]] == [alone("qv").generate("the sea", **settings)] * 4


# ---- mistakes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"adapter": "nope"}, AdapterNotFoundError, "unknown adapter 'nope'; loaded adapters: mlp, qv"),
        ({"adapter": ["qv", "nope"]}, AdapterNotFoundError, "unknown adapter 'nope'"),
        ({"adapter": ["qv"]}, InvalidParameterError, "adapter must be an adapter name or None, or a list of 2"),
        ({"adapter": 3}, InvalidParameterError, "adapter must be"),
        ({"params": [SamplingParams()]}, InvalidParameterError, "params must be a SamplingParams, or a list of 2"),
        ({"params": SamplingParams(), "seed": 1}, InvalidParameterError, r"not both \(got \['seed'\]\)"),
        ({"temprature": 1.0}, InvalidParameterError, r"unknown sampling setting\(s\) \['temprature'\]"),
        ({"temperature": -1.0}, InvalidParameterError, "temperature"),
        ({"chat": False, "prompts": ["hi", HELLO]}, InvalidParameterError, "chat=False"),
        ({"prompts": ["hi", [{"role": "user"}]]}, InvalidParameterError, "message 0"),
        ({"prompts": "hi " * 400}, ContextLengthError, "context"),
        ({"prompts": 3}, InvalidParameterError, "prompts must be a list"),
    ],
    ids=[
        "unknown-adapter", "one-unknown-of-two", "adapters-not-aligned", "adapter-not-a-name", "params-not-aligned",
        "params-and-keywords", "unknown-keyword", "bad-setting", "messages-with-chat-false", "bad-messages",
        "too-long", "not-a-list",
    ],
)
def test_mistakes_raise_before_anything_runs(served, kwargs, error, message):
    settings = {} if "params" in kwargs else {"max_new_tokens": 2}
    before = served.metrics().requests_finished
    with pytest.raises(error, match=message):
        served.generate(**{"prompts": ["hello world", "the sea"], **settings, **kwargs})
    after = served.metrics()
    assert after.requests_finished == before and after.kv_blocks_used == 0 and not served.engine.has_unfinished()


def test_async_generate_takes_back_what_it_queued_when_one_is_refused(streaming):
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'nope'"):
        asyncio.run(streaming.generate(["hello world", "the sea"], adapter=["qv", "nope"], max_new_tokens=50,
                                       ignore_eos=True))
    snapshot = streaming.metrics()  # runs after the posted abort of the first request
    assert snapshot.kv_blocks_used == 0 and snapshot.running == snapshot.waiting == 0


def test_stream_mistakes(streaming):
    served = streaming

    async def first(**kwargs):
        return await anext(served.stream("hi", **kwargs))

    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'nope'"):
        asyncio.run(first(adapter="nope"))
    with pytest.raises(InvalidParameterError, match="adapter must be an adapter name or None"):
        asyncio.run(first(adapter=["qv"]))
    with pytest.raises(InvalidParameterError, match="not both"):
        asyncio.run(first(params=SamplingParams(), seed=1))
    assert served.metrics().kv_blocks_used == 0


def test_adapter_mistakes(base, adapters, served, tmp_path):
    with pytest.raises(AdapterError, match="rank 8, above the slots' max rank 4"):
        quadapt.LLM(base, adapters=adapters, max_lora_rank=4, kv_cache_bytes=KV)
    only_base = re.escape("max_loras=0 serves the base model only, but adapters ['mlp', 'qv']")
    with pytest.raises(InvalidParameterError, match=only_base):
        quadapt.LLM(base, adapters=adapters, max_loras=0)
    with pytest.raises(InvalidParameterError, match="adapters must map names to adapter directories"):
        quadapt.LLM(base, adapters=[adapters["qv"]])
    with pytest.raises(AdapterError, match="not a directory"):
        quadapt.AsyncLLM(base, adapters={"x": tmp_path / "none"})
    with pytest.raises(InvalidParameterError, match="adapter name 'bad name' is not allowed"):
        served.load_adapter("bad name", adapters["qv"])
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'nope'"):
        served.unload_adapter("nope")


def test_an_adapter_in_use_is_not_unloaded(streaming, adapters):
    served = streaming
    served.load_adapter("busy", adapters["qv"])

    async def main():
        deltas = served.stream("hello world", adapter="busy", max_new_tokens=50, ignore_eos=True)
        async with contextlib.aclosing(deltas):
            await anext(deltas)
            with pytest.raises(AdapterInUseError, match="'busy' is used by 1 unfinished request"):
                served.unload_adapter("busy")

    asyncio.run(main())
    served.unload_adapter("busy")


def test_the_base_model_only(base):
    with quadapt.LLM(base, max_loras=0, kv_cache_bytes=KV) as model:
        assert model.list_adapters() == [] and model.generate(["hi"], max_new_tokens=2)[0].completion_tokens == 2
        with pytest.raises(InvalidParameterError, match="max_loras=0"):
            model.load_adapter("a", "somewhere")
        with pytest.raises(InvalidParameterError, match="serves no adapters"):
            model.generate(["hi"], adapter="a", max_new_tokens=2)
        # The registry is there, empty: refusing names the option to raise, before any file is read.
        assert model.engine.adapters.num_slots == 0
        with pytest.raises(NoAdapterSlotsError, match=r"cannot load adapter 'a'.*max_loras >= 1 \(--max-loras"):
            model.load_adapter("a", "somewhere")
        with pytest.raises(NoAdapterSlotsError, match="max_loras=0"):
            quadapt.AsyncLLM.from_engine(model.engine, model.tokenizer).load_adapter("a", "somewhere")


def test_bad_serve_settings(base):
    with pytest.raises(InvalidParameterError, match="max_num_seqs must be a positive integer"):
        quadapt.LLM(base, max_num_seqs=0)
    with pytest.raises(InvalidParameterError, match="dtype must be one of"):
        quadapt.LLM(base, dtype="float64")
    with pytest.raises(InvalidParameterError, match="threads must be a positive integer"):
        quadapt.AsyncLLM(base, threads=0)
    with pytest.raises(InvalidParameterError, match=r"unknown engine option\(s\) \['max_lora'\]"):
        quadapt.LLM(base, max_lora=2)


# ---- the README -----------------------------------------------------------------------------------


def test_the_readme_batched_example_runs(base, adapters, capsys):
    """The README's batched example (the ```py block with `quadapt.LLM`) runs on the tiny model."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (example,) = [b for b in re.findall(r"```py\n(.*?)```", readme, flags=re.DOTALL) if "quadapt.LLM(" in b]
    theirs = ast.literal_eval(re.search(r"adapters=(\{.*?\})", example)[1])
    assert len(theirs) == 2 and example.count('"smollm2"') == 1
    code = example.replace('"smollm2"', repr(str(base)))
    for path, ours in zip(theirs.values(), adapters.values()):
        code = code.replace(repr(path).replace("'", '"'), repr(str(ours)))
    exec(compile(code, "README.md", "exec"), {"quadapt": quadapt})  # it follows the block that imports quadapt
    assert capsys.readouterr().out.strip()


def test_import_quadapt_loads_no_torch():
    code = (
        "import sys, quadapt; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert {'LLM', 'AsyncLLM', 'serve', 'SamplingParams'} <= set(dir(quadapt)); "
        "assert 'quadapt.runtime' not in sys.modules, 'runtime imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
