"""The small public API: `quadapt.load`, a model and its tokenizer for one request at a time.

`load` does what `quadapt generate` does before its first token (open the checkpoint, read its
tokenizer, check the adapter against the base, load the weights) through `build_engine`, and
`LoadedModel.generate` runs each request through that engine's executor: on the CPU a packed
int4/int8 checkpoint runs on the ONNX executor (weights kept packed, MatMulNBits) when the `onnx`
extra is installed, and elsewhere packed weights are dequantized once at load, not on every call. The reference generator (`generate.py::generate_text`) stays the yardstick the tests
hold this path to. One adapter for the model's lifetime; many requests with their own adapters
are `llm.LLM`'s.

The helpers at the end of this file (checking dtypes and threads) serve every front door;
opening a checkpoint with its tokenizer and the default thread count are `engine/args.py`'s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from ..engine.args import EngineArgs, build_engine
from ..errors import InvalidParameterError
from ..text.generation import Generation, GenerationResult
from .llm import LLM
from ..model.model import CausalLM
from .outputs import GenerateRequest, TextDelta
from ..text.prompt import text_or_messages
from ..engine.sampling import SAMPLING_DEFAULTS, SamplingParams
from ..text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Message = Mapping[str, Any]


class LoadedModel:
    """A loaded model with its tokenizer, ready to generate; made by `load`.

    Generations may interleave (two `stream=True` generations iterated in turn, or calls from
    several threads): each steps the engine for all, and keeps what belongs to the others.

    Attributes:
        model: the torch model the engine runs (eval mode, parameters frozen), with the
            adapter's LoRA slots if one was given; None on the ONNX executor, which runs a
            serving export (`executor`).
        tokenizer: the checkpoint's tokenizer and chat template.
        path: the checkpoint it was loaded from.
        adapter: the PEFT adapter directory applied, or None.
    """

    _ADAPTER = "adapter"  # the name the adapter is served under

    def __init__(self, llm: LLM, path: Path, adapter: Path | None = None) -> None:
        self._llm = llm
        self.model: CausalLM | None = getattr(llm.engine.executor, "model", None)
        self.tokenizer: Tokenizer = llm.tokenizer
        self.path = path
        self.adapter = adapter
        self._lock = threading.Lock()  # held through one engine step and its bookkeeping, never a yield
        self._pending: dict[str, list[TextDelta]] = {}  # deltas of running generations, not yet taken

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
        deltas = self._generation(text_or_messages(prompt, chat), params)
        if stream:
            return deltas
        text = "".join(deltas)
        result = deltas.result
        if result.context_full:  # the returned text cannot say it was cut short; the log does
            logger.warning(
                "the output stopped at the model's context of %d tokens (prompt %d + output %d), "
                "before max_new_tokens=%d",
                self._llm.engine.executor.config.max_position_embeddings, result.prompt_tokens, result.completion_tokens,
                max_new_tokens,
            )
        return text

    def encode_prompt(self, prompt: str | Sequence[Message], *, chat: bool | None = None) -> list[int]:
        """The token ids `generate` feeds the model for `prompt` (see `generate` for `chat`).

        Raises:
            InvalidParameterError, ConfigError: as `generate`.
        """
        return self.tokenizer.encode_prompt(prompt, chat=chat)

    def _generation(self, prompt: Any, params: SamplingParams) -> Generation[str]:
        """Queue one request in the engine (checked now) and return its running generation."""
        request = GenerateRequest(prompt, params, self._ADAPTER if self.adapter is not None else None)
        with self._lock:
            rid = self._llm.add(request)
            self._pending[rid] = []
        result = GenerationResult(prompt_tokens=0)
        return _EngineGeneration(self._texts(rid, result), result, lambda: self._cancel(rid))

    def _texts(self, rid: str, result: GenerationResult) -> Generator[str, None, None]:
        finished = False
        try:
            while not finished:
                delta = self._next_delta(rid)
                finished = delta.finished
                if delta.error is not None:
                    raise delta.error
                result.prompt_tokens, result.completion_tokens = delta.prompt_tokens, delta.completion_tokens
                if finished:
                    result.finish_reason, result.stop_reason = delta.finish_reason, delta.stop_reason
                    result.context_full = delta.context_full
                if delta.text:
                    yield delta.text
        finally:
            self._cancel(rid)

    def _cancel(self, rid: str) -> None:
        """Forget a generation; if its request is still in the engine, abort it (its cache blocks are freed)."""
        with self._lock:
            if self._pending.pop(rid, None) is not None:
                self._llm.abort(rid)  # False, and nothing done, once it finished

    def _next_delta(self, rid: str) -> TextDelta:
        """The next delta of `rid`, stepping the engine (for every running generation) until one comes."""
        while True:
            with self._lock:
                waiting = self._pending[rid]
                if waiting:
                    return waiting.pop(0)
                assert self._llm.has_unfinished(), f"request {rid} has no delta and the engine is idle"
                for delta in self._llm.step():
                    if delta.request_id in self._pending:
                        self._pending[delta.request_id].append(delta)


class _EngineGeneration(Generation[str]):
    """A `Generation` whose `close()` also cancels a request not yet iterated (a generator that
    never started runs no `finally`)."""

    def __init__(
        self, outputs: Generator[str, None, None], result: GenerationResult, cancel: Callable[[], None]
    ) -> None:
        super().__init__(outputs, result)
        self._cancel = cancel

    def close(self) -> None:
        super().close()
        self._cancel()


def load(
    path: str | Path,
    *,
    adapter: str | Path | None = None,
    dtype: DType | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    threads: int | None = None,
    kv_cache_bytes: int = EngineArgs.kv_cache_bytes,
    executor: Literal["auto", "torch", "onnx"] = EngineArgs.executor,
) -> LoadedModel:
    """Load a checkpoint (HF directory, packed quadapt checkpoint or `.gguf` file) to generate from.

    Args:
        path: the checkpoint directory or GGUF file; it must carry a tokenizer.
        adapter: a PEFT LoRA adapter directory to apply, or None for the base model.
        dtype: "float32", "bfloat16" or "float16" (or the torch dtype): the float weights and
            activations; quantized weights stay packed.
        device: where the model lives.
        threads: CPU threads for torch (a process-wide setting, as `--threads` in the CLI);
            None: `engine.args.default_threads()`, half the cores (see there why).
        kv_cache_bytes: memory for the engine's KV cache; it bounds prompt + output tokens.
        executor: "auto", "torch" or "onnx", as `EngineArgs.executor` (auto: onnx for a packed
            int4/int8 checkpoint on the CPU when the `onnx` extra is installed).

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
    adapters = {} if adapter is None else {LoadedModel._ADAPTER: str(adapter)}
    args = EngineArgs(
        model=str(path), adapters=adapters, dtype=str(torch_dtype).removeprefix("torch."), device=str(device),
        threads=threads, kv_cache_bytes=kv_cache_bytes, executor=executor,
        max_loras=1 if adapters else 0,
    )
    try:
        engine, tokenizer, checkpoint = build_engine(args)
    except Exception as e:  # an adapter's error reads as it did before the engine: without the name
        prefix = f"adapter {LoadedModel._ADAPTER}={adapter}: "
        if adapter is not None and str(e).startswith(prefix):
            raise type(e)(str(e)[len(prefix):]) from None
        raise
    return LoadedModel(
        LLM.from_engine(engine, tokenizer, checkpoint), checkpoint,
        adapter=None if adapter is None else Path(adapter).expanduser(),
    )


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise InvalidParameterError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")


def check_threads(threads: object) -> None:
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise InvalidParameterError(f"threads must be a positive integer or None, got {threads!r}")
