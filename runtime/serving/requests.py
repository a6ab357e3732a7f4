"""What a request to either front door becomes: a prompt, sampling settings, and a status for its errors.

The gRPC service (`rpc.py`) and the OpenAI-compatible HTTP API (`http_api.py`) parse their
own wire formats, then hand the parts to these functions, so that a request is checked by one set
of rules whatever door it came through: the message count, roles and chat template here, the
prompt's size in `encode_prompt` (before it is tokenized, in a worker thread), and every sampling
field and stop list in `SamplingParams`. `error_status` maps a runtime error to a gRPC status
code; the HTTP door maps that code to an HTTP status, so the two never disagree on what an error
is. This file reads no wire format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import grpc

from ..errors import (
    AdapterError, CheckpointError, ConfigError, ContextLengthError, EngineDeadError, InvalidParameterError,
    QuadaptError, RequestFailedError, UnsupportedError,
)
from ..text.prompt import MAX_MESSAGES, Prompt
from ..engine.registry import AdapterInUseError, AdapterNotFoundError, NoAdapterSlotsError
from ..engine.sampling import SamplingParams

# A QuadaptError's status code, by type; the first match wins (subclasses first).
_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (RequestFailedError, grpc.StatusCode.INTERNAL),
    (EngineDeadError, grpc.StatusCode.UNAVAILABLE),
    (AdapterNotFoundError, grpc.StatusCode.NOT_FOUND),
    (AdapterInUseError, grpc.StatusCode.FAILED_PRECONDITION),
    (ContextLengthError, grpc.StatusCode.INVALID_ARGUMENT),
    (NoAdapterSlotsError, grpc.StatusCode.FAILED_PRECONDITION),  # the server's configuration, not the request
    (InvalidParameterError, grpc.StatusCode.INVALID_ARGUMENT),
    # An adapter file that is corrupt, unsupported or made for another base.
    (AdapterError, grpc.StatusCode.FAILED_PRECONDITION),
    (CheckpointError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnsupportedError, grpc.StatusCode.FAILED_PRECONDITION),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (QuadaptError, grpc.StatusCode.INVALID_ARGUMENT),
)


class Message(NamedTuple):
    """One chat message as a front door parsed it."""

    role: str
    content: str


def check_message_count(count: int) -> None:
    """Refuse a conversation of more than `MAX_MESSAGES` messages, before anything is made of each.

    Raises:
        InvalidParameterError: too many messages.
    """
    if count > MAX_MESSAGES:
        raise InvalidParameterError(
            f"messages holds {count} messages, more than the {MAX_MESSAGES} allowed; shorten the conversation"
        )


def request_prompt(prompt: str, messages: Sequence[Any], tokenizer: Any) -> Prompt:
    """The prompt text, or the chat messages, of a request; exactly one must be given.

    Args:
        prompt: raw text ("" when the request sends messages).
        messages: chat messages, each with a `role` and a `content` string (a `Message`, or a
            protobuf message).
        tokenizer: the model's tokenizer (for its chat template).

    Returns:
        The prompt, or the messages as `[{"role": ..., "content": ...}]`.

    Raises:
        InvalidParameterError: both or neither given, too many messages, an empty role, or
            messages for a model without a chat template.
    """
    check_message_count(len(messages))
    if prompt and messages:
        raise InvalidParameterError("give exactly one of prompt (raw text) and messages (chat), not both")
    if not messages:
        if not prompt:
            raise InvalidParameterError("prompt is empty and there are no messages; give one of the two")
        return prompt
    for i, message in enumerate(messages):
        if not message.role:
            raise InvalidParameterError(f"messages[{i}].role is empty; use e.g. 'system', 'user' or 'assistant'")
    if tokenizer.chat_template is None:
        raise InvalidParameterError("messages need a chat template, which this model has none of; send raw text in prompt")
    return [{"role": m.role, "content": m.content} for m in messages]


def request_sampling(settings: Mapping[str, Any], stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                     ignore_eos: bool = False) -> SamplingParams:
    """A request's sampling settings; a field it leaves out takes SamplingParams' default.

    Args:
        settings: the sampling fields the request set, by `SamplingParams` name.
        stop, stop_token_ids, ignore_eos: its stop conditions (one stop string is a list of one).

    Raises:
        InvalidParameterError: a value outside its range (`SamplingParams` names the field).
    """
    stop = [stop] if isinstance(stop, str) else list(stop)
    return SamplingParams(**settings, stop=stop, stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos)


def error_status(error: QuadaptError) -> grpc.StatusCode:
    """The status code a runtime error answers with, on either front door."""
    return next(code for kind, code in _CODES if isinstance(error, kind))
