"""`quadapt train`: its parser and handler, a thin shell around `train.loop.train`.

The base is a checkpoint directory: a quantized one (NF4 or int4, as `quadapt convert` writes
it) is used as it is; a float one is quantized in memory first (`--quantize`, NF4 by default:
QLoRA's way), which also makes `--init loftq` possible. The output directory is a PEFT adapter
(plus the training state, the log and the loss curve), written as training goes.

This is the one module of `train` that may import `converters` (for the in-memory quantization).
Nothing heavy is imported at module level: the handler imports what it needs.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("quadapt.train")

# `train.lora.TARGETS`, spelled out here so that building the parser imports no torch.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_command(sub: argparse._SubParsersAction) -> None:
    """Add the `train` subparser to `sub`."""
    p = sub.add_parser(
        "train",
        help="train a LoRA adapter on a 4-bit base (QLoRA) and write it as a PEFT adapter",
        description=(
            "Train LoRA factors over a frozen 4-bit base (NF4 or int4), with the loss on completion tokens only. "
            "--data is JSONL: {\"prompt\": ..., \"completion\": ...} or {\"messages\": [...]} (chat template "
            "applied, loss on assistant turns). DIR becomes a PEFT adapter that quadapt and PeftModel load; it "
            "also holds the training state (for --resume), log.jsonl and loss.png."
        ),
    )
    p.add_argument("--model", required=True, metavar="PATH", help=(
        "base checkpoint directory: quantized (used as is) or float (quantized in memory, see --quantize)"))
    p.add_argument("--data", required=True, metavar="FILE", help="training data, JSONL")
    p.add_argument("--out", required=True, metavar="DIR", help="adapter directory to write")
    p.add_argument("--resume", action="store_true", help="continue the run whose training state is in DIR")
    run = p.add_argument_group("schedule")
    run.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                     help="optimizer steps (default: as many as --epochs takes)")
    run.add_argument("--epochs", type=_positive_float, default=1.0, metavar="E",
                     help="passes over the data when --steps is not given (default 1)")
    run.add_argument("--lr", type=_positive_float, default=2e-4, metavar="LR",
                     help="peak learning rate, AdamW (default 2e-4)")
    run.add_argument("--warmup-steps", type=_non_negative_int, default=None, metavar="N",
                     help="linear warmup steps before the cosine decay (default 5%% of the steps)")
    run.add_argument("--batch-size", type=_positive_int, default=4, metavar="B",
                     help="examples per micro-batch (default 4)")
    run.add_argument("--grad-accum", type=_positive_int, default=1, metavar="K",
                     help="micro-batches per optimizer step (default 1)")
    run.add_argument("--max-grad-norm", type=_non_negative_float, default=1.0, metavar="X",
                     help="clip the gradients' L2 norm to X; 0 turns clipping off (default 1.0)")
    run.add_argument("--weight-decay", type=_non_negative_float, default=0.0, metavar="X",
                     help="AdamW weight decay (default 0)")
    run.add_argument("--max-length", type=_positive_int, default=512, metavar="N",
                     help="tokens kept of each example (default 512)")
    run.add_argument("--eval-fraction", type=float, default=0.05, metavar="F",
                     help="share of the examples held out for the eval loss, 0 to 0.5 (default 0.05)")
    run.add_argument("--eval-every", type=_non_negative_int, default=0, metavar="N",
                     help="held-out loss every N steps (default 0: at the end)")
    run.add_argument("--save-every", type=_non_negative_int, default=50, metavar="N",
                     help="write the adapter and the training state every N steps, 0 for the end only (default 50)")
    run.add_argument("--seed", type=int, default=0, help="seed of the data order, split and dropout (default 0)")
    run.add_argument("--no-checkpointing", action="store_true", help=(
        "keep every layer's activations instead of recomputing them in backward (faster, more memory)"))
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--rank", type=_positive_int, default=8, metavar="R", help="LoRA rank (default 8)")
    lora.add_argument("--alpha", type=_positive_float, default=16.0, metavar="A",
                      help="LoRA alpha; scale = A / R (default 16)")
    lora.add_argument("--dropout", type=float, default=0.05, metavar="P",
                      help="dropout on the LoRA input (default 0.05)")
    lora.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS), metavar="NAME",
                      help=f"projections to adapt, from {', '.join(TARGETS)} (default: all)")
    lora.add_argument("--layers", nargs="+", type=_layer_range, default=None, metavar="I",
                      help="decoder layers to adapt: indices or ranges like 20-29 (default: all); backward stops at "
                      "the lowest one, so the top layers alone train faster")
    lora.add_argument("--init", choices=("default", "loftq"), default="default",
                      help="default (A random, B zero) or loftq (A, B from the SVD of the quantization error; "
                      "needs a float --model)")
    lora.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                      help="dtype of the saved factors (default float32)")
    base = p.add_argument_group("base model")
    base.add_argument("--quantize", choices=("nf4", "int4"), default="nf4",
                      help="how a float --model is quantized in memory: nf4 (bitsandbytes, double quant) or int4 "
                      "(symmetric, group 64) (default nf4)")
    base.add_argument("--base-weights", choices=("auto", "dense", "packed"), default="auto",
                      help="dense: also keep a float copy of the 4-bit weights for speed (more memory); packed: "
                      "dequantize on every pass (4-bit memory); auto: dense on CPU, packed on GPU")
    base.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    base.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                      help="CPU threads, >= 1 (default: torch's choice)")
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..runtime.api import open_with_tokenizer
    from ..runtime.errors import InvalidParameterError, UnsupportedError
    from ..runtime.loader import load_model
    from .data import read_examples, split_examples
    from .files import LOSS_PLOT, save_adapter
    from .lora import add_lora
    from .loop import TrainConfig, total_steps, train

    if importlib.util.find_spec("matplotlib") is None:  # refused now, not after the first saved step
        raise UnsupportedError("quadapt train draws the loss curve with matplotlib; pip install 'quadapt[train]'")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise InvalidParameterError(f"--out {args.out!r} is a file; name a directory")
    if out.is_dir() and any(out.iterdir()) and not args.resume:
        raise InvalidParameterError(
            f"--out {args.out!r} is not empty; add --resume to continue the run saved there, or name a new directory"
        )
    if not 0.0 <= args.dropout < 1.0:
        raise InvalidParameterError(f"--dropout must be in [0, 1), got {args.dropout}")
    config = TrainConfig(
        steps=args.steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        checkpointing=not args.no_checkpointing, eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError("--device cuda: no CUDA device is visible; use --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reader, tokenizer = open_with_tokenizer(args.model)
    examples = read_examples(args.data, tokenizer, max_length=args.max_length)
    train_set, held_out = split_examples(examples, args.eval_fraction, args.seed)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    quantized = "quantization_config" in reader.config_dict()
    if args.init == "loftq" and quantized:
        raise InvalidParameterError(
            f"--init loftq needs the float weights, but --model {args.model!r} is already quantized; pass the "
            "float checkpoint (it is quantized in memory) or use --init default"
        )
    model = load_model(reader, dtype=dtype, device=device)
    floats = {} if quantized else quantize_in_memory(model, args.quantize)
    layers = None if args.layers is None else sorted({i for part in args.layers for i in part})
    modules = add_lora(model, args.targets, rank=args.rank, alpha=args.alpha, dropout=args.dropout, dtype=dtype,
                       layers=layers)
    dense = args.base_weights == "dense" or (args.base_weights == "auto" and device.type == "cpu")
    for name, module in modules.items():
        if dense:
            module.keep_dense_copy(dtype)
        if args.init == "loftq" and not args.resume:
            module.loftq_init(floats[name])
    floats.clear()
    save_dtype = getattr(torch, args.save_dtype)

    def save(directory: Path) -> None:
        save_adapter(directory, modules, base_model=str(args.model), dropout=args.dropout, dtype=save_dtype,
                     num_layers=model.config.num_hidden_layers)

    steps = total_steps(config, len(train_set))
    logger.info("%d training and %d held-out examples; %d steps", len(train_set), len(held_out), steps)
    bar = tqdm(total=steps, desc="quadapt: training", unit="step", file=sys.stderr, mininterval=0.5)

    def on_step(info: Any) -> None:
        bar.n = info.step
        postfix = {"loss": f"{info.loss:.3f}", "tok/s": f"{info.tokens_per_s:.0f}"}
        if info.eval_loss is not None:
            postfix["eval"] = f"{info.eval_loss:.3f}"
        bar.set_postfix(postfix, refresh=True)

    pad = min(tokenizer.eos_token_ids, default=0)  # padding is never attended to nor trained on
    try:
        result = train(model, modules, train_set, config, pad_id=pad, eval_examples=held_out, out_dir=out, save=save,
                       resume=args.resume, on_step=on_step)
    finally:
        bar.close()
    if result.eval_losses:
        logger.info("held-out loss %.4f at step %d", result.eval_losses[-1][1], result.eval_losses[-1][0])
    logger.info("%.0f tokens/s; loss curve in %s", result.tokens_per_s, out / LOSS_PLOT)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from the first process only
        print(out)
    return 0


def quantize_in_memory(model: Any, scheme: str) -> dict[str, Any]:
    """Replace each decoder-layer linear of a float `model` by its NF4 or int4 (symmetric, group
    64, or the largest power of two below that divides the input size) quantization, made as
    `quadapt convert` makes it; the output head stays float.

    Args:
        model: a runtime `CausalLM` with float linears, modified in place.
        scheme: "nf4" or "int4".

    Returns:
        HF module name -> the float weight it replaced (for `--init loftq`).
    """
    import torch
    from torch import nn

    from ..converters.formats import pack_int32
    from ..converters.quantize import quantize_int, quantize_nf4
    from ..runtime.quant import NF4Linear, PackedIntLinear

    floats = {}
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]
    for name in names:
        linear = model.get_submodule(name)
        w = linear.weight.detach()
        shape = dict(in_features=linear.in_features, out_features=linear.out_features, bias=linear.bias is not None)
        with torch.device("meta"):
            if scheme == "nf4":
                module = NF4Linear(**shape, dtype=w.dtype)
            else:
                group = _group_size(linear.in_features)
                module = PackedIntLinear(**shape, num_bits=4, group_size=group, symmetric=True, scale_dtype=w.dtype)
        if scheme == "nf4":
            q = quantize_nf4(w)
            module._buffers["weight_packed"] = q.packed.reshape(-1).to(w.device)
            module._buffers["absmax"] = q.float_absmax().to(w.device)
        else:
            q = quantize_int(w, num_bits=4, group_size=group, symmetric=True, scale_dtype=w.dtype)
            module._buffers["weight_packed"] = pack_int32(q.q, 4).to(w.device)
            module._buffers["weight_scale"] = q.scale.to(w.device)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        module.kernel_backend = getattr(model, "kernel_backend", None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
        floats[name] = w
    return floats


def _group_size(in_features: int) -> int | None:
    """The int4 group size for `in_features`: 64, else the largest power of two that divides it
    (at least 8), else None (one scale per output channel)."""
    for size in (64, 32, 16, 8):
        if in_features % size == 0:
            return size
    return None


def _layer_range(value: str) -> range:
    """argparse type: a layer index (7) or an inclusive range (20-29)."""
    first, _, last = value.partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        lo, hi = -1, -2
    if lo < 0 or hi < lo:
        raise argparse.ArgumentTypeError(f"must be a layer index like 7 or a range like 20-29, got {value!r}")
    return range(lo, hi + 1)


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


def _non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {value!r}")
    return number


def _positive_float(value: str) -> float:
    """argparse type: a number > 0."""
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value!r}")
    return number


def _non_negative_float(value: str) -> float:
    """argparse type: a number >= 0."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value!r}")
    return number
