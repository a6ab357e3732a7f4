"""The exceptions quadapt raises for a user's mistake.

Each message names the bad value, what is allowed, and what to do. The CLI prints them as one
line (`error: ...`) without a traceback; anything else escaping is a bug.
"""


class QuadaptError(Exception):
    """Base class of every error caused by the user's input or environment."""


class ConfigError(QuadaptError, ValueError):
    """A model config (config.json, GGUF metadata) that quadapt cannot run."""


class CheckpointError(QuadaptError, ValueError):
    """A checkpoint that is missing, truncated, corrupt, or does not match its config."""


class UnsupportedError(QuadaptError, ValueError):
    """A valid input that quadapt deliberately does not support (yet)."""


class InvalidParameterError(QuadaptError, ValueError):
    """A request parameter (sampling settings, prompt, chat messages) outside what is allowed."""


class AdapterError(QuadaptError, ValueError):
    """A LoRA adapter that is malformed, or does not fit the base model it is applied to."""


class ContextLengthError(QuadaptError, ValueError):
    """A sequence would grow past the context the cache (or the model) allows."""


class RequestFailedError(QuadaptError, RuntimeError):
    """One request failed inside the engine through no fault of its parameters (the model's
    output for it was unusable, or its step failed); the engine and the other requests go on."""


class EngineDeadError(QuadaptError, RuntimeError):
    """The engine cannot go on (its state could not be restored after a failure); the process
    serving it should exit so that a supervisor restarts it."""


# How much of a client's value a message or a log line quotes: enough to recognise it, never
# enough to flood a log or push a status message past gRPC's metadata limit.
QUOTE_LIMIT = 64


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)`, cut to its first `limit` characters with its full size said, for error
    messages and log lines that name a value a client sent.

    Args:
        value: anything; a long str, bytes, list or tuple is cut before `repr` runs on it whole.
        limit: the most characters of the representation to keep.

    Returns:
        The representation, or its prefix followed by `... (N characters)` / `(N items)`.
    """
    if isinstance(value, (str, bytes)) and len(value) > limit:
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}... ({len(value)} {unit})"
    if isinstance(value, (list, tuple)) and len(value) > 4:
        head = ", ".join(quote(v, limit // 4) for v in value[:4])
        return f"[{head}, ...] ({len(value)} items)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
