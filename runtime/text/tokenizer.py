"""Text in and out: a model's HF tokenizer, its chat template, and prompts made into ids.

`Tokenizer` wraps the `tokenizers` library on a checkpoint's `tokenizer.json`, reading
`tokenizer_config.json` and `generation_config.json` the way transformers does, so `encode`,
`decode` and `apply_chat_template` (rendered by `chat_template.py`) give transformers' answers.
`encode_chat` turns a conversation into prompt ids by one rule (`chat_encoding.py`): what the
messages say is text, so a special-token string in a message encodes as ordinary tokens and only
the template writes control tokens; a conversation without such strings gets transformers' ids.
`encode_prompt` is the one way a prompt (text or chat messages, checked by `prompt.py`'s rules)
becomes ids. Streaming detokenization is `text_stream.py`'s, over `decode`.

This is the edge of the runtime: the engine sees token ids only. It deliberately does not pad,
truncate (a `truncation` entry in tokenizer.json is dropped: a runtime never cuts a prompt
silently), batch, or apply transformers' `clean_up_tokenization_spaces`, which transformers
itself skips for the BPE tokenizers of the models quadapt runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken

from ..checkpoints.reader import TokenizerFiles, read_tokenizer_files
from .chat_encoding import ChatEncoder
from .chat_template import render_chat_template
from ..errors import CheckpointError, ConfigError, InvalidParameterError
from .prompt import Prompt, check_prompt_size, text_or_messages

# The named special tokens transformers passes to every chat template (its SPECIAL_TOKENS_ATTRIBUTES).
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


class Tokenizer:
    """A model's tokenizer and chat template, with transformers' semantics.

    Build it with `from_dir` or `from_files`. Special tokens named in tokenizer_config.json that
    tokenizer.json lacks as added tokens are added as special, as transformers does, so they
    encode as one token and `decode(..., skip_special_tokens=True)` drops them. What `encode`
    adds (BOS, EOS) is tokenizer.json's post-processor alone: transformers 5 ignores
    `add_bos_token` beside a tokenizer.json, whose post-processor transformers 4 already
    rewrote from that flag when it saved the file.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        tokenizer_config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
    ) -> None:
        """Wrap `backend` (which this object then owns and adjusts).

        Args:
            backend: the tokenizer built from tokenizer.json.
            tokenizer_config: the dict of tokenizer_config.json.
            generation_config: the dict of generation_config.json.

        Raises:
            ConfigError: a special token or eos id in the configs has the wrong type.
        """
        self._backend = backend
        self._max_token_chars: int | None = None
        self._config = dict(tokenizer_config or {})
        generation_config = dict(generation_config or {})
        backend.no_truncation()
        backend.no_padding()

        self._special_tokens = {
            name: content for name in _NAMED_SPECIAL_TOKENS if (content := _token_content(self._config, name))
        }
        self._add_missing_special_tokens()
        self._chat = ChatEncoder(backend)

        self._chat_template = _default_template(self._config)
        self._bos_token_id = self._id_of(self._special_tokens.get("bos_token"))
        if self._bos_token_id is None:
            self._bos_token_id = _optional_id(generation_config, "bos_token_id")
        eos = self._id_of(self._special_tokens.get("eos_token"))
        self._eos_token_ids = ({eos} if eos is not None else set()) | _id_set(generation_config, "eos_token_id")

    @classmethod
    def from_files(cls, files: TokenizerFiles) -> Tokenizer:
        """Build from the tokenizer files a checkpoint reader returned.

        Raises:
            CheckpointError: tokenizer.json is not a valid `tokenizers` serialization.
            ConfigError: tokenizer_config or generation_config hold values of the wrong type.
        """
        try:
            backend = tokenizers.Tokenizer.from_str(files.tokenizer_json)
        except Exception as e:  # tokenizers raises a plain Exception for any parse error
            raise CheckpointError(
                f"tokenizer.json could not be parsed by the tokenizers library: {e}; "
                "re-export it with a current transformers or tokenizers"
            ) from e
        return cls(backend, files.tokenizer_config, files.generation_config)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Read `tokenizer.json`, `tokenizer_config.json`, `generation_config.json` and, when
        present, `chat_template.jinja` (which takes priority, as in transformers) from a directory.

        Raises:
            CheckpointError: the directory or its tokenizer.json is missing, or a file is not valid JSON.
            ConfigError: the configs hold values of the wrong type.
        """
        path = Path(path).expanduser()
        files = read_tokenizer_files(path)
        if files is None:
            raise CheckpointError(
                f"{str(path)!r} has no tokenizer.json; quadapt reads the HF fast-tokenizer file, so save the "
                "tokenizer with transformers' save_pretrained (which writes it) or copy it from the model repo"
            )
        return cls.from_files(files)

    @property
    def eos_token_ids(self) -> set[int]:
        """Ids that end a turn: tokenizer_config's eos_token and generation_config's eos_token_id(s)."""
        return set(self._eos_token_ids)

    @property
    def bos_token_id(self) -> int | None:
        """The id of tokenizer_config's bos_token (else generation_config's bos_token_id), or None."""
        return self._bos_token_id

    @property
    def vocab_size(self) -> int:
        """How many ids the tokenizer knows, added tokens included (transformers' `len(tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_chars(self) -> int:
        """The most characters of text one token can stand for: its longest vocabulary entry
        (a byte-level entry has a character per byte, and text has at most a character per byte).
        A text of more than `n * max_token_chars` characters holds more than `n` tokens."""
        if self._max_token_chars is None:
            vocab = self._backend.get_vocab(with_added_tokens=True)
            self._max_token_chars = max(1, *(len(token) for token in vocab))
        return self._max_token_chars

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template, or None for a model without one."""
        return self._chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`.

        Args:
            text: the text to encode; special-token strings in it encode as their special tokens.
                Encode a conversation with `encode_chat`, which keeps the messages' text as text.
            add_special_tokens: let the tokenizer's post-processor add what it adds (BOS for
                Llama 2 and 3; nothing for SmolLM2 or Qwen2). Pass False for text that already
                holds them, such as a rendered chat template.

        Raises:
            InvalidParameterError: `text` holds a lone surrogate (see `check_text`), which the
                tokenizer cannot encode.
        """
        try:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            # tokenizers refuses a str it cannot turn into UTF-8 with "TextInputSequence must be
            # str"; checking only here keeps the common path free of a second pass over the text.
            if isinstance(text, str):
                check_text(text)
            raise

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`.

        Args:
            ids: token ids.
            skip_special_tokens: drop special tokens (BOS, EOS, `<|im_end|>`, ...) from the
                text. Unlike transformers, the default is True: quadapt decodes model output.
        """
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render a conversation to prompt text with the model's chat template, as transformers'
        `apply_chat_template(..., tokenize=False)` does. Encode the result with
        `add_special_tokens=False`: the template already wrote the special tokens.

        Args:
            messages: dicts with at least `role` and `content`.
            add_generation_prompt: end with the header of an assistant turn (transformers'
                default is False; quadapt renders prompts to generate from).
            tools: JSON schemas of tools, for templates that support them.
            chat_template: a template to use instead of the model's.
            **template_kwargs: more template variables (e.g. `enable_thinking`); they override
                the special-token variables (`bos_token`, `eos_token`, ...).

        Returns:
            The rendered prompt text.

        Raises:
            ConfigError: the model has no chat template, or the template is not valid Jinja.
            InvalidParameterError: the messages are empty or not JSON data, or the template
                rejected them (see `render_chat_template`).
        """
        return render_chat_template(
            self._template(chat_template),
            messages,
            add_generation_prompt,
            special_tokens=self._special_tokens,
            tools=tools,
            **template_kwargs,
        )

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """The prompt ids of a conversation: the chat template's text, with what the messages say
        kept as text. Use this, not `encode(apply_chat_template(...))`, for messages from a user.

        The rule: every string in `messages` and `tools` (contents, roles, names, tool calls) is
        text, so a special-token string in it (`<|im_end|>`) encodes as the ordinary tokens of its
        characters, as `tokenizers`' `encode_special_tokens=True` makes it; only the template and
        its variables write control tokens, and a message cannot forge a turn. A conversation that
        holds no special-token string encodes exactly as `encode(apply_chat_template(...),
        add_special_tokens=False)`, which is transformers' `apply_chat_template(..., tokenize=True)`.
        See `chat_encoding.py` for how. Safe to call from several threads.

        Args: as `apply_chat_template`.

        Returns:
            The prompt's token ids (nothing added beyond what the template writes).

        Raises:
            ConfigError: the model has no chat template, or the template is not valid Jinja.
            InvalidParameterError: the messages are empty, not JSON data, or rejected by the
                template; a message holds a special-token string that the template changes
                before writing it (strips it, say), so it cannot be kept as text; or the text is
                not UTF-8 (see `check_text`).
        """
        template = self._template(chat_template)
        try:
            return self._chat.encode(
                template, messages, add_generation_prompt, special_tokens=self._special_tokens, tools=tools,
                **template_kwargs,
            )
        except TypeError:
            # As in `encode`: tokenizers refuses a lone surrogate with a TypeError; name it.
            check_text(self.apply_chat_template(messages, add_generation_prompt, tools=tools, chat_template=template,
                                                **template_kwargs), "the rendered conversation")
            raise

    def encode_prompt(
        self, prompt: Prompt, *, chat: bool | None = None, max_tokens: int | None = None
    ) -> list[int]:
        """The ids a model is fed for a prompt: raw text with the tokenizer's usual special tokens
        (BOS where the model has one), or chat messages through `encode_chat` with an assistant
        header (message content is text, so it cannot forge the template's markers). Every front
        door encodes prompts here; the rules are `prompt.py`'s.

        Args:
            prompt: raw text, or a non-empty list of `{"role": ..., "content": ...}` dicts.
            chat: None follows the prompt's type; True wraps a string as one user message;
                False with messages is an error.
            max_tokens: the model's context; a prompt whose characters cannot fit in it (at
                `max_token_chars` per token) is refused before it is tokenized or rendered.
                None: no check.

        Raises:
            InvalidParameterError: a prompt that is neither a string nor a non-empty list of at
                most `MAX_MESSAGES` role/content dicts, `chat=False` with messages, or text that
                is not UTF-8.
            ContextLengthError: the prompt is too long for `max_tokens` by its characters alone.
            ConfigError: chat messages for a model without a chat template.
        """
        checked = text_or_messages(prompt, chat)
        if max_tokens is not None:
            check_prompt_size(checked, max_tokens, self.max_token_chars)
        if isinstance(checked, str):
            return self.encode(checked, add_special_tokens=True)
        return self.encode_chat(checked, add_generation_prompt=True)

    def _template(self, chat_template: str | None) -> str:
        """`chat_template` if given, else the model's; a model without one is refused."""
        template = chat_template if chat_template is not None else self._chat_template
        if template is None:
            raise ConfigError(
                "this tokenizer has no chat template (tokenizer_config.json has no 'chat_template' and there is "
                "no chat_template.jinja); it is likely a base model: format the prompt yourself and encode it, "
                "or pass chat_template="
            )
        return template

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def _add_missing_special_tokens(self) -> None:
        # transformers adds every special token the configs name, special, when tokenizer.json does
        # not already hold it as an added token; an id from tokenizer_config's added_tokens_decoder
        # keeps its flags.
        present = {t.content for t in self._backend.get_added_tokens_decoder().values()}
        missing: list[AddedToken] = []
        for spec in (self._config.get("added_tokens_decoder") or {}).values():
            if isinstance(spec, Mapping) and spec.get("content") and spec["content"] not in present:
                flags = {k: bool(spec[k]) for k in _ADDED_TOKEN_FLAGS if k in spec}
                missing.append(AddedToken(spec["content"], **flags))
                present.add(spec["content"])
        extra = self._config.get("extra_special_tokens", self._config.get("additional_special_tokens")) or []
        extra = list(extra.values()) if isinstance(extra, Mapping) else list(extra)
        for content in [*self._special_tokens.values(), *(_content(t) for t in extra)]:
            if content and content not in present:
                missing.append(AddedToken(content, special=True, normalized=False))
                present.add(content)
        self._backend.add_special_tokens([t for t in missing if t.special])
        self._backend.add_tokens([t for t in missing if not t.special])


def check_text(text: str, what: str = "the text") -> None:
    """Refuse a str that is not Unicode text: one holding a lone surrogate. That is what Python
    makes of bytes that are not UTF-8 in a command line (or any `errors="surrogateescape"` read),
    and what tokenizers cannot encode.

    Args:
        text: the text to check.
        what: how the message names it, e.g. "--prompt".

    Raises:
        InvalidParameterError: `text` holds a lone surrogate; the message gives its position and,
            for an undecodable byte, the byte.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the byte code - 0xDC00
            found = f"stands for the byte 0x{code - 0xDC00:02x}, which is not valid UTF-8"
        else:
            found = f"is the lone surrogate {ascii(text[e.start])}, which is not a character"
        raise InvalidParameterError(
            f"{what} is not UTF-8 text: character {e.start} {found}; pass UTF-8 text "
            "(convert it first, e.g. with `iconv -t UTF-8`)"
        ) from None


def _content(token: Any) -> str | None:
    """The text of a special token, written as a string or as a serialized AddedToken dict."""
    if isinstance(token, str):
        return token
    if isinstance(token, Mapping) and isinstance(token.get("content"), str):
        return token["content"]
    return None


def _token_content(config: Mapping[str, Any], name: str) -> str | None:
    value = config.get(name)
    content = _content(value)
    if value is not None and content is None:
        raise ConfigError(
            f"tokenizer_config.json: {name} must be a string or an AddedToken dict with 'content', got {value!r}"
        )
    return content


def _default_template(config: Mapping[str, Any]) -> str | None:
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    # Older transformers saved several named templates as [{"name": ..., "template": ...}].
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        if "default" in named:
            return named["default"]
        raise ConfigError(
            f"tokenizer_config.json has chat templates {sorted(map(str, named))} but none named 'default'; "
            "pass chat_template= to apply_chat_template"
        )
    raise ConfigError(f"tokenizer_config.json: chat_template must be a string or a list, got {type(template).__name__}")


def _optional_id(config: Mapping[str, Any], key: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"generation_config.json: {key} must be an integer, got {value!r}")
    return value


def _id_set(config: Mapping[str, Any], key: str) -> set[int]:
    value = config.get(key)
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"generation_config.json: {key} must be an integer or a list of integers, got {value!r}")
    return set(values)
