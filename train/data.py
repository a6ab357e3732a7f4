"""Training data: JSONL rows to token ids with completion-only labels, split and batched by length.

Each line of the file is one JSON object, either

    {"prompt": "...", "completion": "..."}        the prompt encoded with the tokenizer's usual
                                                  special tokens, the completion after it, ending
                                                  with the end-of-sequence token
    {"messages": [{"role": ..., "content": ...}]} rendered with the model's chat template

The loss falls on completion tokens only (for messages: every assistant turn, with the template's
own end-of-turn tokens); prompt tokens get the label `IGNORE`. A bad line is reported with its
number. Batches group examples of similar length (less padding); rows are right-padded, which a
causal model never sees from earlier positions.

It holds no model and no optimizer (`train/loop.py`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..runtime.errors import InvalidParameterError
from ..runtime.text.tokenizer import Tokenizer

IGNORE = -100  # the label of a token the loss skips (PyTorch's cross-entropy default)


@dataclass(frozen=True)
class Example:
    """One tokenized row: `input_ids` and `labels` of the same length (`IGNORE` off the completion)."""

    input_ids: list[int]
    labels: list[int]
    line: int

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def read_examples(path: str | Path, tokenizer: Tokenizer, *, max_length: int) -> list[Example]:
    """Read and tokenize a JSONL training file.

    Args:
        path: the file; one JSON object a line, blank lines skipped.
        tokenizer: the model's tokenizer (its chat template for `messages` rows).
        max_length: the most tokens an example keeps; longer ones are cut at the end.

    Returns:
        The examples, in file order.

    Raises:
        InvalidParameterError: an unreadable file, a line that is not such an object (named by
            its number), an example with no completion token left, or an empty file.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidParameterError(f"cannot read training data {str(path)!r}: {e}; pass a UTF-8 JSONL file") from None
    eos = _eos_id(tokenizer)
    examples = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(text)
        except ValueError as e:
            raise InvalidParameterError(f"{where}: not valid JSON ({e}); each line must be one JSON object") from None
        ids, labels = _tokenize(row, tokenizer, eos, where)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels):
            raise InvalidParameterError(
                f"{where}: no completion token within --max-length {max_length} (the prompt takes "
                f"{len(ids)}); shorten the prompt or raise --max-length"
            )
        examples.append(Example(ids, labels, number))
    if not examples:
        raise InvalidParameterError(f"training data {str(path)!r} has no examples; write one JSON object a line")
    return examples


def split_examples(examples: Sequence[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random split into (train, held out); the held-out part is `eval_fraction` of the
    rows, at least one when the fraction is positive and there are two or more rows.

    Raises:
        InvalidParameterError: a fraction outside [0, 0.5].
    """
    if not 0.0 <= eval_fraction <= 0.5:
        raise InvalidParameterError(f"--eval-fraction (eval_fraction) must be in [0, 0.5], got {eval_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if eval_fraction == 0 or len(examples) < 2 else max(1, round(eval_fraction * len(examples)))
    held = sorted(order[:n_eval])
    kept = sorted(order[n_eval:])
    return [examples[i] for i in kept], [examples[i] for i in held]


def length_batches(examples: Sequence[Example], batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches of example indices, grouped by length, in a seeded random order.

    The examples are shuffled, cut into chunks of 32 batches, each chunk sorted by length and cut
    into batches, and the batches shuffled: similar lengths share a batch, yet the order changes
    every epoch and is the same for the same (seed, epoch), which a resumed run relies on.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches = []
    chunk = 32 * batch_size
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(examples[i].input_ids))
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids` and `labels` [B, T] (T = the longest example)."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.int64)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.int64)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
    return ids, labels


def iterate_batches(examples: Sequence[Example], batch_size: int, pad_id: int, *, seed: int,
                    epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Collated batches of one epoch, in `length_batches` order."""
    for batch in length_batches(examples, batch_size, seed=seed, epoch=epoch):
        yield collate([examples[i] for i in batch], pad_id)


def _eos_id(tokenizer: Tokenizer) -> int:
    ids = sorted(tokenizer.eos_token_ids)
    if not ids:
        raise InvalidParameterError("the tokenizer names no end-of-sequence token; a completion needs one to end with")
    return ids[0]


def _tokenize(row: Any, tokenizer: Tokenizer, eos: int, where: str) -> tuple[list[int], list[int]]:
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        prompt = tokenizer.encode(row["prompt"], add_special_tokens=True)
        completion = tokenizer.encode(row["completion"], add_special_tokens=False) + [eos]
        return prompt + completion, [IGNORE] * len(prompt) + completion
    if isinstance(row, dict) and "messages" in row:
        return _tokenize_messages(row["messages"], tokenizer, where)
    raise InvalidParameterError(
        f"{where}: expected {{\"prompt\": str, \"completion\": str}} or {{\"messages\": [{{\"role\": ..., "
        f"\"content\": ...}}, ...]}}, got {json.dumps(row)[:80]!r}"
    )


def _tokenize_messages(messages: Any, tokenizer: Tokenizer, where: str) -> tuple[list[int], list[int]]:
    if not (isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )):
        raise InvalidParameterError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": str, \"content\": str}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidParameterError(f"{where}: no assistant message; the loss falls on assistant turns, so add one")
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the rendered text so far
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            # The assistant header is prompt; the turn after it, end-of-turn tokens included, is trained.
            header = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
            done = _append(tokenizer, ids, labels, done, header, trained=False, where=where)
        text = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        done = _append(tokenizer, ids, labels, done, text, trained=message["role"] == "assistant", where=where)
    return ids, labels


def _append(tokenizer: Tokenizer, ids: list[int], labels: list[int], done: str, text: str, *, trained: bool, where: str) -> str:
    if not text.startswith(done):
        raise InvalidParameterError(
            f"{where}: the chat template renders a conversation so that it does not extend its own shorter "
            "prefix; train on {\"prompt\", \"completion\"} rows instead"
        )
    new = tokenizer.encode(text[len(done) :], add_special_tokens=False)  # the template wrote them
    ids += new
    labels += new if trained else [IGNORE] * len(new)
    return text
