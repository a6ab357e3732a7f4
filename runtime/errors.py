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
