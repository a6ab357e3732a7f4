"""Text at the edge: an export's tokenizer and chat template, and output text cut at stop strings.

`EdgeTokenizer` reads the tokenizer files the exporter copied beside the model with the
`tokenizers` library and gives the answers `runtime.tokenizer.Tokenizer` gives (special tokens
from tokenizer_config.json added as transformers adds them, eos ids from both configs, the chat
template rendered by `runtime.chat_template`, a conversation encoded by `runtime.chat_encoding`'s
rule that what the messages say is text); a test holds the two to the same ids and text.
`OutputText` turns output ids into text deltas whose concatenation is `decode(ids)` cut just
before the first stop string, holding back an incomplete character or a possible stop prefix,
as `runtime.text_stream.TextStream` does.

They exist beside those modules because these must import without torch (the runtime's
tokenizer module reaches torch through the checkpoint readers). No padding, truncation or batching.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken

from ..chat_encoding import ChatEncoder
from ..chat_template import render_chat_template
from ..errors import CheckpointError, ConfigError

_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
_REPLACEMENT_CHAR = "\ufffd"


class EdgeTokenizer:
    """An export's tokenizer, chat template and eos ids (transformers' semantics)."""

    def __init__(self, path: str | Path) -> None:
        """Read `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` from `path`.

        Raises:
            CheckpointError: tokenizer.json is missing or unreadable, or a config is not a JSON object.
            ConfigError: a special token or eos id of the wrong type.
        """
        path = Path(path)
        try:
            self._backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a plain Exception for a missing or bad file
            raise CheckpointError(f"{path}: tokenizer.json cannot be read ({e}); export the model again") from None
        self._backend.no_truncation()
        self._backend.no_padding()
        config, generation = _json(path / "tokenizer_config.json"), _json(path / "generation_config.json")
        self._special = {}
        for name in _NAMED_SPECIAL_TOKENS:
            value = config.get(name)
            content = _content(value)
            if value is not None and content is None:
                raise ConfigError(f"tokenizer_config.json: {name} must be a string or an AddedToken dict, got {value!r}")
            if content:
                self._special[name] = content
        self._add_missing_special_tokens(config)
        self._chat = ChatEncoder(self._backend)
        template = config.get("chat_template")
        if isinstance(template, list):
            template = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}.get("default")
        self.chat_template: str | None = template if isinstance(template, str) else None
        eos = self._id_of(self._special.get("eos_token"))
        value = generation.get("eos_token_id")
        listed = value if isinstance(value, list) else [] if value is None else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in listed):
            raise ConfigError(f"generation_config.json: eos_token_id must be an integer or a list of integers, got {value!r}")
        self.eos_token_ids: set[int] = ({eos} if eos is not None else set()) | set(listed)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def _add_missing_special_tokens(self, config: Mapping[str, Any]) -> None:
        # As `runtime.tokenizer.Tokenizer`: every special token the config names is an added token.
        present = {t.content for t in self._backend.get_added_tokens_decoder().values()}
        missing: list[AddedToken] = []
        for spec in (config.get("added_tokens_decoder") or {}).values():
            if isinstance(spec, Mapping) and spec.get("content") and spec["content"] not in present:
                missing.append(AddedToken(spec["content"], **{k: bool(spec[k]) for k in _ADDED_TOKEN_FLAGS if k in spec}))
                present.add(spec["content"])
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
        extra = list(extra.values()) if isinstance(extra, Mapping) else list(extra)
        for content in [*self._special.values(), *(_content(t) for t in extra)]:
            if content and content not in present:
                missing.append(AddedToken(content, special=True, normalized=False))
                present.add(content)
        self._backend.add_special_tokens([t for t in missing if t.special])
        self._backend.add_tokens([t for t in missing if not t.special])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (add_special_tokens: what the post-processor adds, e.g. BOS)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`, special tokens dropped by default."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` under the model's chat template (to encode it, use
        `encode_chat`, which keeps the messages' text as text).

        Raises:
            ConfigError: the model has no chat template.
            InvalidParameterError: the template rejected the messages.
        """
        return render_chat_template(self._template(), messages, add_generation_prompt, special_tokens=self._special)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """The prompt ids of `messages`, as `runtime.tokenizer.Tokenizer.encode_chat` gives them:
        a special-token string in a message encodes as ordinary tokens, so only the template
        writes control tokens; a conversation without one encodes as `encode(apply_chat_template(
        messages), add_special_tokens=False)`.

        Raises:
            ConfigError: the model has no chat template.
            InvalidParameterError: the template rejected the messages, or changes a message that
                holds a special-token string before writing it, so that it cannot be kept as text.
        """
        return self._chat.encode(self._template(), messages, add_generation_prompt, special_tokens=self._special)

    def _template(self) -> str:
        if self.chat_template is None:
            raise ConfigError(
                "this model has no chat template (tokenizer_config.json has none); it is likely a base model: "
                "pass the prompt without --chat"
            )
        return self.chat_template


class OutputText:
    """Text deltas for one output's ids, cut just before the first of `stop`.

    Attributes:
        stop: the stop string that ended the text, else None.
    """

    def __init__(self, tokenizer: EdgeTokenizer, stop: list[str]) -> None:
        self._tokenizer = tokenizer
        self._stops = [s for s in stop if s]
        self._ids: list[int] = []
        self._prefix = self._read = 0  # ids[:read] emitted; ids[prefix:read] is the decode window's context
        self._pending = ""
        self.stop: str | None = None

    def feed(self, token: int) -> str:
        """Add one id; return the text now safe to release (empty while held back)."""
        self._ids.append(token)
        return self._release(self._detokenize(final=False))

    def finish(self) -> str:
        """The text still held back at the end of the output."""
        if self.stop is not None:
            return ""
        text, self._pending = self._pending + self._detokenize(final=True), ""
        return self._release(text, final=True)

    def _detokenize(self, final: bool) -> str:
        # The window of the last delta's tokens plus the new ones, as runtime.tokenizer does.
        context = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        if len(text) <= len(context) or (text.endswith(_REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(context) :]

    def _release(self, delta: str, final: bool = False) -> str:
        if self.stop is not None:
            return ""
        self._pending += delta
        found = [(i, s) for s in self._stops if (i := self._pending.find(s)) >= 0]
        if found:
            index, self.stop = min(found, key=lambda f: (f[0], -len(f[1])))
            text, self._pending = self._pending[:index], ""
            return text
        hold = 0 if final else self._partial_stop()
        text, self._pending = self._pending[: len(self._pending) - hold], self._pending[len(self._pending) - hold :]
        return text

    def _partial_stop(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest


def _content(token: Any) -> str | None:
    if isinstance(token, str):
        return token
    if isinstance(token, Mapping) and isinstance(token.get("content"), str):
        return token["content"]
    return None


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); export the model again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds {type(data).__name__}, not a JSON object; export the model again")
    return data
