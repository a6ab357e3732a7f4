"""The gRPC server end to end, on loopback, against the engine alone.

A real `grpc.aio` server runs on its own event loop in a thread (`ServerThread`), over a tiny
random Llama with a ChatML tokenizer and two PEFT adapters; tests call it through
`quadapt.runtime.serving.client`. Each request's tokens must equal what the engine gives it alone
(`LLM.generate`); refusals must carry their status code and name the field; a request that ends
early (cancel, deadline, drain) must leave the engine's accounting at zero. A throttle slows the
engine's steps where a test needs a request to still be running.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from peft import LoraConfig

from quadapt.runtime.serving.client import Client, ServerError
from quadapt.runtime.engine.engine import Engine, EngineConfig
from quadapt.runtime.api.async_llm import AsyncLLM
from quadapt.runtime.api.llm import LLM, GenerateRequest
from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.engine.sampling import SamplingParams
from quadapt.runtime.serving.server import ServerConfig, start
from quadapt.runtime.text.tokenizer import Tokenizer

from .test_adapters import make_base, make_peft_adapter

GREEDY = {"max_new_tokens": 8, "ignore_eos": True}
HELLO = [{"role": "user", "content": "hello there"}]


class Throttle:
    """Sleeps `delay` seconds before each engine step (0: full speed)."""

    def __init__(self) -> None:
        self.delay = 0.0

    def wrap(self, engine: Engine) -> Engine:
        execute = engine.executor.execute

        def slow(specs):
            if self.delay:
                time.sleep(self.delay)
            return execute(specs)

        engine.executor.execute = slow
        return engine


class ServerThread:
    """A server on its own event loop in a daemon thread, driven from a synchronous test."""

    def __init__(self, config: ServerConfig, llm=None, *, wait_ready: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(start(config, llm=llm))
        if wait_ready:
            self.run(self.server.ready())
        self.target = f"127.0.0.1:{self.server.port}"

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def client(self, **options) -> Client:
        return Client(self.target, timeout=options.pop("timeout", 30), **options)

    def close(self) -> None:
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def make_engine(base: Path, adapters: dict[str, Path], tokenizer: Tokenizer) -> Engine:
    engine = Engine.for_model(
        load_model(base), eos_token_ids=tokenizer.eos_token_ids,
        config=EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, max_loras=2, max_lora_rank=8),
        kv_cache_bytes=2 * 2**20, block_size=4,
    )
    for name, path in adapters.items():
        engine.adapters.load(name, path)
    return engine


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def engine_idle(engine: Engine) -> bool:
    return engine.allocator.num_used == 0 and not engine.has_unfinished()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("server-base"))


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-adapters")


@pytest.fixture(scope="module")
def adapters(base, adapter_root) -> dict[str, Path]:
    return {
        "a": make_peft_adapter(base, adapter_root / "a", seed=1,
                               config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
        "b": make_peft_adapter(base, adapter_root / "b", seed=2,
                               config=LoraConfig(r=8, lora_alpha=16, target_modules=["o_proj", "up_proj"])),
    }


@pytest.fixture(scope="module")
def tokenizer(base) -> Tokenizer:
    return Tokenizer.from_dir(base)


@pytest.fixture(scope="module")
def throttle() -> Throttle:
    return Throttle()


@pytest.fixture(scope="module")
def served(base, adapters, adapter_root, tokenizer, throttle):
    """One server for the module: adapters a and b loaded, LoadAdapter allowed from their folder,
    a queue of 3, a 64 KiB message limit and a metrics endpoint."""
    engine = throttle.wrap(make_engine(base, adapters, tokenizer))
    config = ServerConfig(
        model=str(base), port=0, adapter_dirs=(str(adapter_root),), max_queue=3, max_message_bytes=64 * 2**10,
        metrics_port=0, drain_timeout_s=10,
    )
    server = ServerThread(config, AsyncLLM.from_engine(engine, tokenizer))
    yield server
    server.close()


@pytest.fixture
def client(served, throttle):
    throttle.delay = 0.0
    with served.client() as c:
        yield c
    throttle.delay = 0.0
    wait_until(lambda: engine_idle(served.server.llm.engine), what="the engine to be idle after the test")


def engine_alone(base, adapters, tokenizer, prompt, adapter=None, **settings):
    """What `LLM.generate` gives one request on a fresh engine: (text, token ids)."""
    llm = LLM.from_engine(make_engine(base, adapters, tokenizer), tokenizer)
    params = SamplingParams(**{"temperature": 0.0, **settings})  # the server's default is greedy
    [done] = llm.generate([GenerateRequest(prompt, params, adapter)])
    return done.text, done.token_ids


def test_unary_and_stream_agree_and_equal_the_engine_alone(client, base, adapters, tokenizer):
    cases = [
        ("the quick brown", None, GREEDY),
        (HELLO, "a", GREEDY),
        ("the quick brown", "b", GREEDY),
        ("once upon", "a", {"max_new_tokens": 10, "temperature": 0.9, "top_k": 50, "top_p": 0.9, "seed": 7,
                            "ignore_eos": True}),
    ]
    for prompt, adapter, settings in cases:
        kwargs = {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}
        unary = client.generate(adapter=adapter, **kwargs, **settings)
        chunks = list(client.generate_stream(adapter=adapter, **kwargs, **settings))
        text, ids = engine_alone(base, adapters, tokenizer, prompt, adapter, **settings)
        assert (unary.text, unary.token_ids) == (text, ids), (prompt, adapter)
        assert "".join(c.text for c in chunks) == text and [t for c in chunks for t in c.token_ids] == ids
        assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
        last = chunks[-1]
        assert (last.finish_reason, last.completion_tokens) == ("length", settings["max_new_tokens"])
        assert last.prompt_tokens == unary.prompt_tokens == len(tokenizer.encode_prompt(prompt))
        assert len({c.request_id for c in chunks}) == 1 and chunks[0].request_id != unary.request_id
    # The adapters change the output, so the equalities above are not vacuous.
    outputs = {a: client.generate("the quick brown", adapter=a, **GREEDY).token_ids for a in (None, "a", "b")}
    assert len({tuple(v) for v in outputs.values()}) == 3


def test_defaults_are_greedy_and_stop_strings_end_the_text(client):
    first = client.generate("the quick brown", max_new_tokens=12, ignore_eos=True)
    assert first.text == client.generate("the quick brown", max_new_tokens=12, ignore_eos=True, seed=99).text
    stop = first.text[4:6]
    stopped = client.generate("the quick brown", max_new_tokens=12, ignore_eos=True, stop=[stop])
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop)
    assert stopped.text == first.text[: first.text.index(stop)]


def test_refusals_carry_their_code_and_name_the_field(client, tokenizer):
    cases = [
        (dict(prompt="hi", adapter="nope"), "NOT_FOUND", "unknown adapter 'nope'"),
        (dict(prompt="hi", temperature=-1.0), "INVALID_ARGUMENT", "temperature"),
        (dict(prompt="hi", top_p=0.0), "INVALID_ARGUMENT", "top_p"),
        (dict(prompt="hi", max_new_tokens=0), "INVALID_ARGUMENT", "max_new_tokens"),
        (dict(prompt="hi", stop=[""]), "INVALID_ARGUMENT", "stop"),
        (dict(prompt="hi", messages=HELLO), "INVALID_ARGUMENT", "exactly one of prompt"),
        (dict(), "INVALID_ARGUMENT", "prompt is empty"),
        (dict(messages=[{"role": "", "content": "x"}]), "INVALID_ARGUMENT", r"messages\[0\].role"),
        (dict(prompt="word " * 400), "INVALID_ARGUMENT", "context"),  # past the 256-token context
    ]
    for kwargs, code, message in cases:
        for call in (client.generate, lambda **kw: list(client.generate_stream(**kw))):
            with pytest.raises(ServerError, match=message) as refused:
                call(**kwargs)
            assert refused.value.code == code, kwargs
    with pytest.raises(ServerError) as too_big:
        client.generate("x" * 70_000)  # over max_message_bytes
    assert too_big.value.code == "RESOURCE_EXHAUSTED"
    assert client.generate("still serving", **GREEDY).completion_tokens == 8


def test_queue_full_cancel_and_deadline_free_the_engine(served, client, throttle):
    engine = served.server.llm.engine
    throttle.delay = 0.05
    long = dict(max_new_tokens=200, ignore_eos=True)
    streams = [client.generate_stream(f"stream {i}", **long) for i in range(3)]
    for s in streams:
        next(s)  # each has its first token: three requests admitted, the queue is full
    assert served.server._active == 3 and engine.has_unfinished()
    started = time.monotonic()
    try:
        extra = client.generate("one too many", **GREEDY)
    except ServerError as e:
        full = e
    else:  # say what the server saw, so that a failure explains itself
        pytest.fail(f"admitted {extra.request_id} after {time.monotonic() - started:.2f} s; the server now has "
                    f"{served.server._active} request(s) in flight; engine: {engine.metrics()}")
    assert full.code == "RESOURCE_EXHAUSTED" and "max_queue 3" in full.details
    assert engine.allocator.num_used > 0
    for s in streams:
        s.close()  # the client cancels: the server aborts each request and frees its blocks
    wait_until(lambda: engine_idle(engine) and served.server._active == 0, what="cancelled requests to be freed")

    for call in (lambda: list(client.generate_stream("late", timeout=0.5, **long)),
                 lambda: client.generate("late", timeout=0.5, **long)):
        started = time.monotonic()
        with pytest.raises(ServerError) as late:
            call()
        assert late.value.code == "DEADLINE_EXCEEDED" and time.monotonic() - started < 5
        wait_until(lambda: engine_idle(engine) and served.server._active == 0, what="the late request to be freed")
    assert client.generate("after", **GREEDY).completion_tokens == 8
    snapshot = engine.metrics()
    assert snapshot.requests_aborted >= 5 and snapshot.kv_blocks_used == 0


def test_load_and_unload_adapters_while_streams_run(served, client, adapters, throttle, base, tokenizer):
    throttle.delay = 0.02
    as_a = engine_alone(base, adapters, tokenizer, "running on a", "a", max_new_tokens=30, ignore_eos=True)
    as_b = engine_alone(base, adapters, tokenizer, "then on a", "b", **GREEDY)
    stream = client.generate_stream("running on a", adapter="a", max_new_tokens=30, ignore_eos=True)
    chunks = [next(stream)]
    info, outcome = client.load_adapter("c", "b")  # relative to the allowed dir
    assert outcome == "LOADED" and info.name == "c" and info.rank == 8
    assert client.load_adapter("c", str(adapters["b"]))[1] == "UNCHANGED"
    with pytest.raises(ServerError) as busy:
        client.unload_adapter("a")
    assert busy.value.code == "FAILED_PRECONDITION" and "unfinished request" in busy.value.details
    assert client.load_adapter("a", "b")[1] == "RELOADED"  # the running stream keeps the old weights
    chunks += list(stream)
    assert "".join(c.text for c in chunks) == as_a[0]
    assert client.generate("then on a", adapter="a", **GREEDY).token_ids == as_b[1]  # new requests: new weights
    listed = {a.name: a for a in client.list_adapters()}
    assert sorted(listed) == ["a", "b", "c"] and listed["a"].digest == listed["b"].digest == listed["c"].digest
    client.unload_adapter("c")
    client.load_adapter("a", "a")  # restore the module's adapter a
    with pytest.raises(ServerError) as gone:
        client.unload_adapter("c")
    assert gone.value.code == "NOT_FOUND"
    with pytest.raises(ServerError) as bad_name:
        client.load_adapter("../x", "a")
    assert bad_name.value.code == "INVALID_ARGUMENT" and "adapter name" in bad_name.value.details


def test_tokenize_list_and_server_info(client, tokenizer):
    assert client.tokenize("hello world") == tokenizer.encode("hello world")
    assert client.tokenize(messages=HELLO) == tokenizer.encode_prompt(HELLO)
    info = client.server_info()
    assert (info.max_context_tokens, info.vocab_size, info.max_queue, info.max_loras) == (256, 512, 3, 2)
    assert info.chat_template and info.max_message_bytes == 64 * 2**10


def test_health_reflection_and_metrics(served, client):
    assert client.health() == "SERVING" and client.health("quadapt.v1.Generation") == "SERVING"
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(served.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "quadapt.v1.Generation" in services and "grpc.health.v1.Health" in services
        method = ProtoReflectionDescriptorDatabase(channel).FindFileContainingSymbol("quadapt.v1.Generation")
        assert "GenerateStream" in str(method)

    client.generate("count me", adapter="a", **GREEDY)
    url = f"http://127.0.0.1:{served.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for line in (
        'quadapt_requests_running{adapter="a"} 0.0',
        'quadapt_requests_waiting{adapter=""} 0.0',
        "quadapt_kv_cache_blocks_used 0.0",
        'quadapt_grpc_requests_total{code="OK",method="Generate"}',
        'quadapt_time_to_first_token_seconds_count{adapter="a"}',
        'quadapt_inter_token_latency_seconds_bucket{adapter="a",le="+Inf"}',
        "quadapt_generation_tokens_total",
        "quadapt_adapter_slot_loads_total",
        "quadapt_preemptions_total",
    ):
        assert line in text, line


def test_health_follows_loading_serving_and_draining(base, adapters, tokenizer):
    """NOT_SERVING while the model loads, SERVING, then NOT_SERVING while draining; in-flight
    streams finish and new requests get UNAVAILABLE."""
    gate = threading.Event()
    throttle = Throttle()

    def load() -> AsyncLLM:
        gate.wait(30)
        return AsyncLLM.from_engine(throttle.wrap(make_engine(base, adapters, tokenizer)), tokenizer)

    served = ServerThread(ServerConfig(model=str(base), port=0), load, wait_ready=False)
    try:
        with served.client(timeout=10) as client:
            assert client.health() == "NOT_SERVING"
            with pytest.raises(ServerError) as loading:
                client.generate("too early")
            assert loading.value.code == "UNAVAILABLE" and "loading" in loading.value.details
            gate.set()
            served.run(served.server.ready())
            assert client.health() == "SERVING"

            throttle.delay = 0.05
            stream = client.generate_stream("finish me", max_new_tokens=20, ignore_eos=True)
            first = next(stream)
            drained = served.submit(served.server.drain(timeout=20))
            wait_until(lambda: client.health() == "NOT_SERVING", what="health NOT_SERVING")
            with pytest.raises(ServerError) as refused:
                client.generate("during the drain")
            assert refused.value.code == "UNAVAILABLE" and "shutting down" in refused.value.details
            rest = list(stream)
            assert rest[-1].finish_reason == "length" and sum(len(c.token_ids) for c in [first, *rest]) == 20
            assert drained.result(20) is True
            assert engine_idle(served.server.llm.engine)
    finally:
        gate.set()
        served.close()


def test_a_drain_that_times_out_cancels_what_is_left(base, adapters, tokenizer):
    throttle = Throttle()
    throttle.delay = 0.05
    engine = throttle.wrap(make_engine(base, adapters, tokenizer))
    served = ServerThread(ServerConfig(model=str(base), port=0), AsyncLLM.from_engine(engine, tokenizer))
    try:
        with served.client() as client:
            stream = client.generate_stream("too long to wait for", max_new_tokens=200, ignore_eos=True)
            next(stream)
            assert served.run(served.server.drain(timeout=0.3)) is False
            with pytest.raises(ServerError) as cut:
                list(stream)
            assert cut.value.code in ("CANCELLED", "UNAVAILABLE")
        wait_until(lambda: engine_idle(engine), what="the cut request to be freed")
    finally:
        served.close()
