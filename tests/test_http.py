"""The OpenAI-compatible HTTP API end to end, driven by the real `openai` SDK.

One server serves gRPC and HTTP over one engine (the tiny random Llama and adapters of
`test_server.py`), with a user token and an admin token. Each HTTP answer must equal what gRPC's
`Generate` gives the same request (the same engine, the same seed), streamed or not; errors must
reach the SDK as its typed exceptions; an adapter loaded or unloaded through either door must be
seen by both at once; a client that leaves mid-stream must leave no cache block held.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from peft import LoraConfig

from quadapt.runtime.api.async_llm import AsyncLLM
from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.serving.client import ServerError
from quadapt.runtime.serving.server import ServerConfig

from .test_adapters import make_peft_adapter
from .test_server import (  # noqa: F401 - the server tests' fixtures
    HELLO, ServerThread, Throttle, adapter_root, adapters, base, engine_idle, make_engine, throttle, tokenizer,
    wait_until,
)

USER, ADMIN = "user-token-0123", "admin-token-4567"
BASE_ID = "tiny-base"
NEW = {"max_tokens": 8, "extra_body": {"ignore_eos": True}}
SAMPLED = {"max_tokens": 10, "temperature": 0.9, "top_p": 0.9, "seed": 7, "extra_body": {"ignore_eos": True, "top_k": 50}}


@pytest.fixture(scope="module")
def served(base, adapters, adapter_root, tokenizer, throttle):
    engine = throttle.wrap(make_engine(base, adapters, tokenizer))
    config = ServerConfig(
        model=str(base), port=0, http_port=0, adapter_dirs=(str(adapter_root),), token=USER, admin_token=ADMIN,
        max_queue=3, max_message_bytes=64 * 2**10, model_name=BASE_ID,
    )
    server = ServerThread(config, AsyncLLM.from_engine(engine, tokenizer))
    yield server
    server.close()


@pytest.fixture
def sdk(served, throttle):
    throttle.delay = 0.0
    with openai.OpenAI(base_url=f"http://127.0.0.1:{served.server.http_port}/v1", api_key=USER, max_retries=0,
                       timeout=30) as client:
        yield client
    throttle.delay = 0.0
    wait_until(lambda: engine_idle(served.server.llm.engine), what="the engine to be idle after the test")


@pytest.fixture
def admin(served):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{served.server.http_port}/v1", api_key=ADMIN, max_retries=0,
                       timeout=30) as client:
        yield client


@pytest.fixture
def grpc_client(served):
    with served.client(token=USER) as client:
        yield client


def grpc_settings(openai_settings: dict) -> dict:
    """The gRPC client's keywords for the same request."""
    settings = {k: v for k, v in openai_settings.items() if k != "extra_body"} | openai_settings.get("extra_body", {})
    settings["max_new_tokens"] = settings.pop("max_tokens")
    return settings


def chat_stream(sdk, **kwargs):
    chunks = list(sdk.chat.completions.create(stream=True, **kwargs))
    return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_chat_and_completions_equal_grpc_for_base_and_adapters(sdk, grpc_client):
    texts = set()
    for model, adapter in ((BASE_ID, None), ("a", "a"), (f"{BASE_ID}:b", "b")):
        for settings in (NEW, SAMPLED):
            expected = grpc_client.generate(messages=HELLO, adapter=adapter, **grpc_settings(settings))
            chat = sdk.chat.completions.create(model=model, messages=HELLO, **settings)
            chunks, streamed = chat_stream(sdk, model=model, messages=HELLO, **settings)
            assert chat.choices[0].message.content == streamed == expected.text, (model, settings)
            assert chat.model == model and chat.choices[0].finish_reason == "length"
            assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (
                expected.prompt_tokens, expected.completion_tokens)
            assert chunks[0].choices[0].delta.role == "assistant"
            assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]

            expected = grpc_client.generate("the quick brown", adapter=adapter, **grpc_settings(settings))
            done = sdk.completions.create(model=model, prompt="the quick brown", **settings)
            streamed = "".join(c.choices[0].text for c in sdk.completions.create(
                model=model, prompt="the quick brown", stream=True, **settings))
            assert done.choices[0].text == streamed == expected.text, (model, settings)
            assert done.usage.completion_tokens == settings["max_tokens"]
            texts.add(expected.text)
    assert len(texts) == 6  # adapters and sampling change the output: the equalities are not vacuous


def test_a_list_of_prompts_gives_one_choice_each(sdk, grpc_client):
    done = sdk.completions.create(model="a", prompt=["the quick brown", "once upon"], **NEW)
    expected = [grpc_client.generate(p, adapter="a", **grpc_settings(NEW)).text for p in ("the quick brown", "once upon")]
    assert [c.text for c in done.choices] == expected and [c.index for c in done.choices] == [0, 1]
    assert done.usage.completion_tokens == 16


def test_include_usage_gives_one_usage_chunk_before_done(sdk):
    for chat in (True, False):
        options = {"stream": True, "stream_options": {"include_usage": True}, **NEW}
        stream = (sdk.chat.completions.create(model="a", messages=HELLO, **options) if chat
                  else sdk.completions.create(model="a", prompt="once upon", **options))
        chunks = list(stream)
        with_usage = [c for c in chunks if c.usage is not None]
        assert len(with_usage) == 1 and with_usage[0] is chunks[-1] and chunks[-1].choices == []
        assert chunks[-1].usage.completion_tokens == 8
        assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 8
        assert all(c.choices for c in chunks[:-1])


def test_fields_the_server_does_not_use_are_ignored(sdk):
    done = sdk.chat.completions.create(
        model=BASE_ID, messages=HELLO, max_completion_tokens=5, parallel_tool_calls=False, user="someone",
        metadata={"k": "v"}, extra_body={"ignore_eos": True, "not_a_field": [1, 2]},
    )
    assert done.usage.completion_tokens == 5 and done.choices[0].finish_reason == "length"
    assert done.model == BASE_ID
    unnamed = sdk.chat.completions.create(model="", messages=HELLO, max_tokens=5)  # no model: the base answers
    assert unnamed.model == BASE_ID and unnamed.choices[0].message.content == done.choices[0].message.content
    stop = sdk.completions.create(model=BASE_ID, prompt="the quick brown", max_tokens=12, extra_body={"ignore_eos": True})
    cut = stop.choices[0].text[4:6]
    stopped = sdk.completions.create(model=BASE_ID, prompt="the quick brown", max_tokens=12, stop=cut,
                                     extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == stop.choices[0].text[: stop.choices[0].text.index(cut)]


def test_errors_reach_the_sdk_as_its_types(sdk, served):
    with pytest.raises(openai.NotFoundError) as e:
        sdk.chat.completions.create(model="nope", messages=HELLO, **NEW)
    assert e.value.code == "model_not_found" and "nope" in e.value.message and BASE_ID in e.value.message
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model=f"{BASE_ID}:nope", messages=HELLO, **NEW)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        sdk.chat.completions.create(model=BASE_ID, messages=HELLO, temperature=-1, **NEW)
    for refused, name in (({"n": 2}, "n must be 1"), ({"top_logprobs": 2}, "needs logprobs: true"),
                          ({"logprobs": True, "top_logprobs": 21}, r"top_logprobs must be an integer in \[0, 20\]"),
                          ({"presence_penalty": 0.5}, "repetition_penalty"),
                          ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text parts"),
                          ({"messages": [{"role": "user"}]}, r"messages\[0\] \('user'\) has no content")):
        with pytest.raises(openai.BadRequestError, match=name) as e:
            sdk.chat.completions.create(**{"model": BASE_ID, "messages": HELLO, **NEW, **refused})
        assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="stop"):
        sdk.completions.create(model=BASE_ID, prompt="hi", stop=["x"] * 17, **NEW)
    for logprobs, name in ((6, r"logprobs must be an integer in \[0, 5\]"), (True, "logprobs must be an integer")):
        with pytest.raises(openai.BadRequestError, match=name) as e:
            sdk.completions.create(model=BASE_ID, prompt="hi", logprobs=logprobs, **NEW)
        assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError, match="top_logprobs is a chat completions field"):
        sdk.completions.create(model=BASE_ID, prompt="hi", logprobs=2, **NEW | {"extra_body": {"top_logprobs": 2}})
    with openai.OpenAI(base_url=str(sdk.base_url), api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
    with pytest.raises(openai.PermissionDeniedError):
        sdk.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": "a"}, cast_to=object)
    # Raw HTTP: every error body has OpenAI's shape, with the right status.
    url = f"http://127.0.0.1:{served.server.http_port}"
    for path, data, status in (
        ("/v1/completions", b"x" * (65 * 2**10), 413),
        ("/v1/completions", b"{not json", 400),
        ("/v1/completions", b"[1, 2]", 400),
        ("/v1/nothing", b"{}", 404),
    ):
        request = urllib.request.Request(url + path, data=data, headers={"Authorization": f"Bearer {USER}"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        body = json.loads(e.value.read())
        assert e.value.code == status and set(body["error"]) == {"message", "type", "param", "code"}, (path, body)


@pytest.mark.parametrize("fields", [
    {"messages": [{"role": "user", "content": "x"}] * 1025},
    {"messages": [{"role": "", "content": "x"}]},
    {"stop": ["x"] * 17},
    {"stop": ["x" * 257]},
    {"temperature": -1.0},
    {"top_p": 0.0},
    {"repetition_penalty": 1000.0},
    {"max_tokens": 0},
    {"prompt": "x" * 10_000},
], ids=lambda f: next(iter(f)))
def test_a_hostile_request_is_refused_the_same_way_on_both_doors(fields, sdk, grpc_client, served, caplog):
    """The same checks, in the same order, with the same message, and one refusal log line each."""
    caplog.set_level(logging.INFO, logger="quadapt")
    served.server._refusal_window = (0.0, 0, 0)  # the earlier tests' refusals must not rate-limit these two
    grpc_fields = {("max_new_tokens" if k == "max_tokens" else k): v for k, v in fields.items()}
    if "prompt" not in fields:
        grpc_fields.setdefault("messages", HELLO)
    with pytest.raises(ServerError) as by_grpc:
        grpc_client.generate(**grpc_fields)
    body = {"model": BASE_ID, "messages": HELLO, **fields}
    if "prompt" in body:
        body.pop("messages")
    with pytest.raises(openai.BadRequestError) as by_http:
        sdk.post("/completions" if "prompt" in body else "/chat/completions", body=body, cast_to=object)
    assert by_grpc.value.code == "INVALID_ARGUMENT"
    assert by_http.value.body["message"] == by_grpc.value.details
    refusals = [r.getMessage() for r in caplog.records if " refused (INVALID_ARGUMENT)" in r.getMessage()]
    assert [line.split()[0] for line in refusals] == ["Generate", "chat" if "messages" in body else "completions"]


def test_adapters_loaded_through_either_door_are_seen_by_both(sdk, admin, served, base, adapter_root):
    make_peft_adapter(base, adapter_root / "c", seed=3,
                      config=LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "gate_proj"]))
    with served.client(token=ADMIN) as grpc_admin:
        loaded = admin.post("/load_lora_adapter", body={"lora_name": "c", "lora_path": "c"}, cast_to=object)
        assert loaded["outcome"] == "loaded"
        models = {m.id: m for m in sdk.models.list()}
        assert models["c"].model_extra["parent"] == BASE_ID and models[BASE_ID].model_extra["parent"] is None
        assert set(models) == {BASE_ID, "a", "b", "c"}
        assert "c" in [a.name for a in grpc_admin.list_adapters()]
        http = sdk.completions.create(model="c", prompt="the quick brown", **NEW).choices[0].text
        assert http == grpc_admin.generate("the quick brown", adapter="c", **grpc_settings(NEW)).text
        grpc_admin.unload_adapter("c")
        assert "c" not in [m.id for m in sdk.models.list()]
        with pytest.raises(openai.NotFoundError):
            sdk.completions.create(model="c", prompt="hi", **NEW)

        grpc_admin.load_adapter("c", str(adapter_root / "c"))
        assert "c" in [m.id for m in sdk.models.list()]
        admin.post("/unload_lora_adapter", body={"lora_name": "c"}, cast_to=object)
        assert "c" not in [a.name for a in grpc_admin.list_adapters()] + [m.id for m in sdk.models.list()]
    with pytest.raises(openai.PermissionDeniedError, match="outside"):
        admin.post("/load_lora_adapter", body={"lora_name": "d", "lora_path": "/etc"}, cast_to=object)


def test_a_client_leaving_mid_stream_frees_its_cache(sdk, served, throttle):
    throttle.delay = 0.05
    stream = sdk.chat.completions.create(model="a", messages=HELLO, stream=True, max_tokens=100,
                                         extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert served.server.llm.engine.allocator.num_used > 0 or served.server.llm.engine.has_unfinished()
    stream.close()
    started = time.monotonic()
    wait_until(lambda: engine_idle(served.server.llm.engine), timeout=5, what="the stream's blocks to be freed")
    assert time.monotonic() - started < 2
    assert "quadapt_kv_cache_blocks_used 0.0" in _scrape(served)  # what an operator reads back

    # Unstreamed too: the request is cancelled when its client goes, not run to its end.
    connection = http.client.HTTPConnection("127.0.0.1", served.server.http_port, timeout=10)
    body = {"model": "b", "prompt": "the quick brown", "max_tokens": 100, "ignore_eos": True}
    connection.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {USER}"})
    wait_until(lambda: served.server.llm.engine.has_unfinished(), what="the request to run")
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    wait_until(lambda: engine_idle(served.server.llm.engine), timeout=2, what="the unstreamed request's blocks")


def _scrape(served) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{served.server.http_port}/metrics",
                                     headers={"Authorization": f"Bearer {USER}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def test_health_metrics_and_the_gateway_gauge(sdk, served, throttle):
    with urllib.request.urlopen(f"http://127.0.0.1:{served.server.http_port}/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "serving"}
    throttle.delay = 0.05
    stream = sdk.completions.create(model="b", prompt="once upon", stream=True, max_tokens=40,
                                    extra_body={"ignore_eos": True})
    next(iter(stream))
    running = _scrape(served)
    stream.close()
    assert 'quadapt_lora_requests_info{max_lora="2",running_lora_adapters="b",waiting_lora_adapters=""}' in running
    assert 'quadapt_http_requests_total{route="completions",status="200"}' in running


def greedy_reference(base, tokenizer, prompt_ids: list[int], n: int, k: int) -> list[tuple[str, float, list]]:
    """Greedy decoding by hand over the model's full logits: each token's text, its log-softmax, and
    the top k (text, logprob) of its row, from `torch.topk`."""
    model, ids, made = load_model(base), list(prompt_ids), []
    for _ in range(n):
        with torch.no_grad():
            row = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), dim=-1)
        token = int(row.argmax())
        top = torch.topk(row, k)
        name = lambda t: tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
        made.append((name(token), float(row[token]), [(name(int(t)), float(v)) for v, t in zip(*top)]))
        ids.append(token)
    return made


def test_logprobs_parse_into_the_sdk_types_and_equal_the_models_log_softmax(sdk, base, tokenizer):
    expected = greedy_reference(base, tokenizer, tokenizer.encode_prompt(HELLO), 8, 5)
    chat = sdk.chat.completions.create(model=BASE_ID, messages=HELLO, logprobs=True, top_logprobs=5, **NEW)
    content = chat.choices[0].logprobs.content
    assert len(content) == 8 and isinstance(content[0].top_logprobs[0].logprob, float)
    for got, (token, logprob, top) in zip(content, expected):
        assert got.token == token and got.bytes == list(token.encode())
        assert got.logprob == pytest.approx(logprob, abs=1e-4) == pytest.approx(top[0][1], abs=1e-4)  # greedy: the max
        assert [t.token for t in got.top_logprobs] == [t for t, _ in top]
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-4)
        assert [t.logprob for t in got.top_logprobs] == sorted((t.logprob for t in got.top_logprobs), reverse=True)
    chunks, _ = chat_stream(sdk, model=BASE_ID, messages=HELLO, logprobs=True, top_logprobs=5, **NEW)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == content
    plain = sdk.chat.completions.create(model=BASE_ID, messages=HELLO, **NEW)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == chat.choices[0].message.content


def test_completions_logprobs_are_the_legacy_columns(sdk, base, tokenizer):
    expected = greedy_reference(base, tokenizer, tokenizer.encode_prompt("the quick brown"), 8, 3)
    done = sdk.completions.create(model=BASE_ID, prompt="the quick brown", logprobs=3, **NEW)
    logprobs = done.choices[0].logprobs
    assert logprobs.tokens == [t for t, _, _ in expected]
    assert logprobs.token_logprobs == pytest.approx([v for _, v, _ in expected], abs=1e-4)
    for got, (token, logprob, top) in zip(logprobs.top_logprobs, expected):
        # The top 3 and the token itself, by text: tokens with one text share a key, the likeliest's.
        want = {t: v for t, v in reversed(top)}
        want.setdefault(token, logprob)
        assert list(got) == list(dict.fromkeys([t for t, _ in top] + [token]))
        assert got == pytest.approx(want, abs=1e-4)
    assert logprobs.text_offset == [sum(len(t) for t, _, _ in expected[:i]) for i in range(8)]
    streamed = list(sdk.completions.create(model=BASE_ID, prompt="the quick brown", logprobs=3, stream=True, **NEW))
    columns = [c.choices[0].logprobs for c in streamed if c.choices[0].logprobs]
    assert [t for c in columns for t in c.tokens] == logprobs.tokens
    assert [o for c in columns for o in c.text_offset] == logprobs.text_offset
    assert [d for c in columns for d in c.top_logprobs] == logprobs.top_logprobs
    zero = sdk.completions.create(model=BASE_ID, prompt="the quick brown", logprobs=0, **NEW).choices[0].logprobs
    assert zero.top_logprobs == [{t: v} for t, v in zip(zero.tokens, zero.token_logprobs)]
