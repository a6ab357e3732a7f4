"""`quadapt export-onnx` (a checkpoint for onnxruntime) and `quadapt run-onnx` (the torch-free edge runtime).

`run-onnx` imports only the edge modules (numpy, onnxruntime, tokenizers, jinja2), so it runs
where torch is not installed.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .options import (
    adapter_spec, named_adapters, positive_int, prompt_of, prompt_options, sampling_options, sampling_settings,
)

logger = logging.getLogger(__name__)


def block_size(value: str) -> int:
    """argparse type: a power of two >= 16."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 16 or number & (number - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two >= 16 (16, 32, 64, ...), got {value!r}")
    return number


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `export-onnx` and `run-onnx` to `sub`."""
    export = sub.add_parser(
        "export-onnx",
        help="export a checkpoint to ONNX (MatMulNBits, GroupQueryAttention) for `quadapt run-onnx`",
        description=(
            "Write a decoder graph of onnxruntime's fused CPU operators, its weights in one external data file, "
            "each adapter as an .onnx_adapter file, the tokenizer, and genai_config.json. Packed int4/int8 "
            "weights with a power-of-two group size are repacked bit for bit; others are quantized from float."
        ),
    )
    export.add_argument("--model", required=True, metavar="PATH", help="checkpoint directory (float or quantized) or .gguf file")
    export.add_argument("--out", required=True, metavar="DIR", help="directory to create")
    export.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    export.add_argument("--bits", type=int, choices=(4, 8), default=4, help="bits of the layer weights (default 4)")
    export.add_argument(
        "--block-size", type=block_size, default=32, metavar="N",
        help="block size of weights quantized from float, a power of two >= 16 (default 32)",
    )
    export.add_argument(
        "--lm-head", choices=("int8", "int4", "float"), default="int8", help="the output projection's weights (default int8)"
    )
    export.add_argument(
        "--accuracy-level", type=int, choices=(1, 4), default=4,
        help="MatMulNBits compute: 4 int8 activations (fast, the default), 1 float32",
    )
    export.add_argument(
        "--adapter", action="append", type=adapter_spec, default=[], metavar="NAME=PATH",
        help="a PEFT adapter to export beside the model, chosen per call with run-onnx --adapter NAME (repeatable)",
    )
    export.set_defaults(handler=_export_onnx)

    run = sub.add_parser(
        "run-onnx",
        parents=[prompt_options(), sampling_options()],
        help="generate from an ONNX export (quadapt export-onnx) with onnxruntime, without torch",
        description="Generate from a directory written by `quadapt export-onnx`, streaming the text to stdout.",
    )
    run.add_argument("model", metavar="DIR", help="the export directory")
    run.add_argument("--adapter", default=None, metavar="NAME", help="one of the export's adapters (default: the base model)")
    run.add_argument("--threads", type=positive_int, default=None, metavar="N", help="onnxruntime intra-op threads")
    run.set_defaults(handler=_run_onnx)


def _export_onnx(args: argparse.Namespace) -> int:
    from ..converters.onnx_export import export_onnx

    out = export_onnx(
        args.model, args.out, bits=args.bits, block_size=args.block_size, adapters=named_adapters(args.adapter),
        lm_head=args.lm_head, accuracy_level=args.accuracy_level, overwrite=args.overwrite,
    )
    logger.info("wrote %s", out)
    return 0


def _run_onnx(args: argparse.Namespace) -> int:
    from ..runtime.edge.generate import generate_text
    from ..runtime.edge.model import EdgeModel
    from ..runtime.text.sampling_params import SamplingParams
    from ..runtime.text.tokenizer import Tokenizer

    prompt = prompt_of(args)  # every check on what was typed runs before the model loads
    params = SamplingParams(**sampling_settings(args))
    model = EdgeModel(args.model, threads=args.threads)
    model.adapter_inputs(args.adapter)  # an unknown adapter fails before any work
    tokenizer = Tokenizer.from_dir(model.manifest.path)
    ids = tokenizer.encode_prompt(prompt)
    for delta in generate_text(model, tokenizer, ids, params, args.adapter):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
