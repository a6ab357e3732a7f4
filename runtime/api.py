"""The small public API: `quadapt.load`, a model and its tokenizer for one request at a time.

`load` does what `quadapt generate` does before its first token (open the checkpoint, build the
tokenizer, load the model, apply an adapter), and `LoadedModel.generate` does the rest, so the
same settings give the CLI's text. It is a thin layer over the reference generator
(`generate_text`): one request at a time, one adapter for the model's lifetime.

`serve` (in `batch_api.py`) puts the same checkpoint behind the batching engine. The helpers
at the end of this file (checking dtypes, threads, prompts and sampling keywords) serve both.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .adapters import apply_adapter
from .checkpoints import CheckpointReader, open_checkpoint
from .checkpoints.peft_fit import BaseModules, load_adapter_for
from .errors import CheckpointError, InvalidParameterError
from .generate import Generation, generate_text
from .loader import load_model
from .model import CausalLM
from .sampling import SAMPLING_DEFAULTS, SamplingParams
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Message = Mapping[str, Any]

# LoadedModel.generate's sampling keywords, which BatchModel takes too.
_SETTINGS = frozenset(
    {"max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop", "ignore_eos"}
)


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model with its tokenizer, ready to generate.

    Attributes:
        model: the model (eval mode, parameters frozen), with the adapter's LoRA slots if one was given.
        tokenizer: the checkpoint's tokenizer and chat template.
        path: the checkpoint it was loaded from.
        adapter: the PEFT adapter directory applied, or None.
    """

    model: CausalLM
    tokenizer: Tokenizer
    path: Path
    adapter: Path | None = None

    def generate(
        self,
        prompt: str | Sequence[Message],
        *,
        max_new_tokens: int = SAMPLING_DEFAULTS["max_new_tokens"],
        temperature: float = SAMPLING_DEFAULTS["temperature"],
        top_k: int = SAMPLING_DEFAULTS["top_k"],
        top_p: float = SAMPLING_DEFAULTS["top_p"],
        repetition_penalty: float = SAMPLING_DEFAULTS["repetition_penalty"],
        seed: int | None = SAMPLING_DEFAULTS["seed"],
        stop: str | list[str] | None = None,
        ignore_eos: bool = SAMPLING_DEFAULTS["ignore_eos"],
        chat: bool | None = None,
        stream: bool = False,
    ) -> str | Generation[str]:
        """Generate a continuation of `prompt`, greedily unless `temperature` > 0.

        Args:
            prompt: raw text, encoded with the tokenizer's usual special tokens (BOS where the
                model has one); or a conversation, a list of `{"role": ..., "content": ...}`
                dicts, rendered with the model's chat template and an assistant header.
            max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop,
                ignore_eos: as `SamplingParams` (and `quadapt generate`'s flags of those names).
            chat: None follows the prompt's type; True wraps a string as one user message, as
                `quadapt generate --chat` does; False with a message list is an error.
            stream: return the running generation instead of its text.

        Returns:
            The generated text (stop strings and special tokens excluded; a warning is logged
            when the model's context cut it short of `max_new_tokens`); with `stream=True`, a
            `Generation` yielding text deltas as they are produced, whose `result` says, once it
            is exhausted, why it finished and how many tokens it used.

        Raises:
            InvalidParameterError: messages that are not a non-empty list of role/content dicts,
                `chat=False` with messages, or a sampling setting outside its range.
            ConfigError: chat messages for a model without a chat template.
            ContextLengthError: the prompt fills the model's context.
        """
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=[] if stop is None else stop,
            ignore_eos=ignore_eos,
        )
        prompt_ids = self.encode_prompt(prompt, chat=chat)
        deltas = generate_text(self.model, self.tokenizer, prompt_ids, params)
        if stream:
            return deltas
        text = "".join(deltas)
        result = deltas.result
        if result.context_full:  # the returned text cannot say it was cut short; the log does
            logger.warning(
                "the output stopped at the model's context of %d tokens (prompt %d + output %d), "
                "before max_new_tokens=%d",
                self.model.config.max_position_embeddings, result.prompt_tokens, result.completion_tokens,
                max_new_tokens,
            )
        return text

    def encode_prompt(self, prompt: str | Sequence[Message], *, chat: bool | None = None) -> list[int]:
        """The token ids `generate` feeds the model for `prompt` (see `generate` for `chat`).

        Raises:
            InvalidParameterError, ConfigError: as `generate`.
        """
        prompt = text_or_messages(prompt, chat)
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        # The template writes its own special tokens; message content is encoded as text.
        return self.tokenizer.encode_chat(list(prompt), add_generation_prompt=True)


def load(
    path: str | Path,
    *,
    adapter: str | Path | None = None,
    dtype: DType | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    threads: int | None = None,
) -> LoadedModel:
    """Load a checkpoint (HF directory, packed quadapt checkpoint or `.gguf` file) to generate from.

    Args:
        path: the checkpoint directory or GGUF file; it must carry a tokenizer.
        adapter: a PEFT LoRA adapter directory to apply, or None for the base model.
        dtype: "float32", "bfloat16" or "float16" (or the torch dtype): the float weights and
            activations; quantized weights stay packed.
        device: where the model lives.
        threads: CPU threads for torch (a process-wide setting, as `--threads` in the CLI);
            None leaves torch's choice.

    Returns:
        A `LoadedModel`.

    Raises:
        CheckpointError: `path` does not exist, is not a checkpoint, or carries no tokenizer.
        AdapterError, UnsupportedError: the adapter is malformed, unsupported, or made for another
            base (checked before the weights load).
        ConfigError, UnsupportedError: a model quadapt cannot run.
        InvalidParameterError: an unknown dtype, or threads not a positive integer.
    """
    torch_dtype = resolve_dtype(dtype)
    check_threads(threads)
    reader, tokenizer = open_with_tokenizer(path)
    # Read and fit the adapter to the base's layout before the weights load, so a wrong adapter
    # fails in a blink rather than after the whole model is in memory.
    peft_adapter = None if adapter is None else load_adapter_for(adapter, BaseModules.of_checkpoint(reader))
    if threads is not None:
        torch.set_num_threads(threads)
    model = load_model(reader, dtype=torch_dtype, device=device)
    if peft_adapter is not None:
        apply_adapter(model, peft_adapter)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=reader.path,
        adapter=None if adapter is None else Path(adapter).expanduser(),
    )


def sampling_params(params: Any, settings: dict[str, Any]) -> Any:
    """`params` if given, else SamplingParams from `LoadedModel.generate`'s sampling keywords and defaults (greedy)."""
    if params is not None:
        if settings:
            raise InvalidParameterError(
                f"pass sampling settings as params= or as keywords, not both (got {sorted(settings)})"
            )
        return params
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:
        raise InvalidParameterError(
            f"unknown sampling setting(s) {unknown}; the settings are {', '.join(sorted(_SETTINGS))}"
        )
    if settings.get("stop") is None:
        settings = {k: v for k, v in settings.items() if k != "stop"}
    return SamplingParams(**settings)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise InvalidParameterError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")


def open_with_tokenizer(path: str | Path) -> tuple[CheckpointReader, Tokenizer]:
    reader = open_checkpoint(path)
    files = reader.tokenizer_files()
    if files is None:
        raise CheckpointError(
            f"{str(path)!r} carries no tokenizer (tokenizer.json); copy the model's tokenizer files beside its weights"
        )
    return reader, Tokenizer.from_files(files)


def check_threads(threads: object) -> None:
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise InvalidParameterError(f"threads must be a positive integer or None, got {threads!r}")


def text_or_messages(prompt: str | Sequence[Message], chat: bool | None) -> str | list[dict[str, Any]]:
    """`prompt` as raw text or as checked chat messages (see `LoadedModel.generate` for `chat`)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}] if chat else prompt
    if chat is False:
        raise InvalidParameterError(
            "chat=False but the prompt is a list of messages; messages need the chat template: "
            "pass chat=None (or True), or pass the prompt as a string"
        )
    return [dict(m) for m in check_messages(prompt)]


def check_messages(messages: object) -> list[Message]:
    """`messages` as a list, after checking it is a non-empty list of role/content dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidParameterError(
            "prompt must be a string or a non-empty list of chat messages ({'role': ..., 'content': ...} "
            f"dicts), got {messages!r:.200}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or "content" not in message:
            raise InvalidParameterError(
                f"message {i} is {message!r:.200}; each message must be a dict with a string 'role' "
                "('system', 'user', 'assistant', ...) and a 'content'"
            )
    return list(messages)
