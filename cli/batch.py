"""`quadapt batch`: a JSONL file of requests through the batching engine (`runtime/api/offline.py`)."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack

from .options import adapter_spec, engine_args, engine_options, model_options, named_adapters, run_options


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `batch` to `sub`."""
    batch = sub.add_parser(
        "batch",
        parents=[
            model_options("checkpoint directory or .gguf file"), run_options(),
            engine_options("adapter slots; with fewer slots than adapters, idle adapters are swapped out "
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
        "--adapter", type=adapter_spec, action="append", default=[], metavar="NAME=PATH",
        help='load the PEFT LoRA adapter directory PATH as NAME, for lines with "adapter": NAME (repeatable)',
    )
    batch.set_defaults(handler=_batch)


def _batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..runtime.checkpoints.peft import read_peft_header
    from ..runtime.engine.args import EngineArgs, build_engine
    from ..runtime.errors import InvalidParameterError, QuadaptError
    from ..runtime.api.llm import LLM
    from ..runtime.api.offline import run_jsonl

    # Every check on what was typed (flags, files, adapters) runs before the model loads.
    adapters = named_adapters(args.adapter)
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
    ranks = {}
    for name, path in adapters.items():  # the headers alone, so each error names its flag
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
    try:
        engine, tokenizer, _ = build_engine(EngineArgs(**engine_args(args, adapters)))
    except InvalidParameterError as e:
        raise InvalidParameterError(f"{e} (--kv-cache-memory, --block-size)") from None
    with ExitStack() as files:
        try:
            lines = files.enter_context(open(source, "rb"))
        except OSError as e:
            raise InvalidParameterError(f"cannot read --input {args.input!r}: {e}; pass a file you can read") from None
        try:  # opened once the model has loaded: a run that cannot start keeps the old results
            sink = sys.stdout if target is None else files.enter_context(open(target, "w", encoding="utf-8"))
        except OSError as e:
            raise InvalidParameterError(f"cannot write --output {args.output!r}: {e}; name a file you can write") from None
        bad = run_jsonl(LLM.from_engine(engine, tokenizer), lines, sink, source=args.input, adapters=set(adapters))
    return 1 if bad else 0
