"""The OpenAI API's shapes: a request body in, the runtime's types out, response objects back.

`parse_request` turns the JSON body of `POST /v1/chat/completions` or `/v1/completions` into a
`ParsedRequest`: the adapter its `model` names, its prompts and its `SamplingParams`, through the
checks both front doors share (`requests.py`, `SamplingParams`). A field the server does
not use (`user`, `metadata`, `parallel_tool_calls`, any unknown name) is ignored; a field that
would change the answer in a way the server cannot honour (`n` > 1, `tools`, a presence penalty,
...) is refused by name, never ignored. The builders below make the response objects and the
stream's chunks in the shapes the `openai` SDKs parse (`choices` always a list, `usage: null` on
every chunk but the usage chunk, logprobs as chat's `content` list or the completions API's
legacy columns). This file holds no state and does no I/O; `http_api.py` serves it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidParameterError, quote
from ..text.prompt import Prompt
from ..text.sampling_params import MAX_LOGPROBS, SamplingParams
from .requests import Message, check_message_count, request_prompt, request_sampling

# The most prompts one completions request may list; each is a request of its own in the queue.
MAX_PROMPTS = 64
# The most alternatives the completions API's integer `logprobs` may ask for, as OpenAI's own.
MAX_COMPLETION_LOGPROBS = 5
# What a logprob of -inf (a token the model rules out) is written as: JSON has no infinity. vLLM's value.
MIN_LOGPROB = -9999.0
# Body field -> SamplingParams field, for the settings passed through as they are.
_SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "repetition_penalty": "repetition_penalty", "seed": "seed"}
# Fields refused unless they hold their neutral value: ignoring them would change the answer silently.
_NEUTRAL = {
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "tools": ([],),
    "functions": ([],), "best_of": (1,), "echo": (False,), "suffix": ("",),
}
_WHY_REFUSED = {
    "presence_penalty": "use repetition_penalty (extra body) instead",
    "frequency_penalty": "use repetition_penalty (extra body) instead",
    "logit_bias": "this server does not bias logits",
    "tools": "this server does not call tools",
    "functions": "this server does not call functions",
    "best_of": "this server samples one completion per prompt",
    "echo": "this server does not echo the prompt",
    "suffix": "this server does not insert text",
}


class FieldError(InvalidParameterError):
    """A request field that is malformed or refused; `param` names it in the error body, and
    `code` is the OpenAI error code when one applies (`model_not_found`)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ParsedRequest:
    """What a chat or completions request asks for, in the runtime's types.

    Attributes:
        model: the `model` the client sent (echoed in every response).
        adapter: the adapter it names, or None for the base model.
        prompts: chat messages (one prompt) or the completion prompts, one choice each.
        params: sampling settings and stop conditions.
        stream: answer with Server-Sent Events.
        include_usage: end the stream with a usage chunk (`stream_options.include_usage`).
    """

    model: str
    adapter: str | None
    prompts: list[Prompt]
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_request(body: Any, *, chat: bool, base_id: str, adapters: Sequence[str], tokenizer: Any) -> ParsedRequest:
    """Read a chat (`chat=True`) or completions request body.

    Args:
        body: the parsed JSON.
        chat: /v1/chat/completions (messages) rather than /v1/completions (prompt).
        base_id: the base model's id, as /v1/models lists it.
        adapters: the names of the loaded adapters.
        tokenizer: the model's tokenizer (for its chat template).

    Raises:
        FieldError: a malformed or refused field, or a `model` that names nothing served (code
            `model_not_found`).
        InvalidParameterError: a sampling value out of range (`SamplingParams` names it).
    """
    if not isinstance(body, Mapping):
        raise FieldError(f"the request body must be a JSON object, got {quote(body)}")
    model = _typed(body, "model", str, default="")
    adapter = resolve_model(model, base_id, adapters)
    model = model or base_id  # the response names the model that answered
    if chat:
        prompts: list[Prompt] = [request_prompt("", _messages(body.get("messages")), tokenizer)]
    else:
        prompts = [request_prompt(p, (), tokenizer) for p in _prompts(body.get("prompt"))]
    for name, neutral in _NEUTRAL.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise FieldError(f"{name} {quote(body[name])} is not supported; {_WHY_REFUSED[name]}", name)
    n = _typed(body, "n", int, default=1)
    if n != 1:
        raise FieldError(f"n must be 1, got {quote(n)}: the engine does not share a prompt's prefill between "
                         "samples; send n requests (with different seeds) instead", "n")
    format_ = body.get("response_format")
    if format_ is not None and not (isinstance(format_, Mapping) and format_.get("type") in ("text", None)):
        raise FieldError(f"response_format {quote(format_)} is not supported; this server generates plain text",
                         "response_format")
    stream = _typed(body, "stream", bool, default=False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise FieldError(f"stream_options must be an object like {{'include_usage': true}}, got {quote(options)}",
                         "stream_options")
    include_usage = _typed(options or {}, "include_usage", bool, default=False, name="stream_options.include_usage")
    if stream and len(prompts) > 1:
        raise FieldError(f"a streamed completion takes one prompt, got {len(prompts)}; stream them one request each",
                         "prompt")
    return ParsedRequest(model, adapter, prompts, _sampling(body, _logprobs(body, chat)), stream, include_usage)


def resolve_model(model: str, base_id: str, adapters: Sequence[str]) -> str | None:
    """The adapter a request's `model` names: None for the base model (its id, or no model at all),
    the adapter for its name or `<base id>:<name>`.

    Raises:
        FieldError: `model` names neither the base nor a loaded adapter (code `model_not_found`).
    """
    if model in ("", base_id):
        return None
    name = model.removeprefix(f"{base_id}:")
    if name in adapters:
        return name
    raise FieldError(
        f"the model {quote(model)} does not exist on this server; GET /v1/models lists the base model "
        f"{base_id!r} and the loaded adapters", "model", "model_not_found",
    )


def _messages(raw: Any) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise FieldError(f"messages must be a non-empty list of {{'role', 'content'}} objects, got {quote(raw)}",
                         "messages")
    check_message_count(len(raw))
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise FieldError(f"messages[{i}] must be an object with a string role, got {quote(message)}", "messages")
        if message.get("content") is None and message["role"] != "assistant":
            raise FieldError(f"messages[{i}] ({quote(message['role'])}) has no content; only an assistant turn may "
                             "leave it out", "messages")
        messages.append(Message(message["role"], _content(message.get("content"), i)))
    return messages


def _content(content: Any, i: int) -> str:
    """A message's text: a string, null (an assistant turn without text), or text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise FieldError(f"messages[{i}].content must be a string or a list of text parts "
                     f"({{'type': 'text', 'text': ...}}); images and audio are not supported, got {quote(content)}",
                     "messages")


def _prompts(raw: Any) -> list[str]:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
        if len(raw) > MAX_PROMPTS:
            raise FieldError(f"prompt lists {len(raw)} prompts, more than the {MAX_PROMPTS} allowed; split the "
                             "request", "prompt")
        return raw
    raise FieldError(f"prompt must be a string or a non-empty list of strings (token ids are not supported), "
                     f"got {quote(raw)}", "prompt")


def _logprobs(body: Mapping[str, Any], chat: bool) -> int | None:
    """How many alternatives the request wants beside each token's logprob; None for no logprobs.

    Chat asks with `logprobs: true` and `top_logprobs` (0 to 20); completions with an integer
    `logprobs` (0 to 5, as OpenAI's API).
    """
    if not chat:
        if body.get("top_logprobs") is not None:
            raise FieldError("top_logprobs is a chat completions field; /v1/completions takes an integer logprobs "
                             f"(0 to {MAX_COMPLETION_LOGPROBS}) instead", "top_logprobs")
        count = _typed(body, "logprobs", int, default=None)
        if count is not None and not 0 <= count <= MAX_COMPLETION_LOGPROBS:
            raise FieldError(f"logprobs must be an integer in [0, {MAX_COMPLETION_LOGPROBS}] (the alternatives "
                             f"listed beside each token), got {quote(count)}", "logprobs")
        return count
    wanted = _typed(body, "logprobs", bool, default=False)
    top = _typed(body, "top_logprobs", int, default=None)
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise FieldError(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {quote(top)}", "top_logprobs")
    if top and not wanted:  # 0 asks for nothing, as logprobs: false
        raise FieldError(f"top_logprobs {top} needs logprobs: true; set it, or leave top_logprobs out", "top_logprobs")
    return (top or 0) if wanted else None


def _sampling(body: Mapping[str, Any], logprobs: int | None) -> SamplingParams:
    settings = {ours: body[theirs] for theirs, ours in _SAMPLING_FIELDS.items() if body.get(theirs) is not None}
    if logprobs is not None:
        settings["logprobs"] = logprobs
    if settings.get("top_k") == -1:  # vLLM's clients say "off" this way
        settings["top_k"] = 0
    for name in ("max_completion_tokens", "max_tokens"):  # the newer name wins where both are sent
        if body.get(name) is not None:
            settings["max_new_tokens"] = body[name]
            break
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif not (isinstance(stop, str) or isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise FieldError(f"stop must be a string or a list of strings, got {quote(stop)}", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list):
        raise FieldError(f"stop_token_ids must be a list of token ids, got {quote(stop_ids)}", "stop_token_ids")
    ignore_eos = _typed(body, "ignore_eos", bool, default=False)
    return request_sampling(settings, stop, stop_ids, ignore_eos)


def _typed(body: Mapping[str, Any], key: str, kind: type, *, default: Any, name: str | None = None) -> Any:
    """`body[key]`, or `default` when absent or null; a value of another JSON type is refused."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FieldError(f"{name or key} must be {_KINDS[kind]}, got {quote(value)}", name or key)
    return value


_KINDS = {str: "a string", int: "an integer", bool: "true or false"}


# -- responses ---------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(chat: bool, rid: str, created: int, model: str,
               choices: Sequence[tuple[str, str | None, Sequence[Any] | None]], usage_: dict[str, int]) -> dict[str, Any]:
    """A whole response: one choice per (text, finish reason, `TokenLogprob`s or None)."""
    if chat:
        made = [{"index": i, "message": {"role": "assistant", "content": text},
                 "logprobs": logprobs_object(chat, logprobs), "finish_reason": reason}
                for i, (text, reason, logprobs) in enumerate(choices)]
    else:
        made = [{"index": i, "text": text, "logprobs": logprobs_object(chat, logprobs), "finish_reason": reason}
                for i, (text, reason, logprobs) in enumerate(choices)]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": made, "usage": usage_}


def chunk(chat: bool, rid: str, created: int, model: str, text: str | None, finish_reason: str | None,
          include_usage: bool, *, role: bool = False, logprobs: Sequence[Any] | None = None,
          text_offset: int = 0) -> dict[str, Any]:
    """One streamed chunk of choice 0: new text (with the logprobs of its tokens, the completions
    API's offsets counted from `text_offset`), or (`text` None) the finish reason alone; with
    `role`, the chat stream's first chunk, which names the assistant."""
    made_logprobs = logprobs_object(chat, logprobs, text_offset)
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": made_logprobs,
                                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": made_logprobs, "finish_reason": finish_reason}
    made = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice]}
    if include_usage:
        made["usage"] = None
    return made


def logprobs_object(chat: bool, logprobs: Sequence[Any] | None, text_offset: int = 0) -> dict[str, Any] | None:
    """A choice's `logprobs` from its `TokenLogprob`s (None when the request asked for none).

    Chat: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.
    Completions, OpenAI's legacy columns: `tokens`, `token_logprobs`, `top_logprobs` (one
    `{token: logprob}` per token: its alternatives and itself, so up to logprobs + 1 entries;
    tokens with the same text share one key, the likeliest's) and `text_offset` (where each token's text begins:
    `text_offset` plus the lengths of the token strings before it, as vLLM counts).
    """
    if logprobs is None:
        return None
    if chat:
        return {"content": [{**_token(lp), "top_logprobs": [_token(t) for t in lp.top_logprobs]} for lp in logprobs],
                "refusal": None}
    offsets = []
    for lp in logprobs:
        offsets.append(text_offset)
        text_offset += len(lp.token)
    return {"tokens": [lp.token for lp in logprobs], "token_logprobs": [_finite(lp.logprob) for lp in logprobs],
            "top_logprobs": [_legacy_top(lp) for lp in logprobs],
            "text_offset": offsets}


def _legacy_top(lp: Any) -> dict[str, float]:
    top: dict[str, float] = {}
    for t in (*lp.top_logprobs, lp):  # most likely first: a text shared by several keeps the likeliest's
        top.setdefault(t.token, _finite(t.logprob))
    return top


def _token(lp: Any) -> dict[str, Any]:
    return {"token": lp.token, "logprob": _finite(lp.logprob), "bytes": list(lp.token.encode("utf-8"))}


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def usage_chunk(chat: bool, rid: str, created: int, model: str, usage_: dict[str, int]) -> dict[str, Any]:
    """The stream's last chunk before `[DONE]` under `include_usage`: usage, and no choices."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage_}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """An error in the shape every OpenAI client reads."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
