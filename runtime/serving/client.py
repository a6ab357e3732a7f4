"""A small synchronous Python client of the quadapt gRPC server (`quadapt.v1.Generation`).

`Client(target, token=..., tls=...)` opens a channel; its methods are the service's RPCs with
keyword arguments in, plain dataclasses out (`Completion`, `Chunk`, `AdapterInfo`,
`ServerInfo`), so callers never touch protobuf. A failed call raises `ServerError`, which
carries the status code name (`"NOT_FOUND"`, ...) and the server's message. Other languages
generate their client from `protos/quadapt/v1/generation.proto`; this file is a convenience,
not the contract.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ...protos.quadapt.v1 import generation_pb2 as pb
from ...protos.quadapt.v1 import generation_pb2_grpc as pb_grpc
from ..errors import InvalidParameterError, QuadaptError

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


class ServerError(QuadaptError):
    """A call the server (or the channel) refused.

    Attributes:
        code: the gRPC status code's name, e.g. "NOT_FOUND", "INVALID_ARGUMENT", "UNAVAILABLE".
        details: the server's message.
    """

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class Completion:
    """A finished generation.

    Attributes:
        text: the generated text; token_ids: its tokens.
        finish_reason: "stop" (eos or a stop string) or "length".
        stop_reason: the eos token id or the stop string that ended it, else None.
        prompt_tokens, completion_tokens: usage.
        context_full: it ended because the model's context was full.
        request_id: the server's id of the request (its logs use it).
    """

    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    prompt_tokens: int
    completion_tokens: int
    context_full: bool
    request_id: str


@dataclass(frozen=True)
class Chunk:
    """One piece of a streamed generation; the last has `finished` True and the fields of `Completion`."""

    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    prompt_tokens: int
    completion_tokens: int
    context_full: bool
    request_id: str


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded adapter: name, content digest, rank, pinned, whether it holds a device slot, and
    the unfinished requests using it."""

    name: str
    digest: str
    rank: int
    pinned: bool
    in_slot: bool
    requests: int


@dataclass(frozen=True)
class ServerInfo:
    """The model served and the server's limits (fields as in the proto's ServerInfoResponse)."""

    model: str
    version: str
    max_context_tokens: int
    vocab_size: int
    chat_template: bool
    max_queue: int
    max_batch: int
    max_loras: int
    max_lora_rank: int
    max_message_bytes: int
    state: str = "SERVING"  # "SERVING", "DRAINING" or "FAILED" (the proto's ServerState without its prefix)


class Client:
    """A connection to a quadapt server.

    Args:
        target: "host:port".
        token: the bearer token to send (`authorization: Bearer <token>`), if the server wants one.
        tls: use TLS; implied by any of the three files below.
        ca_cert: PEM file of the CA to trust (default: the system's roots).
        client_cert, client_key: PEM files of this client's certificate and key (mutual TLS).
        server_name: the name the server's certificate must carry, when it is not the target's host.
        timeout: the default deadline of each call, in seconds (None: no deadline).
        max_message_bytes: the largest response message accepted.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        ca_cert: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        server_name: str | None = None,
        timeout: float | None = None,
        max_message_bytes: int = 4 * 2**20,
    ) -> None:
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", max_message_bytes)]
        if server_name is not None:
            options.append(("grpc.ssl_target_name_override", server_name))
        if (client_cert is None) != (client_key is None):
            raise InvalidParameterError("client_cert and client_key go together (mutual TLS): give both or neither")
        if tls or ca_cert is not None or client_cert is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(ca_cert), private_key=_read(client_key), certificate_chain=_read(client_cert)
            )
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        self.timeout = timeout

    def generate(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str]] | None = None,
                 adapter: str | None = None, timeout: float | None = None, **settings: Any) -> Completion:
        """Generate a whole completion.

        Args:
            prompt: raw prompt text (no chat template); or
            messages: chat messages `[{"role": ..., "content": ...}]`, rendered by the server's template.
            adapter: a loaded adapter's name; None for the base model.
            timeout: this call's deadline in seconds (default: the client's).
            **settings: max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop (a
                list of strings), seed, ignore_eos; unset ones take the server's defaults (greedy,
                128 new tokens).

        Raises:
            ServerError: e.g. NOT_FOUND for an unknown adapter, INVALID_ARGUMENT naming a bad setting.
        """
        request = _request(prompt, messages, adapter, settings)
        response = self._call(self._stub.Generate, request, timeout, adapter)
        return Completion(
            response.text, list(response.token_ids), _FINISH.get(response.finish_reason), _stop_reason(response),
            response.usage.prompt_tokens, response.usage.completion_tokens, response.context_full, response.request_id,
        )

    def generate_stream(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str]] | None = None,
                        adapter: str | None = None, timeout: float | None = None, **settings: Any) -> Iterator[Chunk]:
        """Generate, yielding `Chunk`s as the text comes (arguments as `generate`). Leaving the
        loop early cancels the request on the server.

        Raises:
            ServerError: as `generate`, when the first chunk is asked for (or mid-stream).
        """
        request = _request(prompt, messages, adapter, settings)
        call = self._stub.GenerateStream(request, timeout=self._timeout(timeout), metadata=self._routed(adapter))
        finished = False
        try:
            for message in call:
                finished = message.finish_reason != pb.FINISH_REASON_UNSPECIFIED
                yield Chunk(
                    message.text, list(message.token_ids), finished, _FINISH.get(message.finish_reason),
                    _stop_reason(message), message.usage.prompt_tokens, message.usage.completion_tokens,
                    message.context_full, message.request_id,
                )
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            if not finished:
                call.cancel()

    def tokenize(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str]] | None = None) -> list[int]:
        """The token ids the server feeds the model for this prompt (or these messages)."""
        request = pb.TokenizeRequest(prompt=prompt or "", messages=_messages(messages))
        return list(self._call(self._stub.Tokenize, request).token_ids)

    def list_adapters(self) -> list[AdapterInfo]:
        """The loaded adapters, by name."""
        response = self._call(self._stub.ListAdapters, pb.ListAdaptersRequest())
        return [_adapter(a) for a in response.adapters]

    def load_adapter(self, name: str, path: str, *, pinned: bool = False) -> tuple[AdapterInfo, str]:
        """Load (or reload) an adapter from a directory the server allows. Needs the admin token
        when the server has one. Returns the adapter and what happened: "LOADED", "RELOADED" or
        "UNCHANGED"."""
        response = self._call(self._stub.LoadAdapter, pb.LoadAdapterRequest(name=name, path=str(path), pinned=pinned))
        outcome = pb.LoadAdapterResponse.Outcome.Name(response.outcome).removeprefix("OUTCOME_")
        return _adapter(response.adapter), outcome

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter (admin)."""
        self._call(self._stub.UnloadAdapter, pb.UnloadAdapterRequest(name=name))

    def server_info(self) -> ServerInfo:
        response = self._call(self._stub.ServerInfo, pb.ServerInfoRequest())
        fields = {f.name: getattr(response, f.name) for f in response.DESCRIPTOR.fields}
        fields["state"] = pb.ServerState.Name(response.state).removeprefix("SERVER_STATE_")
        return ServerInfo(**fields)

    def health(self, service: str = "") -> str:
        """The standard health check: "SERVING", "NOT_SERVING", ... ("" is the whole server)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        response = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout: float | None = None, adapter: str | None = None) -> Any:
        try:
            return method(request, timeout=self._timeout(timeout), metadata=self._routed(adapter))
        except grpc.RpcError as e:
            raise _error(e) from None

    def _routed(self, adapter: str | None) -> tuple[tuple[str, str], ...]:
        """The call's metadata: the token, and the adapter as `multiplexed_model_id`, which Ray
        Serve routes by (to a replica that holds it; `quadapt serve --ray`). A single server
        ignores it: the request's own `adapter` field is what selects the adapter."""
        return (*self._metadata, ("multiplexed_model_id", adapter)) if adapter else self._metadata

    def _timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout


def _request(prompt: str | None, messages: Sequence[Mapping[str, str]] | None, adapter: str | None,
             settings: dict[str, Any]) -> pb.GenerateRequest:
    known = {"max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed", "ignore_eos"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InvalidParameterError(f"unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    given = {k: v for k, v in settings.items() if v is not None}
    if isinstance(given.get("stop"), str):
        given["stop"] = [given["stop"]]
    try:
        return pb.GenerateRequest(prompt=prompt or "", messages=_messages(messages), adapter=adapter or "", **given)
    except (TypeError, ValueError) as e:  # a value protobuf cannot hold, e.g. a negative max_new_tokens
        raise InvalidParameterError(f"bad setting: {e}") from None


def _messages(messages: Sequence[Mapping[str, str]] | None) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages or ()]


def _stop_reason(message: pb.GenerateResponse | pb.GenerateStreamResponse) -> int | str | None:
    which = message.WhichOneof("stop_reason")
    return getattr(message, which) if which is not None else None


def _adapter(info: pb.AdapterInfo) -> AdapterInfo:
    return AdapterInfo(info.name, info.digest, info.rank, info.pinned, info.in_slot, info.requests)


def _error(e: grpc.RpcError) -> ServerError:
    code = e.code() if hasattr(e, "code") else None
    return ServerError(code.name if code is not None else "UNKNOWN", e.details() if hasattr(e, "details") else str(e))


def _read(path: str | Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidParameterError(f"cannot read {str(path)!r}: {e}") from None
