"""`quadapt generate` (one prompt through `quadapt.load(...).generate`) and `quadapt eval-ppl`."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .options import executor_option, model_options, prompt_options, prompt_of, run_options, sampling_options, sampling_settings

logger = logging.getLogger(__name__)

# What `quadapt.load` gives torch when not told (`runtime.api.default_threads`).
_HALF_THE_CORES = "half the cores this process may use"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `generate` and `eval-ppl` to `sub`."""
    gen = sub.add_parser(
        "generate",
        parents=[
            model_options("checkpoint directory or .gguf file"), run_options(_HALF_THE_CORES),
            prompt_options("the prompt text (the user message with --chat)"), sampling_options(),
        ],
        help="generate text from a prompt",
        description="Generate text from a prompt, streaming it to stdout. Prints only the generated text.",
    )
    gen.add_argument("--adapter", default=None, metavar="DIR", help="PEFT LoRA adapter directory to apply to the model")
    executor_option(gen)
    gen.set_defaults(handler=_generate)

    ppl = sub.add_parser(
        "eval-ppl",
        parents=[
            model_options("checkpoint directory, .gguf file, or `quadapt export-onnx` directory"),
            run_options(f"{_HALF_THE_CORES}; onnxruntime's choice for an export"),
        ],
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


def _generate(args: argparse.Namespace) -> int:
    from ..runtime.api.load import load
    from ..runtime.engine.sampling import SamplingParams
    from ..runtime.text.tokenizer import check_text

    # Every check on what was typed runs before the model loads.
    prompt = prompt_of(args)
    for flag, text in [("--prompt", args.prompt), ("--system", args.system), *(("--stop", s) for s in args.stop or ())]:
        if text is not None:
            check_text(text, flag)
    settings = sampling_settings(args)
    params = SamplingParams(**settings)

    started = time.perf_counter()
    model = load(args.model, adapter=args.adapter, dtype=args.dtype, threads=args.threads, executor=args.executor)
    import torch

    logger.debug("loaded %s (%s, %d threads) in %.2f s", args.model, args.dtype, torch.get_num_threads(),
                 time.perf_counter() - started)
    logger.debug("sampling: %s", params)
    started = time.perf_counter()
    generation = model.generate(prompt, **settings, stream=True)
    for delta in generation:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    result = generation.result
    logger.debug("prompt: %d tokens", result.prompt_tokens)
    logger.debug("%d tokens in %.2f s, finished by %s", result.completion_tokens, time.perf_counter() - started,
                 result.finish_reason)
    if result.context_full:  # the prompt and the output fill the context exactly
        logger.warning(
            "the output stopped at the model's context of %d tokens (prompt %d + output %d); "
            "shorten the prompt or lower --max-new-tokens",
            result.prompt_tokens + result.completion_tokens, result.prompt_tokens, result.completion_tokens,
        )
    return 0


def _eval_ppl(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..runtime.errors import InvalidParameterError

    text_file = Path(args.text)
    if not text_file.is_file():
        raise InvalidParameterError(f"text file {args.text!r} does not exist; pass a UTF-8 text file with --text")
    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:  # worded as converters/calibrate.py words --calib-text's
        raise InvalidParameterError(f"cannot read text {str(text_file)!r}: {e}; pass a UTF-8 text file") from None
    from ..runtime.edge import MANIFEST  # no onnxruntime import: a checkpoint scores without it

    if (Path(args.model) / MANIFEST).is_file():
        return _eval_ppl_export(args, text)
    import torch

    from ..runtime.engine.args import default_threads, open_with_tokenizer
    from ..runtime.checkpoints.loader import load_model
    from ..runtime.api.perplexity import perplexity

    reader, tokenizer = open_with_tokenizer(args.model)  # the model alone: scoring needs no engine
    torch.set_num_threads(args.threads or default_threads())
    model = load_model(reader, dtype=getattr(torch, args.dtype))
    ids = tokenizer.encode(text)
    result = perplexity(model, ids, window=args.window, stride=args.stride, progress=True)
    print(f"tokens: {result.tokens} (window {result.window}, stride {result.stride})")
    print(f"perplexity: {result.perplexity:.4f}")
    return 0


def _eval_ppl_export(args: argparse.Namespace, text: str) -> int:
    """`eval-ppl` on a `quadapt export-onnx` directory: onnxruntime scores the same windows as the torch runtime."""
    from ..runtime.errors import InvalidParameterError, QuadaptError

    try:
        from ..runtime.edge.model import EdgeModel
        from ..runtime.edge.perplexity import perplexity, window_and_stride
        from ..runtime.text.tokenizer import Tokenizer
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
    ids = Tokenizer.from_dir(args.model).encode(text)
    value = perplexity(model, ids, window=args.window, stride=args.stride)
    window, stride = window_and_stride(model, args.window, args.stride)
    print(f"tokens: {len(ids) - 1} (window {window}, stride {stride})")
    print(f"perplexity: {value:.4f}")
    return 0
