"""The flags several commands share, written once: argparse types and parent parsers.

Each subcommand takes its shared flags from these parent parsers, so a flag is spelled, defaulted
and explained the same way wherever it appears. Defaults come from the library (`EngineArgs`'
fields, `SAMPLING_DEFAULTS`), never restated here. Nothing here imports torch: `quadapt --help`
builds every parser. Parent parsers are built fresh per subcommand (argparse shares the parents'
action objects with every child).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Sequence

from ..runtime.engine.args import EngineArgs  # torch-free
from ..runtime.errors import InvalidParameterError
from ..runtime.text.sampling_params import SAMPLING_DEFAULTS  # torch-free

DTYPES = ("float32", "bfloat16", "float16")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(
            f"must be a whole number >= 1, got {value!r}; leave the flag out for its default"
        )
    return number


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {value!r}")
    return number


def positive_float(value: str) -> float:
    """argparse type: a number > 0."""
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value!r}")
    return number


def non_negative_float(value: str) -> float:
    """argparse type: a number >= 0."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value!r}")
    return number


def server_port(value: str) -> int:
    """argparse type: a TCP port to dial or to listen on by number, 1-65535."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 1-65535, got {value!r}")
    return number


def adapter_spec(value: str) -> tuple[str, str]:
    """argparse type: NAME=PATH."""
    name, sep, path = value.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"must be NAME=PATH (e.g. sql=adapters/sql), got {value!r}")
    return name, path


def byte_size(value: str) -> int:
    """argparse type: a memory size, e.g. 512MiB, 2GiB, 1.5GB or 1000000 (bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    unit = match[2].lower() if match else ""
    if not match or unit not in _SIZE_UNITS or int(float(match[1]) * _SIZE_UNITS[unit]) < 1:
        raise argparse.ArgumentTypeError(
            f"must be a size like 512MiB, 2GiB, 1.5GB or 1000000 (bytes), got {value!r}"
        )
    return int(float(match[1]) * _SIZE_UNITS[unit])


def named_adapters(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The `--adapter NAME=PATH` pairs as a dict, refusing a NAME given twice."""
    names = [name for name, _ in pairs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise InvalidParameterError(
            f"adapter name(s) {', '.join(map(repr, twice))} given twice; give each --adapter its own NAME"
        )
    return dict(pairs)


def model_options(help: str) -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--model", required=True, metavar="PATH", help=help)
    return options


def output_options(what: str = "directory to create") -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--out", required=True, metavar="DIR", help=what)
    options.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    return options


def run_options(threads_default: str = "torch's choice") -> argparse.ArgumentParser:
    """`--dtype` and `--threads`, as `EngineArgs` defaults them; `threads_default` says what a
    command does when `--threads` is not given."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--dtype", choices=DTYPES, default=_engine_default("dtype"),
        help="weights and activations dtype (default %(default)s)",
    )
    options.add_argument(
        "--threads", type=positive_int, default=_engine_default("threads"), metavar="N",
        help=f"CPU threads, >= 1 (default: {threads_default})",
    )
    return options


def executor_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--executor` (`generate`, `batch`, `serve`), defaulted by `EngineArgs`."""
    parser.add_argument(
        "--executor", choices=("auto", "torch", "onnx"), default=_engine_default("executor"),
        help="what runs the model: torch, or onnx (packed int4/int8 checkpoints on the CPU through onnxruntime, "
        "weights kept packed; needs pip install 'quadapt[onnx]'; the export is built at start and cached beside the "
        "checkpoint); auto is onnx for a packed checkpoint on the CPU when the extra is installed, torch elsewhere "
        "(default %(default)s)",
    )


def engine_options(max_loras_help: str) -> argparse.ArgumentParser:
    """The batching engine's limits (`batch`, `serve`), defaulted by `EngineArgs`."""
    options = argparse.ArgumentParser(add_help=False)
    engine = options.add_argument_group("engine")
    kv_cache = _engine_default("kv_cache_bytes")
    engine.add_argument(
        "--kv-cache-memory", type=byte_size, default=kv_cache, metavar="SIZE",
        help=f"memory for the paged KV cache, e.g. 512MiB, 2GiB (default {_size_text(kv_cache)})",
    )
    engine.add_argument(
        "--max-num-seqs", type=positive_int, default=_engine_default("max_num_seqs"), metavar="N",
        help="most requests running at once (default %(default)s)",
    )
    engine.add_argument(
        "--max-batched-tokens", type=positive_int, default=_engine_default("max_num_batched_tokens"), metavar="N",
        help="most tokens one step feeds; longer prompts are prefilled in chunks (default %(default)s)",
    )
    engine.add_argument(
        "--block-size", type=positive_int, default=_engine_default("block_size"), metavar="N",
        help="positions per KV cache block (default %(default)s)",
    )
    engine.add_argument(
        "--max-loras", type=positive_int, default=_engine_default("max_loras"), metavar="N", help=max_loras_help
    )
    engine.add_argument(
        "--max-lora-rank", type=positive_int, default=_engine_default("max_lora_rank"), metavar="R",
        help="the largest rank a slot holds (default: the largest start-up adapter's rank, at least 16)",
    )
    engine.add_argument(
        "--device", default=_engine_default("device"), metavar="DEVICE",
        help="where the torch executor runs the model: cpu, or cuda (cuda:N): the Triton kernels on packed weights "
        "and decode steps replayed as CUDA graphs; needs pip install 'quadapt[gpu]' (default %(default)s)",
    )
    executor_option(engine)
    return options


def engine_args(args: argparse.Namespace, adapters: dict[str, str]) -> dict[str, object]:
    """The `EngineArgs` fields given by `run_options` and `engine_options`, by field name."""
    return dict(
        model=args.model, adapters=adapters, dtype=args.dtype, threads=args.threads,
        kv_cache_bytes=args.kv_cache_memory, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_batched_tokens, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
        executor=args.executor, device=args.device,
    )


def sampling_options(*, server_defaults: bool = False) -> argparse.ArgumentParser:
    """The sampling flags, named after `SamplingParams`' fields and defaulted by `SAMPLING_DEFAULTS`.

    With `server_defaults` (`client generate`), each flag defaults to None: left out, it is not
    sent, and the server applies the same defaults.
    """

    def default(name: str) -> object:
        return None if server_defaults else SAMPLING_DEFAULTS[name]

    def shown(name: str, text: str) -> str:
        return f"{text} ({'server ' if server_defaults else ''}default {SAMPLING_DEFAULTS[name]})"

    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("sampling")
    # A client checks it here, as the wire reads 0 as "not set" (the server's default); locally,
    # SamplingParams refuses it with the flag's name.
    group.add_argument(
        "--max-new-tokens", type=positive_int if server_defaults else int, default=default("max_new_tokens"),
        metavar="N", help=shown("max_new_tokens", "most tokens to generate"),
    )
    group.add_argument(
        "--temperature", type=float, default=default("temperature"), metavar="T",
        help=shown("temperature", "sampling temperature; 0 is greedy"),
    )
    group.add_argument(
        "--top-p", type=float, default=default("top_p"), metavar="P", help=shown("top_p", "nucleus sampling mass; 1 is off")
    )
    group.add_argument(
        "--top-k", type=int, default=default("top_k"), metavar="K",
        help=shown("top_k", "keep the K most likely tokens; 0 is off"),
    )
    group.add_argument(
        "--repetition-penalty", type=float, default=default("repetition_penalty"), metavar="R",
        help=shown("repetition_penalty", "penalty on repeated tokens; 1 is off"),
    )
    group.add_argument(
        "--seed", type=int, default=default("seed"), metavar="S",
        help="seed; the same seed reproduces sampled output (default: none)",
    )
    group.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop before this text (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    return options


def sampling_settings(args: argparse.Namespace) -> dict[str, object]:
    """The `SamplingParams` keywords of the `sampling_options` flags (None: not given)."""
    return {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
        "stop": args.stop or [], "ignore_eos": args.ignore_eos,
    }


def prompt_options(prompt_help: str = "the prompt (raw text, or the user message with --chat)") -> argparse.ArgumentParser:
    """`--prompt`, `--chat` and `--system` (`generate`, `run-onnx`, `client generate`)."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--prompt", required=True, help=prompt_help)
    options.add_argument(
        "--chat", action="store_true", help="wrap the prompt as one user message in the model's chat template"
    )
    options.add_argument("--system", default=None, help="system message of the chat template (needs --chat)")
    return options


def prompt_of(args: argparse.Namespace) -> str | list[dict[str, str]]:
    """`--prompt` as raw text, or with `--chat` as messages (the `--system` one first)."""
    if args.system is not None and not args.chat:
        raise InvalidParameterError(
            "--system is the system message of the chat template, which only --chat applies; "
            "add --chat or drop --system"
        )
    if not args.chat:
        return args.prompt
    system = [] if args.system is None else [{"role": "system", "content": args.system}]
    return [*system, {"role": "user", "content": args.prompt}]


def quantize_options(*, scheme_required: bool) -> argparse.ArgumentParser:
    """`convert`'s quantization flags; `merge-adapter` takes the same ones, used only with --scheme.

    Defaults are None (not given), so the library's defaults apply and `merge-adapter` can tell
    an option given without --scheme.
    """
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group(
        "quantization" if scheme_required else "quantization (with --scheme only; as `quadapt convert`)"
    )
    schemes = "int4 (symmetric, group-wise), int4-asym, int8 (per-channel) or nf4 (bitsandbytes, double quant)"
    group.add_argument(
        "--scheme", required=scheme_required, default=None, metavar="SCHEME",
        help=schemes if scheme_required else f"quantize the merged model: {schemes} (default: write float)",
    )
    group.add_argument(
        "--group-size", type=int, default=None, metavar="G",
        help="int4 group size: 32, 64 or 128 (default: the largest that divides every linear's input size)",
    )
    group.add_argument(
        "--calibration", default=None, metavar="METHOD",
        help=(
            "minmax (round to nearest, default), mse (per-group MSE range search), gptq, or awq (activation-aware "
            "scaling); gptq and awq calibrate on quadapt's built-in broad text set unless --calib-text is given"
        ),
    )
    group.add_argument(
        "--calib-text", action="append", default=None, metavar="FILE",
        help=(
            "UTF-8 text for gptq/awq calibration (>= 128 tokens); repeat to mix several. 'default' names the "
            "built-in set, so --calib-text default --calib-text FILE adds FILE to it (default: the built-in set)"
        ),
    )
    group.add_argument(
        "--calib-tokens", type=positive_int, default=None, metavar="N",
        help="gptq/awq: calibration tokens to use at most, >= 1024 (default 32768; 1 sequence in 8 is held out "
        "to check each layer against round to nearest)",
    )
    group.add_argument(
        "--actorder", action=argparse.BooleanOptionalAction, default=None,
        help="GPTQ: visit columns by decreasing activation energy (static act-order, no g_idx is stored; "
        "default: on with --calibration gptq)",
    )
    group.add_argument(
        "--keep", nargs="+", default=None, metavar="MODULE",
        help="linears to keep float: a name (model.layers.0.mlp.down_proj), suffix (down_proj) or prefix (model.layers.0)",
    )
    group.add_argument(
        "--lm-head", default=None, metavar="PRECISION",
        help=(
            "output head: float (default) or int8 (per output row, symmetric, W8A16). int8 needs --scheme int4 or "
            "int8 and a head not tied to the embedding; nf4 (bitsandbytes) and int4-asym cannot hold it, and "
            "transformers cannot load a quantized (tied) embedding, so those are refused"
        ),
    )
    return options


def _engine_default(name: str) -> object:
    """The default of `EngineArgs.<name>`: the one place it is written."""
    field = next(f for f in dataclasses.fields(EngineArgs) if f.name == name)
    assert field.default is not dataclasses.MISSING, name
    return field.default


def _size_text(size: int) -> str:
    """`size` bytes as the largest binary unit that divides it (536870912 -> 512MiB)."""
    for unit in ("GiB", "MiB", "KiB"):
        if size % _SIZE_UNITS[unit.lower()] == 0:
            return f"{size // _SIZE_UNITS[unit.lower()]}{unit}"
    return str(size)
