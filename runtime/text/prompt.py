"""What a prompt may be, checked before it is tokenized: raw text or chat messages, and their size.

Every front door turns a prompt into ids through `Tokenizer.encode_prompt`, which takes its rules
from here: a prompt is a string, or a non-empty list of at most `MAX_MESSAGES` messages, each a
dict with a string `role` and a string `content`; `chat=True` wraps a string as one user message
and `chat=False` refuses messages. A prompt is measured against the model's context by its
characters before it is tokenized (a token covers at most `Tokenizer.max_token_chars` of them), so
a huge prompt costs nothing to refuse and a long conversation is never rendered.

This file checks data only: it imports no tokenizer library and no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ContextLengthError, InvalidParameterError, quote

# A prompt as the runtime takes it: raw text, or chat messages ({"role": ..., "content": ...}).
Prompt = str | Sequence[Mapping[str, Any]]

# The most chat messages one prompt may hold; a conversation longer than this is a client's bug or
# an attack, and rendering it would cost seconds.
MAX_MESSAGES = 1024

_SHAPE = "a prompt is a string, or a non-empty list of messages like {'role': 'user', 'content': '...'}"


def text_or_messages(prompt: object, chat: bool | None = None) -> str | list[dict[str, Any]]:
    """`prompt` as raw text or as checked chat messages (fresh dicts, safe to keep).

    Args:
        prompt: raw text, or a list (or tuple) of message mappings.
        chat: None follows the prompt's type; True wraps a string as one user message (as
            `quadapt generate --chat` does); False with messages is an error.

    Raises:
        InvalidParameterError: `chat=False` with messages; a prompt that is neither a string nor
            a non-empty list of messages; more than `MAX_MESSAGES` messages; a message that is
            not a dict with a string 'role' and a string 'content'.
    """
    if chat is not None and not isinstance(chat, bool):
        raise InvalidParameterError(f"chat must be True, False or None, got {quote(chat)}")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}] if chat else prompt
    if chat is False and isinstance(prompt, (list, tuple)):
        raise InvalidParameterError(
            "chat=False but the prompt is a list of messages; messages need the chat template: "
            "pass chat=None (or True), or pass the prompt as a string"
        )
    return check_messages(prompt)


def check_messages(messages: object) -> list[dict[str, Any]]:
    """`messages` as a list of fresh dicts, after checking their number and shape.

    Raises:
        InvalidParameterError: not a non-empty list (or tuple), more than `MAX_MESSAGES`
            messages, or a message that is not a dict with a string 'role' and a string 'content'.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidParameterError(f"{_SHAPE}; got {quote(messages)}")
    if len(messages) > MAX_MESSAGES:  # before any message is looked at
        raise InvalidParameterError(
            f"messages holds {len(messages)} messages, more than the {MAX_MESSAGES} allowed; shorten the conversation"
        )
    for i, message in enumerate(messages):
        if (
            not isinstance(message, Mapping)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise InvalidParameterError(
                f"message {i} is {quote(message)}; {_SHAPE}, each a dict with a string 'role' "
                "('system', 'user', 'assistant', ...) and a string 'content'"
            )
    return [dict(m) for m in messages]


def prompt_chars(prompt: str | Sequence[Mapping[str, Any]]) -> int:
    """The characters a checked prompt holds: its text, or its messages' roles and contents."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(m["role"]) + len(m["content"]) for m in prompt)


def check_prompt_size(
    prompt: str | Sequence[Mapping[str, Any]], max_tokens: int | None, max_token_chars: int
) -> None:
    """Refuse a checked prompt whose characters cannot fit in `max_tokens` tokens.

    Args:
        prompt: raw text, or messages checked by `check_messages`.
        max_tokens: the model's context; None: no check.
        max_token_chars: the most characters one token of the tokenizer covers.

    Raises:
        ContextLengthError: the prompt has more than `max_tokens * max_token_chars` characters.
    """
    if max_tokens is None:
        return
    chars = prompt_chars(prompt)
    if chars > max_tokens * max_token_chars:
        what = "the prompt has" if isinstance(prompt, str) else "the messages have"
        raise ContextLengthError(
            f"{what} {chars} characters; a token of this tokenizer covers at most {max_token_chars}, so that is "
            f"more than {chars // max_token_chars} tokens, past the model's context of {max_tokens}; shorten it"
        )
