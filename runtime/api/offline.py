"""Offline batches: a JSONL file of requests in, one JSON line per finished request out (`quadapt batch`).

Each input line is one request (an id, a raw `prompt` or chat `messages`, an adapter name, and
sampling settings, `LINE_DEFAULTS` unless the caller gives others); `parse_request_line` turns it
into a `GenerateRequest` or a clear error naming the key. `run_jsonl` feeds the requests to an `LLM` as
it has room (so a large file is never held whole) and writes each result as its request
finishes; a bad line is reported (logged with its number) and the others still run.

It reads and writes streams the caller opened; choosing files, flags and the model is the CLI's.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Iterable, Mapping
from typing import TextIO

from ..errors import InvalidParameterError, QuadaptError
from .llm import LLM, GenerateRequest
from ..engine.sampling import SAMPLING_DEFAULTS, SamplingParams
from ..text.tokenizer import check_text

logger = logging.getLogger(__name__)

# The keys of one request line besides its sampling settings.
REQUEST_KEYS = ("id", "prompt", "messages", "adapter")
# The sampling settings a line may give, with their defaults: SamplingParams' fields and defaults
# (stop_token_ids is the library's only; logprobs too, as the output lines have no place for them).
LINE_DEFAULTS: dict[str, object] = {
    name: value for name, value in SAMPLING_DEFAULTS.items() if name not in ("stop_token_ids", "logprobs")
}
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def parse_request_line(
    raw: bytes, number: int, adapters: Collection[str], seen: dict[str, int], defaults: Mapping[str, object]
) -> tuple[str | int, GenerateRequest]:
    """The id and the `GenerateRequest` of one input line; `defaults` names the sampling settings a
    line may give (`SamplingParams` fields) and their values when it does not.

    The id is recorded in `seen` (id -> line) as soon as it is read, so a later line cannot
    reuse it whatever becomes of this one. The request's engine id is `line-<number>`.

    Raises:
        QuadaptError: anything wrong with the line; the message names the key and what is allowed.
    """
    try:
        fields = json.loads(raw.rstrip().decode("utf-8"))  # rstrip: keep an error's position on this line
    except UnicodeDecodeError as e:
        raise InvalidParameterError(
            f"byte {e.start + 1} (0x{raw[e.start]:02x}) is not UTF-8 text; write the file as UTF-8"
        ) from None
    except json.JSONDecodeError as e:
        raise InvalidParameterError(f"not JSON ({e.msg}, column {e.colno}); write one JSON object per line") from None
    if not isinstance(fields, dict):
        raise InvalidParameterError(f"a request is a JSON object {{...}}, got {_json_type(fields)}")
    given = {key: value for key, value in fields.items() if value is not None}  # null is as if absent

    rid = given.get("id", f"line-{number}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise InvalidParameterError(
            f'"id" must be a string or an integer, got {_json_type(rid)}; leave it out to use "line-{number}"'
        )
    key = json.dumps(rid)
    if key in seen:
        raise InvalidParameterError(f"id {key} is already used by line {seen[key]}; give each request its own id")
    seen[key] = number

    allowed = (*REQUEST_KEYS, *defaults)
    unknown = [k for k in fields if k not in allowed]
    if unknown:
        raise InvalidParameterError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed)}"
        )
    if ("prompt" in given) == ("messages" in given):
        raise InvalidParameterError(
            'give exactly one of "prompt" (raw text) and "messages" (chat messages), '
            f"got {'both' if 'prompt' in given else 'neither'}"
        )
    if "prompt" in given:
        prompt = given["prompt"]
        if not isinstance(prompt, str):
            raise InvalidParameterError(f'"prompt" must be a string, got {_json_type(prompt)}; chat messages go in "messages"')
        check_text(prompt, '"prompt"')
    else:
        prompt = given["messages"]
        if not isinstance(prompt, list):
            raise InvalidParameterError(
                f'"messages" must be an array of {{"role": ..., "content": ...}} objects, got {_json_type(prompt)}'
            )
        for i, message in enumerate(prompt):
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                check_text(message["content"], f'"messages"[{i}].content')
    adapter = given.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise InvalidParameterError(f'"adapter" must be the NAME of an --adapter NAME=PATH, or null, got {_json_type(adapter)}')
    if adapter is not None and adapter not in adapters:
        raise InvalidParameterError(
            f"unknown adapter {adapter!r}; this run loaded {', '.join(sorted(adapters)) or 'none'}. Load it with "
            f'--adapter {adapter}=PATH, or leave "adapter" out (or null) for the base model'
        )
    settings = {name: given.get(name, default) for name, default in defaults.items()}
    stop = [] if settings["stop"] is None else settings["stop"]
    for text in [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else ():
        if isinstance(text, str):
            check_text(text, '"stop"')
    params = SamplingParams(**{**settings, "stop": stop})
    return rid, GenerateRequest(prompt, params, adapter, request_id=f"line-{number}")


def run_jsonl(
    llm: LLM,
    lines: Iterable[bytes],
    sink: TextIO,
    *,
    source: str,
    adapters: Collection[str],
    defaults: Mapping[str, object] = LINE_DEFAULTS,
    window: int | None = None,
) -> int:
    """Feed the requests of `lines` to `llm` as it has room, and write each result line to `sink`
    as its request finishes.

    Args:
        llm: the engine with its tokenizer.
        lines: the input's raw lines (bytes, as read from the file).
        sink: where result lines go, flushed one by one.
        source: the input's name, for messages.
        adapters: the adapter names loaded in the engine.
        defaults: the sampling settings a line may give, and their defaults.
        window: how many requests to keep queued ahead; None: twice the engine's running limit,
            which keeps a finished row refilled at once.

    Returns:
        How many lines were bad (each logged as an error with its line number).
    """
    if window is None:
        window = 2 * llm.engine.config.max_num_seqs
    start = time.perf_counter()
    numbered = enumerate(lines, 1)
    seen: dict[str, int] = {}
    running: dict[str, tuple[object, int, list[str]]] = {}  # engine id -> (id, line, text so far)
    bad = done = tokens = 0
    exhausted = False
    while True:
        while not exhausted and len(running) < window:
            number, raw = next(numbered, (0, None))
            if raw is None:
                exhausted = True
            elif raw.strip():
                try:
                    rid, request = parse_request_line(raw, number, adapters, seen, defaults)
                    running[llm.add(request)] = (rid, number, [])
                except QuadaptError as e:
                    logger.error("error: %s line %d: %s", source, number, e)
                    bad += 1
        if not running:
            break
        for delta in llm.step():
            rid, number, parts = running[delta.request_id]
            parts.append(delta.text)
            if not delta.finished:
                continue
            del running[delta.request_id]
            usage = {"prompt_tokens": delta.prompt_tokens, "completion_tokens": delta.completion_tokens}
            record = {"id": rid, "text": "".join(parts), "finish_reason": delta.finish_reason, "usage": usage}
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            done, tokens = done + 1, tokens + delta.completion_tokens
            logger.debug("line %d (id %s): %s after %d tokens", number, json.dumps(rid), delta.finish_reason,
                         delta.completion_tokens)
            if delta.context_full:
                logger.warning(
                    "%s line %d: the output stopped at the model's context (prompt %d + output %d tokens); "
                    "shorten the prompt or lower max_new_tokens", source, number, delta.prompt_tokens,
                    delta.completion_tokens,
                )
    skipped = f"; {bad} bad line{'s' if bad > 1 else ''} not run" if bad else ""
    logger.info("%d requests, %d tokens in %.1f s%s", done, tokens, time.perf_counter() - start, skipped)
    return bad
