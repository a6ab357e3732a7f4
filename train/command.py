"""The library side of `quadapt train`: a checkpoint and a data file in, a PEFT adapter directory out.

The base is a checkpoint directory: a quantized one (NF4 or int4, as `quadapt convert` writes
it) is used as it is; a float one is quantized in memory first (NF4 by default: QLoRA's way),
which also makes LoftQ's initialisation possible. The output directory is a PEFT adapter (plus
the training state, the log and the loss curve), written as training goes. The command's flags,
their defaults and its progress bar are the CLI's (`cli/train.py`).

This is the one module of `train` that may import `converters` (for the in-memory quantization).
Nothing heavy is imported at module level: each function imports what it needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .loop import StepInfo, TrainConfig, TrainResult

logger = logging.getLogger("quadapt.train")


def fit_adapter(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    config: TrainConfig,
    *,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    dropout: float,
    layers: Sequence[int] | None,
    init: Literal["default", "loftq"],
    save_dtype: Literal["float32", "bfloat16", "float16"],
    quantize: Literal["nf4", "int4"],
    base_weights: Literal["auto", "dense", "packed"],
    device: str | None,
    threads: int | None,
    max_length: int,
    eval_fraction: float,
    resume: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainResult:
    """Train a LoRA adapter over the 4-bit base `model` on the JSONL examples of `data`, saving it in `out`.

    Args:
        model: the base checkpoint directory, quantized (used as is) or float (quantized in
            memory by `quantize`).
        data: JSONL examples, as `train.data.read_examples` reads them.
        out: the adapter directory, written as training goes (with the training state).
        config: the schedule (`TrainConfig`).
        targets, rank, alpha, dropout, layers: the LoRA modules (`train.lora.add_lora`); layers
            None adapts every decoder layer.
        init: "default" (A random, B zero) or "loftq" (from the quantization error; needs a
            float base).
        save_dtype: the saved factors' dtype.
        quantize: how a float base is quantized in memory.
        base_weights: "dense" keeps a float copy of the 4-bit weights (faster, more memory),
            "packed" dequantizes on every pass, "auto" is dense on CPU and packed on GPU.
        device: "cpu" or "cuda"; None: CUDA when present.
        threads: CPU threads for torch (None: torch's choice).
        max_length: tokens kept of each example.
        eval_fraction: share of the examples held out for the eval loss.
        resume: continue the run saved in `out`.
        on_step: called after each optimizer step.

    Returns:
        The run's losses and speed.

    Raises:
        InvalidParameterError: no CUDA device for `device="cuda"`, or "loftq" on a quantized base.
        CheckpointError, ConfigError, UnsupportedError: a base quadapt cannot load.
    """
    import torch

    from ..runtime.engine.args import open_with_tokenizer
    from ..runtime.errors import InvalidParameterError
    from ..runtime.checkpoints.loader import load_model
    from .data import read_examples, split_examples
    from .files import save_adapter
    from .lora import add_lora
    from .loop import total_steps, train

    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError("--device cuda: no CUDA device is visible; use --device cpu")
    if threads is not None:
        torch.set_num_threads(threads)
    reader, tokenizer = open_with_tokenizer(model)
    examples = read_examples(data, tokenizer, max_length=max_length)
    train_set, held_out = split_examples(examples, eval_fraction, config.seed)
    dtype = torch.float32 if torch_device.type == "cpu" else torch.bfloat16
    quantized = "quantization_config" in reader.config_dict()
    if init == "loftq" and quantized:
        raise InvalidParameterError(
            f"--init loftq needs the float weights, but --model {str(model)!r} is already quantized; pass the "
            "float checkpoint (it is quantized in memory) or use --init default"
        )
    base = load_model(reader, dtype=dtype, device=torch_device)
    floats = {} if quantized else quantize_in_memory(base, quantize)
    modules = add_lora(base, list(targets), rank=rank, alpha=alpha, dropout=dropout, dtype=dtype,
                       layers=None if layers is None else list(layers))
    dense = base_weights == "dense" or (base_weights == "auto" and torch_device.type == "cpu")
    for name, module in modules.items():
        if dense:
            module.keep_dense_copy(dtype)
        if init == "loftq" and not resume:
            module.loftq_init(floats[name])
    floats.clear()
    torch_save_dtype = getattr(torch, save_dtype)

    def save(directory: Path) -> None:
        save_adapter(directory, modules, base_model=str(model), dropout=dropout, dtype=torch_save_dtype,
                     num_layers=base.config.num_hidden_layers)

    steps = total_steps(config, len(train_set))
    logger.info("%d training and %d held-out examples; %d steps", len(train_set), len(held_out), steps)
    pad = min(tokenizer.eos_token_ids, default=0)  # padding is never attended to nor trained on
    return train(base, modules, train_set, config, pad_id=pad, eval_examples=held_out, out_dir=Path(out), save=save,
                 resume=resume, on_step=on_step)


def quantize_in_memory(model: Any, scheme: str) -> dict[str, Any]:
    """Replace each decoder-layer linear of a float `model` by its NF4 or int4 (symmetric) quantization,
    by `quadapt convert`'s rules (`converters.in_memory`): int4's group size is the largest of 128,
    64, 32 that divides every linear's input size. The output head stays float.

    Args:
        model: a runtime `CausalLM` with float linears, modified in place.
        scheme: "nf4" or "int4".

    Returns:
        HF module name -> the float weight it replaced (for `--init loftq`).

    Raises:
        InvalidParameterError: no int4 group size fits the model, naming what to do instead.
    """
    from ..converters.in_memory import quantize_model
    from ..runtime.errors import InvalidParameterError

    try:
        return quantize_model(model, scheme=scheme)
    except InvalidParameterError as e:
        raise InvalidParameterError(
            f"--quantize {scheme}: {e}. quadapt train takes no --keep: quantize with `quadapt convert` and pass its "
            "output as --model, or use --quantize nf4"
        ) from None
