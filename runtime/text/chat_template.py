"""Chat templates: rendering a conversation to prompt text in the Jinja environment transformers uses.

Templates come from model repos, so they are untrusted code: they run in jinja2's immutable
sandbox, see only plain JSON data, and get exactly transformers' extras (trim_blocks and
lstrip_blocks, loop controls, `{% generation %}`, a `tojson` that keeps unicode and HTML
characters, `raise_exception`, `strftime_now`, a restricted `dict` and `namespace`), so a
template renders here as it does in `tokenizer.apply_chat_template(..., tokenize=False)`.
This file does not tokenize, and does not know where a template comes from (`tokenizer.py` does).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ConfigError, InvalidParameterError


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    *,
    special_tokens: Mapping[str, str] | None = None,
    tools: list[dict[str, Any]] | None = None,
    **template_kwargs: Any,
) -> str:
    """Render `messages` with `template`, as transformers does.

    Args:
        template: the Jinja source of the chat template.
        messages: dicts with at least `role` and `content`; keys whose value is None are
            dropped, as transformers does (templates handle a missing key, not a None).
        add_generation_prompt: end with the header of an assistant turn.
        special_tokens: `bos_token`, `eos_token`, ... as the template sees them.
        tools: JSON schemas of tools, for templates that support them.
        **template_kwargs: more template variables (e.g. `enable_thinking`); they override
            `special_tokens`.

    Returns:
        The rendered prompt text.

    Raises:
        ConfigError: the template is not valid Jinja.
        InvalidParameterError: no messages, a message that is not a dict of JSON data, or the
            template rejected the conversation (its `raise_exception`, a missing key, a
            forbidden attribute).
    """
    if not messages:
        raise InvalidParameterError("messages is empty; a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidParameterError(
                f"messages[{i}] is a {type(message).__name__}; each message must be a dict with 'role' and 'content'"
            )
    chat = [{k: _plain(v) for k, v in m.items() if v is not None} for m in messages]
    variables = {**(special_tokens or {}), **{k: _plain(v) for k, v in template_kwargs.items()}}
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(
            f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); fix the template"
        ) from e
    try:
        return compiled.render(
            messages=chat, tools=_plain(tools), documents=None, add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.TemplateError as e:
        raise InvalidParameterError(
            f"the chat template rejected the conversation: {e}; change the messages to fit the model's format"
        ) from e


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it for
    training masks; when rendering a prompt the block is just its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change what the model sees.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict` for templates: construction only, since attributes of the real type are a way out."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace` for templates, refusing underscore names, which would reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Jinja's signature trick, so that `namespace(self=...)` still works.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


def _plain(value: Any) -> Any:
    """A copy of `value` made of plain JSON types only: the sandbox cannot vouch for the methods
    of richer objects.

    Raises:
        InvalidParameterError: `value` holds something other than JSON data.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (str enums, numpy scalars) come back as the base type, without their methods.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise InvalidParameterError(
        f"chat template input holds a {type(value).__name__}; messages, tools and template variables must be "
        "JSON data (str, int, float, bool, None, list, dict)"
    )
