"""The tokenizer a GGUF vocabulary describes, rebuilt as a `tokenizers` `tokenizer.json`.

A GGUF carries no `tokenizer.json`: llama.cpp stores the tokens, merges, scores and token types as
metadata. This rebuilds the tokenizer transformers builds from the same keys
(`transformers.integrations.gguf.gguf_tokenizer_mapping`), so that quadapt encodes and decodes
exactly like `AutoTokenizer.from_pretrained(folder, gguf_file=name)`, including its choices where
llama.cpp differs (an unknown `tokenizer.ggml.pre`, such as "smollm", falls back to GPT-2's split).

It does not read tensors or model config (`gguf.py` does), and needs only the `tokenizers` library.
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError, UnsupportedError
from .reader import TokenizerFiles

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> split regex, as transformers maps them; any other name keeps GPT-2's split.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        [
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ],
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}


def build_tokenizer(metadata: dict[str, Any], source: str) -> TokenizerFiles | None:
    """Build `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` from GGUF metadata.

    Args:
        metadata: the GGUF header's key-value pairs.
        source: the file's path, for messages.

    Returns:
        TokenizerFiles, or None when the metadata has no `tokenizer.ggml.model`.

    Raises:
        UnsupportedError: a tokenizer model other than "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE).
        CheckpointError: the tokens, merges or scores are missing or malformed.
    """
    from tokenizers import AddedToken

    kind = metadata.get("tokenizer.ggml.model")
    if kind is None:
        return None
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(
            f"GGUF file {source!r} names tokenizer {kind!r} but holds no tokenizer.ggml.tokens; re-convert it"
        )
    if kind == "gpt2":
        tokenizer, spelled = _byte_level(metadata, tokens, source), set(_bytes_to_unicode().values())
    elif kind == "llama":
        tokenizer, spelled = _sentencepiece(metadata, tokens, source), None
    else:
        raise UnsupportedError(
            f"GGUF file {source!r} holds a {kind!r} tokenizer; quadapt rebuilds 'gpt2' (byte-level BPE) and "
            "'llama' (SentencePiece BPE) tokenizers; use the model's Hugging Face tokenizer instead"
        )

    types = metadata.get("tokenizer.ggml.token_type") or []
    # Control tokens are matched whole and are special. In a byte-level vocabulary one spelled outside
    # the byte alphabet is a llama.cpp mislabel; transformers skips it, and so do we.
    control = [t for t, kind_ in zip(tokens, types) if kind_ == _CONTROL and (spelled is None or set(t) <= spelled)]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = tokenizer.get_vocab()
    user = [t for t, kind_ in zip(tokens, types) if kind_ == _USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    names = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            names[name] = (tokens[token_id], int(token_id))
    # transformers registers these as special tokens too, so they also stay whole in text.
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, _ in names.values()])

    # transformers defaults add_bos_token to True for SentencePiece vocabularies, as llama.cpp does.
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")) and "bos" in names
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and "eos" in names
    tokenizer.post_processor = _post_processor(names, add_bos, add_eos)

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config.update({f"{name}_token": token for name, (token, _) in names.items()})
    config.update(add_bos_token=add_bos, add_eos_token=add_eos, clean_up_tokenization_spaces=False)
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    generation = {f"{name}_token_id": token_id for name, (_, token_id) in names.items() if name != "unk"}
    # Chat models end a turn with an end-of-turn token that differs from eos; generation stops on both.
    stops = [metadata.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    stops = list(dict.fromkeys(int(s) for s in stops if s is not None))
    if len(stops) > 1:
        generation["eos_token_id"] = stops
    return TokenizerFiles(tokenizer.to_str(), config, generation)


def _byte_level(metadata: dict[str, Any], tokens: list[str], source: str):
    """GPT-2 style byte-level BPE, as transformers' `GPT2Tokenizer` with the file's split regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token stored as raw text (not in the byte alphabet) is respelled byte by byte, as transformers does.
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges(metadata, tokens, source),
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre"))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(metadata: dict[str, Any], tokens: list[str], source: str):
    """SentencePiece BPE with byte fallback, as transformers' `LlamaTokenizer` (non-legacy)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab, merges=_merges(metadata, tokens, source), fuse_unk=True, byte_fallback=True, dropout=None
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    return tokenizer


def _merges(metadata: dict[str, Any], tokens: list[str], source: str) -> list[tuple[str, str]]:
    """The file's merges, or, when it lists none (SentencePiece), the ones its scores imply."""
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is not None:
        pairs = [tuple(merge.split(" ")) for merge in merges]
        bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
        if bad is not None:
            raise CheckpointError(
                f"GGUF file {source!r} has merge {bad!r}, not two space-separated tokens; re-convert it"
            )
        return pairs
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise CheckpointError(
            f"GGUF file {source!r} has neither tokenizer.ggml.merges nor one score per token; re-convert it"
        )
    # transformers' `generate_merges`: every split of a token into two tokens, best score first.
    vocab = {token: index for index, token in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores):
        pairs = [
            (token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab
        ]
        found.extend(sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]])))
    found.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _post_processor(names: dict[str, tuple[str, int]], add_bos: bool, add_eos: bool):
    """The template transformers' `update_post_processor` sets: BOS/EOS around each sequence if asked."""
    from tokenizers import processors

    bos, eos = (names["bos"][0] if add_bos else None), (names["eos"][0] if add_eos else None)
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    special = [names["bos"]] * add_bos + [names["eos"]] * add_eos
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (whitespace and controls moved up)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}
