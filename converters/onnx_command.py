"""`quadapt export-onnx`: export a checkpoint (and adapters) for the edge runtime and onnxruntime-genai."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger("quadapt.converters.onnx_command")


def add_command(sub: argparse._SubParsersAction) -> None:
    """Add the `export-onnx` subparser to `sub`."""
    cmd = sub.add_parser(
        "export-onnx",
        help="export a checkpoint to ONNX (MatMulNBits, GroupQueryAttention) for `quadapt run-onnx`",
        description=(
            "Write a decoder graph of onnxruntime's fused CPU operators, its weights in one external data file, "
            "each adapter as an .onnx_adapter file, the tokenizer, and genai_config.json. Packed int4/int8 "
            "weights with a power-of-two group size are repacked bit for bit; others are quantized from float."
        ),
    )
    cmd.add_argument("--model", required=True, metavar="PATH", help="checkpoint directory (float or quantized) or .gguf file")
    cmd.add_argument("--out", required=True, metavar="DIR", help="directory to create")
    cmd.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    cmd.add_argument("--bits", type=int, choices=(4, 8), default=4, help="bits of the layer weights (default 4)")
    cmd.add_argument(
        "--block-size", type=_block_size, default=32, metavar="N",
        help="block size of weights quantized from float, a power of two >= 16 (default 32)",
    )
    cmd.add_argument(
        "--lm-head", choices=("int8", "int4", "float"), default="int8", help="the output projection's weights (default int8)"
    )
    cmd.add_argument(
        "--accuracy-level", type=int, choices=(1, 4), default=4,
        help="MatMulNBits compute: 4 int8 activations (fast, the default), 1 float32",
    )
    cmd.add_argument(
        "--adapter", action="append", type=_adapter_spec, default=[], metavar="NAME=PATH",
        help="a PEFT adapter to export beside the model, chosen per call with run-onnx --adapter NAME (repeatable)",
    )
    cmd.set_defaults(handler=_export_onnx)


def _export_onnx(args: argparse.Namespace) -> int:
    from ..runtime.errors import InvalidParameterError
    from .onnx_export import export_onnx

    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        names = [name for name, _ in args.adapter]
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InvalidParameterError(f"adapter name(s) {', '.join(twice)} given twice; give each adapter its own name")
    out = export_onnx(
        args.model, args.out, bits=args.bits, block_size=args.block_size, adapters=adapters, lm_head=args.lm_head,
        accuracy_level=args.accuracy_level, overwrite=args.overwrite,
    )
    logger.info("wrote %s", out)
    return 0


def _block_size(value: str) -> int:
    """argparse type: a power of two >= 16."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 16 or number & (number - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two >= 16 (16, 32, 64, ...), got {value!r}")
    return number


def _adapter_spec(value: str) -> tuple[str, str]:
    """argparse type: NAME=PATH."""
    name, sep, path = value.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"must be NAME=PATH (e.g. sql=adapters/sql), got {value!r}")
    return name, path
