"""`quadapt train`: a LoRA adapter trained over a 4-bit base (`train.command.fit_adapter`), with a progress bar."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .options import non_negative_float, non_negative_int, positive_float, positive_int

logger = logging.getLogger(__name__)

# `train.lora.TARGETS`, spelled out here so that building the parser imports no torch.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_range(value: str) -> range:
    """argparse type: a layer index (7) or an inclusive range (20-29)."""
    first, _, last = value.partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        lo, hi = -1, -2
    if lo < 0 or hi < lo:
        raise argparse.ArgumentTypeError(f"must be a layer index like 7 or a range like 20-29, got {value!r}")
    return range(lo, hi + 1)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `train` to `sub`."""
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
    run.add_argument("--steps", type=positive_int, default=None, metavar="N",
                     help="optimizer steps (default: as many as --epochs takes)")
    run.add_argument("--epochs", type=positive_float, default=1.0, metavar="E",
                     help="passes over the data when --steps is not given (default 1)")
    run.add_argument("--lr", type=positive_float, default=2e-4, metavar="LR",
                     help="peak learning rate, AdamW (default 2e-4)")
    run.add_argument("--warmup-steps", type=non_negative_int, default=None, metavar="N",
                     help="linear warmup steps before the cosine decay (default 5%% of the steps)")
    run.add_argument("--batch-size", type=positive_int, default=4, metavar="B",
                     help="examples per micro-batch (default 4)")
    run.add_argument("--grad-accum", type=positive_int, default=1, metavar="K",
                     help="micro-batches per optimizer step (default 1)")
    run.add_argument("--max-grad-norm", type=non_negative_float, default=1.0, metavar="X",
                     help="clip the gradients' L2 norm to X; 0 turns clipping off (default 1.0)")
    run.add_argument("--weight-decay", type=non_negative_float, default=0.0, metavar="X",
                     help="AdamW weight decay (default 0)")
    run.add_argument("--max-length", type=positive_int, default=512, metavar="N",
                     help="tokens kept of each example (default 512)")
    run.add_argument("--eval-fraction", type=float, default=0.05, metavar="F",
                     help="share of the examples held out for the eval loss, 0 to 0.5 (default 0.05)")
    run.add_argument("--eval-every", type=non_negative_int, default=0, metavar="N",
                     help="held-out loss every N steps (default 0: at the end)")
    run.add_argument("--save-every", type=non_negative_int, default=50, metavar="N",
                     help="write the adapter and the training state every N steps, 0 for the end only (default 50)")
    run.add_argument("--seed", type=int, default=0, help="seed of the data order, split and dropout (default 0)")
    run.add_argument("--no-checkpointing", action="store_true", help=(
        "keep every layer's activations instead of recomputing them in backward (faster, more memory)"))
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--rank", type=positive_int, default=8, metavar="R", help="LoRA rank (default 8)")
    lora.add_argument("--alpha", type=positive_float, default=16.0, metavar="A",
                      help="LoRA alpha; scale = A / R (default 16)")
    lora.add_argument("--dropout", type=float, default=0.05, metavar="P",
                      help="dropout on the LoRA input (default 0.05)")
    lora.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS), metavar="NAME",
                      help=f"projections to adapt, from {', '.join(TARGETS)} (default: all)")
    lora.add_argument("--layers", nargs="+", type=layer_range, default=None, metavar="I",
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
                      "(symmetric, as `quadapt convert` groups it) (default nf4)")
    base.add_argument("--base-weights", choices=("auto", "dense", "packed"), default="auto",
                      help="dense: also keep a float copy of the 4-bit weights for speed (more memory); packed: "
                      "dequantize on every pass (4-bit memory); auto: dense on CPU, packed on GPU")
    base.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    base.add_argument("--threads", type=positive_int, default=None, metavar="N",
                      help="CPU threads, >= 1 (default: torch's choice)")
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    import importlib.util
    from pathlib import Path

    from ..runtime.errors import InvalidParameterError, UnsupportedError

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

    from tqdm import tqdm

    from ..train.command import fit_adapter
    from ..train.files import LOSS_PLOT
    from ..train.loop import TrainConfig

    config = TrainConfig(
        steps=args.steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        checkpointing=not args.no_checkpointing, eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
    )
    bars = []  # the bar, opened at the first step, once the steps are counted and the log lines are out

    def on_step(info) -> None:
        if not bars:
            bars.append(tqdm(total=info.total_steps, desc="quadapt: training", unit="step", file=sys.stderr,
                             mininterval=0.5))
        bar = bars[0]
        bar.n = info.step
        postfix = {"loss": f"{info.loss:.3f}", "tok/s": f"{info.tokens_per_s:.0f}"}
        if info.eval_loss is not None:
            postfix["eval"] = f"{info.eval_loss:.3f}"
        bar.set_postfix(postfix, refresh=True)

    try:
        result = fit_adapter(
            args.model, args.data, out, config, targets=args.targets, rank=args.rank, alpha=args.alpha,
            dropout=args.dropout, layers=None if args.layers is None else sorted({i for r in args.layers for i in r}),
            init=args.init, save_dtype=args.save_dtype, quantize=args.quantize, base_weights=args.base_weights,
            device=args.device, threads=args.threads, max_length=args.max_length, eval_fraction=args.eval_fraction,
            resume=args.resume, on_step=on_step,
        )
    finally:
        for bar in bars:
            bar.close()
    if result.eval_losses:
        logger.info("held-out loss %.4f at step %d", result.eval_losses[-1][1], result.eval_losses[-1][0])
    logger.info("%.0f tokens/s; loss curve in %s", result.tokens_per_s, out / LOSS_PLOT)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from the first process only
        print(out)
    return 0
