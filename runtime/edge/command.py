"""`quadapt run-onnx`: generate from an ONNX export with the torch-free edge runtime.

The handler imports only the edge modules (numpy, onnxruntime, tokenizers, jinja2), so the
command runs where torch is not installed. stdout carries the generated text only.
"""

from __future__ import annotations

import argparse

from ..sampling_params import SAMPLING_DEFAULTS as DEFAULTS  # torch-free


def add_command(sub: argparse._SubParsersAction) -> None:
    """Add the `run-onnx` subparser to `sub`."""
    cmd = sub.add_parser(
        "run-onnx",
        help="generate from an ONNX export (quadapt export-onnx) with onnxruntime, without torch",
        description="Generate from a directory written by `quadapt export-onnx`, streaming the text to stdout.",
    )
    cmd.add_argument("model", metavar="DIR", help="the export directory")
    cmd.add_argument("--prompt", required=True, help="the prompt (raw text, or the user message with --chat)")
    cmd.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    cmd.add_argument("--system", default=None, help="a system message (with --chat)")
    cmd.add_argument("--adapter", default=None, metavar="NAME", help="one of the export's adapters (default: the base model)")
    cmd.add_argument("--max-new-tokens", type=_positive_int, default=DEFAULTS["max_new_tokens"], metavar="N",
                     help="most tokens to generate (default %(default)s)")
    cmd.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], metavar="T",
                     help="sampling temperature; 0 decodes greedily (default %(default)s)")
    cmd.add_argument("--top-p", type=float, default=DEFAULTS["top_p"], metavar="P")
    cmd.add_argument("--top-k", type=int, default=DEFAULTS["top_k"], metavar="K")
    cmd.add_argument("--repetition-penalty", type=float, default=DEFAULTS["repetition_penalty"], metavar="R")
    cmd.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    cmd.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before TEXT (repeatable)")
    cmd.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    cmd.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="onnxruntime intra-op threads")
    cmd.set_defaults(handler=_run_onnx)


def _run_onnx(args: argparse.Namespace) -> int:
    import sys

    from .generate import generate_text
    from .model import EdgeModel
    from .sampling import SamplingParams
    from .text import EdgeTokenizer

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
    )
    model = EdgeModel(args.model, threads=args.threads)
    model.adapter_inputs(args.adapter)  # an unknown adapter fails before any work
    tokenizer = EdgeTokenizer(model.manifest.path)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
        ids = tokenizer.encode_chat(messages)
    else:
        ids = tokenizer.encode(args.prompt)
    for delta in generate_text(model, tokenizer, ids, params, args.adapter):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}; leave the flag out for its default")
    return number
