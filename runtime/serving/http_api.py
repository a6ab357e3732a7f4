"""The OpenAI-compatible HTTP API, served beside gRPC by the same server over the same engine.

Starlette routes under uvicorn, on the server's event loop: `POST /v1/chat/completions` and
`/v1/completions` (streamed as Server-Sent Events or not), `GET /v1/models` (the base model and
every loaded adapter), `GET /health`, `GET /metrics`, and the admin routes
`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`. Every route goes through the
server's own checks, as the gRPC service does: the bearer token (`Authorization: Bearer`, the
admin token for the admin routes), the server's state, the request's parsing and limits
(`http_openai.py` over `requests.py`), the queue and drain (`Server.generation`) and the
adapter-directory confinement (`Server.load_adapter`). An error answers in OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`) with the HTTP status of the gRPC code the
same error gets on the other door. A client that disconnects mid-stream has its request
cancelled and its cache blocks freed before the engine's next step.

This file holds the HTTP plumbing only: what a field means is `http_openai.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import InvalidParameterError, QuadaptError
from .http_openai import FieldError, ParsedRequest, chunk, completion, error_body, parse_request, usage, usage_chunk
from .requests import error_status
from .security import Refusal

logger = logging.getLogger(__name__)

# A gRPC status code's HTTP status and OpenAI error type.
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
}
_INTERNAL = (500, "server_error")


class _HTTPError(Exception):
    """An HTTP-only refusal (a body too large, a body that is not JSON, a route that is not one)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param = status, type_, param


def make_app(server: Any) -> Any:
    """The Starlette application over `server` (a `server.Server`)."""
    api = _API(server)
    routes = [
        Route("/v1/chat/completions", api.route("chat", api.chat), methods=["POST"]),
        Route("/v1/completions", api.route("completions", api.completions), methods=["POST"]),
        Route("/v1/models", api.route("models", api.models), methods=["GET"]),
        Route("/v1/load_lora_adapter", api.route("load_lora_adapter", api.load, admin=True), methods=["POST"]),
        Route("/v1/unload_lora_adapter", api.route("unload_lora_adapter", api.unload, admin=True), methods=["POST"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.route("metrics", api.metrics, any_state=True), methods=["GET"]),
    ]

    async def not_found(request: Any, exc: Any) -> Any:
        status = getattr(exc, "status_code", 404)
        what = "method not allowed" if status == 405 else "no such route"
        return _error_response(status, f"{what}: {request.method} {request.url.path}; see docs/http.md for the API",
                               "invalid_request_error")

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


class _API:
    def __init__(self, server: Any) -> None:
        self.server = server

    def route(self, name: str, handler: Callable[[Any, Any], Awaitable[Any]], *, admin: bool = False,
              any_state: bool = False) -> Callable[[Any], Awaitable[Any]]:
        """Wrap a handler: check the token and the server's state, read the JSON body (capped),
        answer an error in OpenAI's shape, count and log it."""
        server = self.server

        async def endpoint(request: Any) -> Any:
            who = _who(request)
            try:
                # Starlette decodes headers as latin-1: give back the bytes sent, read as the tokens are (UTF-8).
                header = request.headers.get("authorization", "").encode("latin-1").decode("utf-8", "replace")
                server.check_token([("authorization", header)], admin=admin)
                if not any_state:
                    server.check_serving()
                body = await self._body(request) if request.method == "POST" else None
                response = await handler(request, body)
            except (Refusal, QuadaptError, _HTTPError) as e:
                status, type_, param, code = _describe(e)
                server.metrics.http_requests.labels(name, str(status)).inc()
                server.log_refusal(name, _grpc_code(e), who, str(e))
                return _error_response(status, str(e), type_, param, code)
            except Exception:
                logger.exception("%s failed", name)
                server.metrics.http_requests.labels(name, "500").inc()
                return _error_response(500, f"internal error in {name}; the server log has the details", "server_error")
            server.metrics.http_requests.labels(name, str(response.status_code)).inc()
            return response

        return endpoint

    async def _body(self, request: Any) -> Any:
        limit = self.server.config.max_message_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _HTTPError(413, f"the request body has {length} bytes, more than the {limit} allowed; shorten it")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > limit:
                raise _HTTPError(413, f"the request body is over the {limit} bytes allowed; shorten it")
        try:
            return json.loads(data)
        except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past the parser's depth
            raise _HTTPError(400, "the request body is not valid JSON; send a JSON object "
                                  "(Content-Type: application/json)") from None

    # -- routes ------------------------------------------------------------------------------

    async def chat(self, request: Any, body: Any) -> Any:
        return await self._generate(request, body, chat=True)

    async def completions(self, request: Any, body: Any) -> Any:
        return await self._generate(request, body, chat=False)

    async def _generate(self, request: Any, body: Any, *, chat: bool) -> Any:
        server = self.server
        parsed = parse_request(body, chat=chat, base_id=server.model_id,
                               adapters=[v.name for v in server.adapter_versions()], tokenizer=server.llm.tokenizer)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        created = int(time.time())
        who = _who(request)
        if parsed.stream:
            return await _stream(server, request, parsed, chat, rid, created, who)

        async def one(prompt: Any) -> tuple[str, str | None, list[Any] | None, int, int]:
            text, last = "", None
            logprobs: list[Any] | None = None if parsed.params.logprobs is None else []
            async with server.generation(prompt, parsed.params, parsed.adapter, who=f" {who}") as generation:
                async for delta in generation:
                    text += delta.text
                    if logprobs is not None:
                        logprobs += delta.logprobs or ()
                    last = delta
            return text, last.finish_reason, logprobs, last.prompt_tokens, last.completion_tokens

        async def every() -> list[tuple[str, str | None, list[Any] | None, int, int]]:
            try:
                async with asyncio.TaskGroup() as group:  # one prompt failing cancels the others
                    tasks = [group.create_task(one(p)) for p in parsed.prompts]
            except BaseExceptionGroup as e:
                raise e.exceptions[0] from None  # answered as that error alone
            return [t.result() for t in tasks]

        results = await _unless_disconnected(request, every())
        if results is None:
            return Response(status_code=499)  # nobody to answer; the requests were cancelled
        total = usage(sum(r[3] for r in results), sum(r[4] for r in results))
        return JSONResponse(completion(chat, rid, created, parsed.model, [r[:3] for r in results], total))

    async def models(self, request: Any, body: Any) -> Any:
        base, created = self.server.model_id, self.server.started
        data = [{"id": base, "object": "model", "created": created, "owned_by": "quadapt", "root": base,
                 "parent": None}]
        data += [{"id": v.name, "object": "model", "created": created, "owned_by": "quadapt", "root": v.name,
                  "parent": base} for v in self.server.adapter_versions()]
        return JSONResponse({"object": "list", "data": data})

    async def load(self, request: Any, body: Any) -> Any:
        name, path = _string(body, "lora_name"), _string(body, "lora_path")
        version, outcome = await self.server.load_adapter(name, path)
        return JSONResponse({"lora_name": version.name, "outcome": outcome, "digest": version.digest,
                             "rank": version.max_rank})

    async def unload(self, request: Any, body: Any) -> Any:
        name = _string(body, "lora_name")
        await self.server.unload_adapter(name)
        return JSONResponse({"lora_name": name, "outcome": "unloaded"})

    async def health(self, request: Any) -> Any:
        try:
            self.server.check_serving()
        except Refusal as e:
            return _error_response(503, str(e), "service_unavailable")
        return JSONResponse({"status": "serving"})

    async def metrics(self, request: Any, body: Any) -> Any:
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(self.server.metrics.registry), media_type=content_type)


async def _stream(server: Any, request: Any, parsed: ParsedRequest, chat: bool, rid: str, created: int,
                  who: str) -> Any:
    """Admit the request and wait for its first delta, so that a refusal still gets its status;
    then stream the rest as Server-Sent Events."""
    stack = contextlib.AsyncExitStack()
    try:
        generation = await stack.enter_async_context(
            server.generation(parsed.prompts[0], parsed.params, parsed.adapter, who=f" {who}"))
        deltas = generation.__aiter__()
        first = await _unless_disconnected(request, deltas.__anext__())  # the prefill: seconds under load
    except BaseException:
        await stack.aclose()
        raise
    if first is None:
        await stack.aclose()
        return Response(status_code=499)  # nobody to answer; the request was cancelled

    def event(data: Any) -> bytes:
        return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

    async def events() -> AsyncIterator[bytes]:
        model, usage_on = parsed.model, parsed.include_usage
        if chat:
            yield event(chunk(chat, rid, created, model, None, None, usage_on, role=True))
        delta, offset = first, 0  # offset: where the next token's text begins, for the completions API's logprobs
        try:
            while True:
                if delta.text or delta.logprobs:
                    yield event(chunk(chat, rid, created, model, delta.text, None, usage_on, logprobs=delta.logprobs,
                                      text_offset=offset))
                    offset += sum(len(lp.token) for lp in delta.logprobs or ())
                if delta.finished:
                    yield event(chunk(chat, rid, created, model, None, delta.finish_reason, usage_on))
                    if usage_on:
                        yield event(usage_chunk(chat, rid, created, model,
                                                usage(delta.prompt_tokens, delta.completion_tokens)))
                    break
                delta = await deltas.__anext__()
        except (QuadaptError, Refusal) as e:  # after the headers: the error goes in the stream
            status, type_, param, code = _describe(e)
            yield event(error_body(str(e), type_, param, code))
        except Exception:
            logger.exception("%s: the stream failed", who)
            yield event(error_body("internal error while streaming; the server log has the details", "server_error"))
        yield b"data: [DONE]\n\n"

    return _EventStream(events(), stack)


class _EventStream(StreamingResponse):
    """Server-Sent Events that end the generation however the response ends: finished, the client
    gone (noticed while it waits for a token too), or the server stopping."""

    def __init__(self, content: AsyncIterator[bytes], stack: contextlib.AsyncExitStack) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._stack = stack

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def respond() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(respond)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self._stack.aclose()  # aborts the request unless it finished: its blocks are freed


async def _unless_disconnected(request: Any, work: Awaitable[Any]) -> Any:
    """`await work`, cancelled (returning None) if the client disconnects first, as gRPC cancels
    an RPC whose client went away: its requests are aborted and their cache blocks freed."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":  # the body is read: this waits
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            return None
        raise
    finally:
        watcher.cancel()


def _string(body: Any, key: str) -> str:
    value = body.get(key) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value:
        raise FieldError(f"{key} must be a non-empty string, got {value!r:.64}", key)
    return value


def _describe(error: Exception) -> tuple[int, str, str | None, str | None]:
    """An error's HTTP status, OpenAI error type, param and code."""
    if isinstance(error, _HTTPError):
        return error.status, error.type, error.param, None
    grpc_code = _grpc_code(error)
    status, type_ = _HTTP.get(grpc_code, _INTERNAL)
    param = getattr(error, "param", None)
    code = getattr(error, "code", None) if isinstance(error, FieldError) else None
    if code is None:
        code = "model_not_found" if grpc_code == grpc.StatusCode.NOT_FOUND else grpc_code.name.lower()
    return status, type_, param, code


def _grpc_code(error: Exception) -> grpc.StatusCode:
    if isinstance(error, Refusal):
        return error.code
    if isinstance(error, FieldError) and error.code == "model_not_found":
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, QuadaptError):
        return error_status(error)
    return grpc.StatusCode.INVALID_ARGUMENT  # _HTTPError: logged under the code its status means


def _error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> Any:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def _who(request: Any) -> str:
    """The client's address and x-request-id, printable and short, for the log."""
    client = request.client
    where = f"{client.host}:{client.port}" if client is not None else "?"
    rid = request.headers.get("x-request-id")
    clean = "".join(c for c in (rid or "")[:64] if c.isprintable())
    return f"{where}{f' x-request-id={clean!r}' if rid else ''}"


# -- the uvicorn server --------------------------------------------------------------------


class HTTPFrontDoor:
    """uvicorn serving `make_app(server)` on the running event loop, on a socket bound here (so
    that port 0 gives its port at once and a port in use is a clear error). uvicorn's own signal
    handling is off: `serve` owns SIGTERM and SIGINT and drains both doors."""

    def __init__(self, server: Any, host: str, port: int) -> None:
        config = server.config
        options: dict[str, Any] = {}
        if config.tls_cert is not None:
            options = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key}
            if config.tls_client_ca is not None:
                options |= {"ssl_ca_certs": config.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self._config = uvicorn.Config(make_app(server), log_config=None, access_log=False, lifespan="off",
                                      server_header=False, **options)
        try:
            self._config.load()  # reads the TLS files
        except (OSError, ssl.SSLError) as e:
            raise InvalidParameterError(f"cannot use the TLS files for the HTTP API: {e}") from None
        host = host.strip("[]")
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            self._socket = socket.socket(family, socket.SOCK_STREAM)
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own; not REUSEPORT
            self._socket.bind((host, port))
        except OSError as e:
            raise InvalidParameterError(f"cannot serve HTTP on {host}:{port}: {e}; is the port in use?") from None
        self.port = self._socket.getsockname()[1]
        self._config.loaded_app = self._track(self._config.loaded_app)
        self._uvicorn = _Uvicorn(self._config)
        self._task: asyncio.Future[None] | None = None
        self._requests: set[asyncio.Task[Any]] = set()

    def _track(self, app: Any) -> Any:
        """The app, with each request's task kept, so that `stop` can cancel those in flight."""

        async def tracked(scope: Any, receive: Any, send: Any) -> None:
            task = asyncio.current_task()
            self._requests.add(task)
            try:
                await app(scope, receive, send)
            finally:
                self._requests.discard(task)

        return tracked

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._uvicorn.serve(sockets=[self._socket]))
        while not self._uvicorn.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise InvalidParameterError("the HTTP server stopped while it started; see the log")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Close the port and cancel the requests in flight (their generations abort)."""
        for task in list(self._requests):
            task.cancel()
        self._uvicorn.should_exit = self._uvicorn.force_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._socket.close()


class _Uvicorn(uvicorn.Server):
    def capture_signals(self) -> Any:  # `serve` handles the signals, for both doors
        return contextlib.nullcontext()
