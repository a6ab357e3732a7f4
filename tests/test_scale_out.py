"""Replicas under Ray Serve: the same answers as one server, requests routed to the replica that
holds their adapter, and a replica's death seen as UNAVAILABLE / 503, never as a wrong answer.

One local Ray instance for the module (small object store, no dashboard) serves 2 replicas of
the tiny random model with 4 adapters from an adapter dir. Each text, through the `openai` SDK
and through the generated gRPC stub, equals the single server's for the same request and seed;
after the first request per adapter, at least 90% of that adapter's requests land on a replica
that already held it (the `x-quadapt-adapter-hit` header / trailing metadata each answer
carries) and each replica's own /metrics shows its engine; an unknown adapter is 404 / NOT_FOUND
and quadapt's own client works unchanged. Killing one replica's actor under load fails its
in-flight requests with UNAVAILABLE / 503 while the other replica serves, and Serve brings a
replica back that serves again. Last, with one replica and one adapter slot, an adapter Serve
evicts under its running stream is unloaded after it, and racing adapters still answer right.
"""

from __future__ import annotations

import concurrent.futures
import re
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
from peft import LoraConfig

from quadapt.protos.quadapt.v1 import generation_pb2 as pb
from quadapt.protos.quadapt.v1 import generation_pb2_grpc as pb_grpc
from quadapt.runtime.serving.client import Client, ServerError
from quadapt.runtime.serving.server import ServerConfig

from .test_adapters import make_base, make_peft_adapter
from .test_server import ServerThread

ray = pytest.importorskip("ray", reason="the scale-out tests need the ray extra (pip install 'quadapt[ray]')")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow

ADAPTERS = ["a0", "a1", "a2", "a3"]
PROMPTS = ["the cluster answers", "one more prompt", "and a third"]


def free_port(pair: bool = False) -> int:
    """A free port (with `pair`, one whose next port is free too: a replica's metrics each)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair:
            return port
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ServerConfig:
    root = tmp_path_factory.mktemp("scale-out")
    base = make_base(root / "base", max_position_embeddings=1024)  # room for streams still running at a kill
    for i, name in enumerate(ADAPTERS):
        make_peft_adapter(base, root / "adapters" / name, seed=10 + i,
                          config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return ServerConfig(model=str(base), host="127.0.0.1", port=free_port(), http_port=free_port(),
                        adapter_dirs=(str(root / "adapters"),), metrics_port=free_port(pair=True), threads=1,
                        max_num_seqs=8, max_num_batched_tokens=32,
                        max_loras=4, max_lora_rank=8, kv_cache_bytes=8 * 2**20, block_size=4, drain_timeout_s=1)


@pytest.fixture(scope="module")
def single(config):
    """The single server the cluster must agree with."""
    adapters = {name: str(Path(config.adapter_dirs[0]) / name) for name in ADAPTERS}
    served = ServerThread(ServerConfig(**{**_fields(config), "port": 0, "http_port": None, "metrics_port": None,
                                                      "adapters": adapters}))
    yield served
    served.close()


@pytest.fixture(scope="module")
def cluster(config):
    from ray.serve.config import HTTPOptions, gRPCOptions

    from quadapt.runtime.serving.ray.launch import APP_NAME, GRPC_SERVICERS, build_app

    started = time.monotonic()
    ray.init(address="local", num_cpus=4, object_store_memory=100 * 2**20, include_dashboard=False,
             log_to_driver=False)
    try:
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=config.http_port),
                    grpc_options=gRPCOptions(port=config.port, grpc_servicer_functions=GRPC_SERVICERS))
        serve.run(build_app(config, replicas=2, replica_cpus=1), name=APP_NAME, route_prefix="/")
        print(f"\nRay started and 2 replicas deployed in {time.monotonic() - started:.1f} s")
        yield config
    finally:
        serve.shutdown()
        ray.shutdown()


def _fields(config: ServerConfig) -> dict:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


def http(config) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{config.http_port}/v1", api_key="none", max_retries=0,
                         timeout=60)


def grpc_stub(config):
    channel = grpc.insecure_channel(f"127.0.0.1:{config.port}")
    return channel, pb_grpc.GenerationStub(channel)


SAMPLING = {"max_new_tokens": 8, "temperature": 0.8, "seed": 7, "ignore_eos": True}


def via_http(sdk, adapter, prompt) -> tuple[str, str, str | None]:
    raw = sdk.completions.with_raw_response.create(
        model=adapter or "", prompt=prompt, max_tokens=8, temperature=0.8, seed=7, extra_body={"ignore_eos": True})
    return raw.parse().choices[0].text, raw.headers["x-quadapt-replica"], raw.headers.get("x-quadapt-adapter-hit")


def via_grpc(stub, adapter, prompt) -> tuple[str, str, str | None]:
    metadata = (("multiplexed_model_id", adapter),) if adapter else ()
    response, call = stub.Generate.with_call(pb.GenerateRequest(prompt=prompt, adapter=adapter or "", **SAMPLING),
                                             metadata=metadata, timeout=60)
    trailing = dict(call.trailing_metadata())
    return response.text, trailing["x-quadapt-replica"], trailing.get("x-quadapt-adapter-hit")


def test_same_answers_and_adapters_routed_to_the_replica_that_holds_them(cluster, single):
    channel, stub = grpc_stub(cluster)
    hits: dict[str, list[str]] = {name: [] for name in ADAPTERS}
    with single.client() as reference, http(cluster) as sdk:
        expected = {(adapter, prompt): reference.generate(prompt, adapter=adapter, **SAMPLING).text
                    for adapter in [None, *ADAPTERS] for prompt in PROMPTS}
        for _ in range(3):
            for (adapter, prompt), text in expected.items():
                for door in (via_http, via_grpc):
                    got, replica, hit = door(sdk if door is via_http else stub, adapter, prompt)
                    assert got == text, (door.__name__, adapter, prompt, replica)
                    if adapter is not None:
                        hits[adapter].append(hit)
                        if len(hits[adapter]) == 1:
                            time.sleep(0.5)  # Serve announces where an adapter loaded every 0.1 s
    channel.close()
    # Each replica's own /metrics (the single server's, on metrics_port + its rank): its engine's cache
    # and the adapters it holds, which together cover the four.
    loaded = 0
    for port in (cluster.metrics_port, cluster.metrics_port + 1):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert re.search(r"^quadapt_kv_cache_blocks_total [1-9]", text, re.M), text[:500]
        loaded += int(float(re.search(r"^quadapt_adapters_loaded (\S+)", text, re.M).group(1)))
    assert loaded >= len(ADAPTERS)
    for name, seen in hits.items():
        later = seen[1:]  # the first request per adapter loads it somewhere
        rate = later.count("1") / len(later)
        print(f"{name}: {rate:.0%} of {len(later)} requests after the first hit a replica holding it")
        assert rate >= 0.9, (name, seen)


def test_an_unknown_adapter_is_not_found_on_both_doors(cluster):
    with http(cluster) as sdk:
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            sdk.completions.create(model="nope", prompt="x", max_tokens=2)
        names = [m.id for m in sdk.models.list().data]
        assert set(ADAPTERS) <= set(names)
        # An error raised in a replica comes back as itself: a prompt past the context is a 400.
        with pytest.raises(openai.BadRequestError, match="context"):
            sdk.completions.create(model="a1", prompt="many words " * 400, max_tokens=2)
    channel, stub = grpc_stub(cluster)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Generate(pb.GenerateRequest(prompt="x", adapter="nope"), metadata=(("multiplexed_model_id", "nope"),),
                      timeout=60)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND, refused.value.details()
    assert "nope" in refused.value.details()
    channel.close()
    with Client(f"127.0.0.1:{cluster.port}", timeout=60) as client:  # quadapt's client, unchanged
        assert client.health() == "SERVING"
        assert client.server_info().max_loras == cluster.max_loras
        with pytest.raises(ServerError) as unknown:
            client.generate("x", adapter="nope", max_new_tokens=2)
        assert unknown.value.code == "NOT_FOUND"
        with pytest.raises(ServerError) as too_long:
            client.generate("many words " * 400, max_new_tokens=2)
        assert too_long.value.code == "INVALID_ARGUMENT" and "context" in too_long.value.details
        assert client.generate("x", adapter="a2", max_new_tokens=2, ignore_eos=True).completion_tokens == 2


def test_a_replica_killed_under_load_fails_its_requests_unavailable_and_comes_back(cluster, single):
    from ray.serve._private.constants import SERVE_NAMESPACE

    # Long enough to be running when the replica dies whatever the machine's speed; all 8 run at
    # once on either replica (max_num_seqs 8, 8 x ~900 positions of 512 bytes in 8 MiB), so no
    # stream's first token waits for another stream to finish (when one did, the streams on the
    # other replica had finished too by the time of the kill).
    prompt, long = "a long answer", {"max_new_tokens": 900, "ignore_eos": True}
    with single.client() as reference:
        expected = reference.generate(prompt, **long).text
    sdk = http(cluster)
    before = replicas_seen(sdk, 2)
    channel, stub = grpc_stub(cluster)

    def finish(stream) -> tuple[str, str]:
        """The rest of a stream: its whole text, or the status it failed with."""
        text = first[stream]
        try:
            for message in stream:
                text += message.text
        except grpc.RpcError as e:
            return e.code().name, e.details()
        return text, dict(stream.trailing_metadata())["x-quadapt-replica"]

    def over_http(_) -> tuple[str | int, str]:
        try:
            done = sdk.completions.create(model="", prompt=prompt, max_tokens=long["max_new_tokens"],
                                          extra_body={"ignore_eos": True})
            return done.choices[0].text, ""
        except openai.APIStatusError as e:
            return e.status_code, e.message

    streams = [stub.GenerateStream(pb.GenerateRequest(prompt=prompt, **long), timeout=120) for _ in range(8)]
    first = {stream: next(stream).text for stream in streams}  # each is running on a replica now
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        posted = [pool.submit(over_http, i) for i in range(4)]  # queued behind the streams
        time.sleep(0.2)
        victim = sorted(before)[0]
        ray.kill(ray.get_actor(f"SERVE_REPLICA::quadapt#QuadaptEngine#{victim}", namespace=SERVE_NAMESPACE),
                 no_restart=True)
        results = [finish(stream) for stream in streams]
        answers = [f.result(timeout=120) for f in posted]
    failed = [r for r in results if r[0] != expected]
    assert all(r[0] == "UNAVAILABLE" for r in failed), results  # never a wrong answer, never another status
    assert failed, f"no request was in flight on the killed replica: {results}"
    refused = [r for r in answers if r[0] != expected]
    assert all(r[0] == 503 for r in refused), answers
    print(f"killed replica {victim}: {len(failed)} of {len(results)} gRPC streams failed UNAVAILABLE and "
          f"{len(refused)} of {len(answers)} HTTP requests 503, the rest whole")
    # New requests are served at once (by the survivor), and Serve brings a second replica back.
    assert via_http(sdk, None, "who serves")[1] not in {victim}
    back = replicas_seen(sdk, 2, timeout=120) - before
    assert back, "Serve brought no new replica into service"
    response = stub.Generate(pb.GenerateRequest(prompt=prompt, **long), timeout=120)
    assert response.text == expected
    channel.close()
    sdk.close()


def replicas_seen(sdk, count: int, timeout: float = 30) -> set[str]:
    """The replicas that answered base-model requests, until `count` of them have (parallel requests)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        while len(seen) < count and time.monotonic() < deadline:
            seen |= set(pool.map(lambda _: via_http(sdk, None, "who serves")[1], range(4)))
    assert len(seen) >= count, f"{count} replicas should answer, saw {seen}"
    return seen


def test_an_adapter_evicted_under_its_request_unloads_after_it(cluster, single):
    """One replica with one adapter slot: a request for a1 makes Serve evict a0 while a0's stream
    runs. The registry refuses to unload an adapter in use, so the replica defers the unload
    until the stream ends (counted on its /metrics), and every answer is the single server's."""
    import dataclasses

    from quadapt.runtime.serving.ray.launch import APP_NAME, build_app

    narrow = dataclasses.replace(cluster, max_loras=1)
    serve.delete(APP_NAME)  # its replicas free their metrics ports first
    serve.run(build_app(narrow, replicas=1, replica_cpus=1), name=APP_NAME, route_prefix="/")
    long = {"max_new_tokens": 200, "ignore_eos": True}
    with single.client() as reference:
        expected_long = reference.generate("a long answer", adapter="a0", **long).text
        expected = {name: reference.generate(PROMPTS[0], adapter=name, **SAMPLING).text for name in ("a0", "a1")}
    channel, stub = grpc_stub(cluster)
    stream = stub.GenerateStream(pb.GenerateRequest(prompt="a long answer", adapter="a0", **long),
                                 metadata=(("multiplexed_model_id", "a0"),), timeout=120)
    text = next(stream).text  # a0 is in use now
    assert via_grpc(stub, "a1", PROMPTS[0]) == (expected["a1"], ANY, "0")  # loads a1: Serve evicts a0
    text += "".join(message.text for message in stream)
    assert text == expected_long
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=10).read().decode()
    assert re.search(r'^quadapt_adapter_unloads_total\{outcome="deferred"\} [1-9]', scrape, re.M), scrape
    assert via_grpc(stub, "a0", PROMPTS[0])[::2] == (expected["a0"], "0")  # unloaded after its stream, loaded again
    # Three adapters taking turns in the one slot, concurrently: evictions and reloads race, answers stay right.
    with single.client() as reference:
        expected |= {name: reference.generate(PROMPTS[0], adapter=name, **SAMPLING).text for name in ("a2",)}
    jobs = ["a0", "a1", "a2"] * 4
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda name: via_grpc(stub, name, PROMPTS[0])[0], jobs))
    assert answers == [expected[name] for name in jobs]
    channel.close()


class _Any:
    def __eq__(self, other: object) -> bool:
        return True


ANY = _Any()
