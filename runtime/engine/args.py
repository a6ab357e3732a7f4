"""One way to build an engine: `EngineArgs` says what to load and how to batch, `build_engine` builds it.

Every front door that runs the batching engine (`quadapt generate`, `batch` and `serve`, the
gRPC server's `load_llm`, `quadapt.load`, `quadapt.LLM`, `quadapt.AsyncLLM`) fills an
`EngineArgs` and calls `build_engine`, so each default is written once, here: the slots default
to one per start-up adapter and at least 4, their rank to the largest start-up adapter's and at
least 16, the threads to half the cores (`default_threads`). The order reports a bad adapter
before the weights load: the checkpoint's layout and tokenizer are read first, then the
adapters (checked against that layout), then the weights.

This file builds; it does not run the engine or hold text (`llm.py`, `async_llm.py` do). It
imports no torch (`build_engine` does, when called), so the CLI derives its flags' defaults from
`EngineArgs` without loading torch for `--help`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .config import DEFAULT_KV_CACHE_BYTES, EngineConfig
from .onnx_setup import EXECUTORS
from ..errors import CheckpointError, InvalidParameterError, QuadaptError, quote

if TYPE_CHECKING:
    from ..checkpoints import CheckpointReader
    from .engine import Engine
    from ..text.tokenizer import Tokenizer

_DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")
# The least the slots get when the start-up adapters ask for less: room to load more later.
MIN_LORA_SLOTS, MIN_LORA_RANK = 4, 16


@dataclass(frozen=True)
class EngineArgs:
    """What to load behind the batching engine, and its limits. Only `model` is required.

    Attributes:
        model: a checkpoint directory or `.gguf` file.
        adapters: PEFT adapter directories to load at start, by the name requests use.
        dtype: the weights' and activations' float type.
        device: "cpu", "cuda", ...
        threads: CPU threads for torch (a process-wide setting); None: `default_threads()`,
            half the cores this process may use.
        kv_cache_bytes: memory for the paged KV cache; it sets how many blocks there are.
        block_size: positions per cache block.
        max_num_seqs: the most requests running at once.
        max_num_batched_tokens: the most tokens one step feeds (longer prompts are chunked).
        max_loras: adapter slots; None: one per start-up adapter, at least `MIN_LORA_SLOTS`;
            0 serves the base model only.
        max_lora_rank: the largest rank a slot holds; None: the largest start-up adapter's, at
            least `MIN_LORA_RANK`.
        executor: what runs the model: "torch" (`TorchExecutor`), "onnx" (`OnnxExecutor`: packed
            int4/int8 weights on onnxruntime, CPU only, needs the `onnx` extra) or "auto" (onnx
            for a packed checkpoint on the CPU in float32 with the extra installed, else torch).
    """

    model: str
    adapters: dict[str, str] = field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    threads: int | None = None
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    block_size: int = 16
    max_num_seqs: int = EngineConfig.max_num_seqs
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens
    max_loras: int | None = None
    max_lora_rank: int | None = None
    executor: Literal["auto", "torch", "onnx"] = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", str(self.model))
        object.__setattr__(self, "adapters", {str(k): str(v) for k, v in dict(self.adapters).items()})
        if self.dtype not in _DTYPES:
            raise InvalidParameterError(f"dtype must be one of {', '.join(_DTYPES)}, got {quote(self.dtype)}")
        for name in ("threads", "kv_cache_bytes", "block_size"):
            value = getattr(self, name)
            if (value is not None or name != "threads") and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise InvalidParameterError(f"{name} must be a positive integer, got {quote(value)}")
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise InvalidParameterError(f"device must be cpu, cuda or cuda:N, got {quote(self.device)}")
        if self.executor not in EXECUTORS:
            raise InvalidParameterError(f"executor must be one of {', '.join(EXECUTORS)}, got {quote(self.executor)}")
        if self.adapters and self.max_loras == 0:
            raise InvalidParameterError(
                f"max_loras=0 serves the base model only, but adapters {sorted(self.adapters)} were given; "
                "drop one or the other"
            )
        EngineConfig(self.max_num_seqs, self.max_num_batched_tokens, self.max_loras or 0, self.max_lora_rank or 1)

    def lora_slots(self) -> int:
        """The adapter slots `build_engine` gives: `max_loras`, or one per start-up adapter and at
        least `MIN_LORA_SLOTS`."""
        return max(MIN_LORA_SLOTS, len(self.adapters)) if self.max_loras is None else self.max_loras


def args_from_options(model: str | Path, options: Mapping[str, Any]) -> EngineArgs:
    """`EngineArgs` for `model` from keyword options (`LLM(model, **options)`, `AsyncLLM`'s):
    `EngineArgs`' fields, where `dtype` may also be a torch dtype and `device` a torch device.

    Raises:
        InvalidParameterError: an unknown option, adapters that are not a name -> directory
            mapping, or an option `EngineArgs` refuses.
    """
    known = [f.name for f in fields(EngineArgs) if f.name != "model"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InvalidParameterError(f"unknown engine option(s) {unknown}; the options are {', '.join(known)}")
    options = dict(options)
    adapters = options.pop("adapters", None)
    if adapters is not None and not isinstance(adapters, Mapping):
        raise InvalidParameterError(
            f"adapters must map names to adapter directories, e.g. {{'fr': 'adapters/fr'}}; got {adapters!r:.200}"
        )
    if "dtype" in options and not isinstance(options["dtype"], str):
        options["dtype"] = str(options["dtype"]).removeprefix("torch.")  # a torch.dtype
    if "device" in options:
        options["device"] = str(options["device"])
    return EngineArgs(model=str(model), adapters=dict(adapters or {}), **options)


def open_with_tokenizer(path: str | Path) -> tuple[CheckpointReader, Tokenizer]:
    """Open a checkpoint and read its tokenizer (the model's weights are not read).

    Raises:
        CheckpointError: `path` is not a checkpoint, or carries no tokenizer.
    """
    from ..checkpoints import open_checkpoint
    from ..text.tokenizer import Tokenizer

    reader = open_checkpoint(path)
    files = reader.tokenizer_files()
    if files is None:
        raise CheckpointError(
            f"{str(path)!r} carries no tokenizer (tokenizer.json); copy the model's tokenizer files beside its weights"
        )
    return reader, Tokenizer.from_files(files)


def default_threads() -> int:
    """The CPU threads an engine gives torch when not told: half the cores this process may use,
    at least 1.

    torch's own choice (every core) collapses as soon as another process competes for the
    cores: its threads meet at a barrier after every op, and one descheduled thread stalls the
    rest. On a shared 2-core machine (load average near 9), 32 greedy tokens of SmolLM2-135M
    through `quadapt.load` decoded at 5.7 tok/s with 1 thread and 1.1 with 2; beside one more
    CPU-bound process, 2.6 and 0.8 (`docs/engine.md`). Half the cores keeps most of the speed of all of them when the
    machine is idle and degrades gently when it is not.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def build_engine(args: EngineArgs) -> tuple[Engine, Tokenizer, Path]:
    """Load `args.model` behind a batching engine with its start-up adapters.

    Returns:
        The engine, the model's tokenizer, and the checkpoint's path.

    Raises:
        CheckpointError, ConfigError, UnsupportedError: a checkpoint quadapt cannot serve.
        AdapterError, UnsupportedError: a start-up adapter that is malformed, does not fit the base
            or has a rank above `max_lora_rank` (checked before the weights load); its message
            begins `adapter NAME=PATH:`.
        InvalidParameterError: a cache budget that holds no block, or more than can be allocated;
            a CUDA device that torch does not see.
    """
    import torch

    from ..checkpoints.peft_fit import BaseModules, load_adapter_for
    from .engine import Engine
    from ..checkpoints.loader import load_model
    from .onnx_setup import choose_executor, packed_bits

    reader, tokenizer = open_with_tokenizer(args.model)
    base = BaseModules.of_checkpoint(reader)
    adapters = {}
    for name, path in args.adapters.items():
        try:
            adapters[name] = load_adapter_for(path, base, max_rank=args.max_lora_rank)
        except QuadaptError as e:
            raise type(e)(f"adapter {name}={path}: {e}") from None
    rank = args.max_lora_rank
    if rank is None:
        rank = max([MIN_LORA_RANK, *(a.max_rank for a in adapters.values())])
    slots = args.lora_slots()
    config = EngineConfig(args.max_num_seqs, args.max_num_batched_tokens, slots, rank)
    threads = args.threads if args.threads is not None else default_threads()
    bits = packed_bits(reader.config_dict(), reader.keys()) if args.executor != "torch" else None
    onnx = choose_executor(args.executor, args.device, bits, args.model, args.dtype) == "onnx"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidParameterError(
            f"device {args.device!r} was asked for, but torch {torch.__version__} sees no CUDA device; "
            "serve on device 'cpu', or install a CUDA build of torch"
        )
    # On the ONNX executor torch only samples: its threads would compete with onnxruntime's.
    torch.set_num_threads(1 if onnx else threads)
    if onnx:
        engine = _onnx_engine(args, reader, tokenizer, base, config, bits, threads)
        for name, adapter in adapters.items():
            engine.adapters.load(name, adapter)
        return engine, tokenizer, reader.path
    # On CPU packed weights are dequantized once at load: the reference dequant-matmul would
    # unpack them on every step (see `loader.load_model`).
    model = load_model(reader, dtype=getattr(torch, args.dtype), device=args.device,
                       dequantize=torch.device(args.device).type == "cpu")
    try:
        engine = Engine.for_model(
            model, eos_token_ids=tokenizer.eos_token_ids, config=config, kv_cache_bytes=args.kv_cache_bytes,
            block_size=args.block_size,
        )
    except (MemoryError, RuntimeError) as e:  # torch reports a failed allocation as a RuntimeError
        if not isinstance(e, MemoryError) and "allocate" not in str(e):
            raise
        raise InvalidParameterError(
            f"the KV cache of {args.kv_cache_bytes} bytes (kv_cache_bytes) cannot be allocated on {args.device}; "
            "give it a budget that fits the free memory"
        ) from None
    for name, adapter in adapters.items():
        engine.adapters.load(name, adapter)
    return engine, tokenizer, reader.path


def _onnx_engine(
    args: EngineArgs, reader: CheckpointReader, tokenizer: Tokenizer, base: Any, config: EngineConfig, bits: int, threads: int
) -> Engine:
    """An engine over the ONNX executor: the checkpoint's serving export (cached, or built now)."""
    import torch

    from ..model.config import ModelConfig
    from .engine import Engine
    from .onnx_executor import OnnxExecutor
    from .onnx_setup import serving_export
    from .paged_cache import blocks_for_budget

    if args.dtype != "float32":
        raise InvalidParameterError(
            f"the ONNX executor computes in float32 (MatMulNBits over packed weights); dtype {args.dtype!r} was "
            "asked for: leave dtype at float32, or use executor='torch' (--executor torch)"
        )
    model_config = ModelConfig.from_dict(reader.config_dict())
    export = serving_export(reader.path, num_slots=config.max_loras, max_rank=config.max_lora_rank, bits=bits)
    executor = OnnxExecutor(
        export, model_config, num_blocks=blocks_for_budget(model_config, args.kv_cache_bytes, args.block_size, torch.float32),
        block_size=args.block_size, max_num_seqs=config.max_num_seqs, threads=threads,
    )
    return Engine(executor, eos_token_ids=tokenizer.eos_token_ids, config=config, base=base if config.max_loras else None)
