"""The HTTP API as part of the server: TLS with gRPC's certificate, the shared queue limit, the
drain, start-up errors, and `quadapt serve --http-port` as a process.

`test_http.py` checks what the API answers; this file checks that it lives and dies with the
server: one queue counts both doors (429 on HTTP when gRPC filled it), a drain refuses new HTTP
requests with 503 while an HTTP stream in flight finishes, and SIGTERM stops both.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import openai
import pytest

from quadapt.runtime.api.async_llm import AsyncLLM
from quadapt.runtime.errors import InvalidParameterError
from quadapt.runtime.serving.server import ServerConfig

from .test_server import HELLO, ServerThread, Throttle, make_engine, wait_until
from .test_server_security import base, certs, tokenizer  # noqa: F401 - fixtures

NEW = {"max_tokens": 8, "extra_body": {"ignore_eos": True}}


def http_sdk(port: int, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=options.pop("api_key", "none"),
                         max_retries=0, timeout=30, **options)


def test_https_with_the_grpc_certificate(base, tokenizer, certs):
    config = ServerConfig(model=str(base), port=0, http_port=0, tls_cert=certs.server_pem, tls_key=certs.server_key)
    served = ServerThread(config, AsyncLLM.from_engine(make_engine(base, {}, tokenizer), tokenizer))
    try:
        url = f"https://localhost:{served.server.http_port}/v1"
        with openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=30,
                           http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=certs.ca_pem))) as client:
            done = client.completions.create(model="", prompt="over TLS", **NEW)
            assert done.usage.completion_tokens == 8
        with openai.OpenAI(base_url=url.replace("https", "http"), api_key="none", max_retries=0, timeout=10) as plain:
            with pytest.raises(openai.APIConnectionError):
                plain.models.list()
    finally:
        served.close()


def test_the_queue_is_shared_and_a_drain_refuses_new_requests(base, tokenizer):
    throttle = Throttle()
    engine = throttle.wrap(make_engine(base, {}, tokenizer))
    served = ServerThread(ServerConfig(model=str(base), port=0, http_port=0, max_queue=2, drain_timeout_s=30),
                          AsyncLLM.from_engine(engine, tokenizer))
    port = served.server.http_port
    try:
        throttle.delay = 0.05
        with served.client() as grpc_client, http_sdk(port) as sdk:
            streams = [grpc_client.generate_stream("hold", max_new_tokens=30, ignore_eos=True)]
            next(streams[0])
            http_stream = sdk.completions.create(model="", prompt="hold too", stream=True, max_tokens=30,
                                                 extra_body={"ignore_eos": True})
            next(iter(http_stream))
            with pytest.raises(openai.RateLimitError, match="queue is full"):
                sdk.completions.create(model="", prompt="one too many", **NEW)
            for chunk in streams[0]:
                pass
            draining = served.submit(served.server.drain())
            wait_until(lambda: served.server.state == "draining", what="the drain to begin")
            with pytest.raises(openai.APIStatusError) as refused:
                sdk.completions.create(model="", prompt="late", **NEW)
            assert refused.value.status_code == 503 and "shutting down" in refused.value.message
            with pytest.raises(urllib.error.HTTPError) as health:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10)
            assert health.value.code == 503 and json.loads(health.value.read())["error"]["type"] == "service_unavailable"
            rest = list(http_stream)  # the stream in flight finishes
            assert rest[-1].choices[0].finish_reason == "length"
            throttle.delay = 0.0
            assert draining.result(30) is True
    finally:
        served.close()


def test_http_start_up_errors_are_clear(base, tokenizer):
    with pytest.raises(InvalidParameterError, match="http_port.*gRPC port"):
        ServerConfig(model=str(base), port=50999, http_port=50999)
    with pytest.raises(InvalidParameterError, match="http_host"):
        ServerConfig(model=str(base), http_host=" ")
    first = ServerThread(ServerConfig(model=str(base), port=0, http_port=0),
                         AsyncLLM.from_engine(make_engine(base, {}, tokenizer), tokenizer))
    try:
        taken = ServerConfig(model=str(base), port=0, http_port=first.server.http_port)
        with pytest.raises(InvalidParameterError, match="cannot serve HTTP.*in use"):
            first.run(_start(taken))
    finally:
        first.close()


async def _start(config: ServerConfig) -> None:
    from quadapt.runtime.serving.server import start

    await start(config, llm=lambda: None)


def test_quadapt_serve_http_port_as_a_process(base):
    command = [sys.executable, "-m", "quadapt.cli", "serve", "--model", str(base), "--port", "0", "--http-port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd="/tmp",
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        port = None
        for line in process.stderr:
            if found := re.search(r"HTTP API on http://\S+:(\d+)/v1", line):
                port = int(found[1])
                break
        assert port is not None, f"no HTTP port logged (exit {process.poll()})"
        threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
        wait_until(lambda: _healthy(port), timeout=60, what="the served model to load")
        with http_sdk(port) as sdk:
            reply = sdk.chat.completions.create(model=os.path.basename(str(base)), messages=HELLO, **NEW)
            assert reply.usage.completion_tokens == 8
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False
