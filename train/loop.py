"""The QLoRA training loop: AdamW on the LoRA factors, warmup + cosine, accumulation, clipping,
held-out loss, checkpoints that resume exactly, and data parallelism under torchrun.

One optimizer step takes `grad_accum` micro-batches (per process); the loss is the mean
cross-entropy over the step's completion tokens. The learning rate rises linearly for
`warmup_steps` and then follows a cosine to zero at the last step. Gradients are clipped to
`max_grad_norm` (global L2 norm) before the step.

Resuming is exact: the data order is a function of (seed, epoch) and the step (`train.data`),
the learning rate a function of the step, and the state saved at a step holds the factors,
AdamW's moments and the RNG states (dropout's), so a resumed run computes the same steps as the
uninterrupted one.

Under torchrun (`WORLD_SIZE` > 1) each process takes every world-th micro-batch and the LoRA
gradients are averaged with `all_reduce` before clipping (what DDP does for these parameters);
rank 0 alone writes files. The single-process path is what the tests run.

It does not build the model or read files (`train/command.py`, `train/data.py`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..runtime.errors import InvalidParameterError
from ..runtime.model.model import CausalLM
from .data import IGNORE, Example, collate, length_batches
from .files import LOG_FILE, LOSS_PLOT, load_state, plot_losses, save_state
from .forward import completion_loss
from .lora import QLoRALinear, lora_parameters

logger = logging.getLogger("quadapt.train")


@dataclass
class TrainConfig:
    """How to train.

    Attributes:
        steps: optimizer steps; None runs `epochs` passes over the data instead.
        epochs: passes over the training examples when `steps` is None.
        lr: peak learning rate (AdamW).
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step (per process).
        warmup_steps: steps of linear warmup; None is 5% of the steps.
        weight_decay: AdamW's decoupled weight decay.
        max_grad_norm: clip the gradients' global L2 norm to this (0 turns it off).
        checkpointing: recompute each decoder layer in backward (less memory, ~1/3 more compute).
        eval_every: held-out loss every this many steps (0: at the end only).
        save_every: write the adapter and the training state every this many steps (0: at the end).
        seed: the data order's and the dropout's seed.
    """

    steps: int | None = None
    epochs: float = 1.0
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpointing: bool = True
    eval_every: int = 0
    save_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise InvalidParameterError(f"{name} must be >= 0 (0: at the end only), got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise InvalidParameterError(f"steps must be a positive integer, got {self.steps}")
        if not self.epochs > 0:
            raise InvalidParameterError(f"epochs must be > 0, got {self.epochs}")
        if not self.lr > 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise InvalidParameterError(
                f"lr must be > 0 and max_grad_norm, weight_decay >= 0; got lr={self.lr}, "
                f"max_grad_norm={self.max_grad_norm}, weight_decay={self.weight_decay}"
            )


@dataclass(frozen=True)
class StepInfo:
    """What one optimizer step did (handed to the progress callback)."""

    step: int
    total_steps: int
    loss: float
    lr: float
    tokens_per_s: float
    eval_loss: float | None = None


@dataclass
class TrainResult:
    """A finished run: per-step losses, held-out losses, and the run's speed (this process)."""

    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then cosine to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(config: TrainConfig, n_examples: int, world: int = 1) -> int:
    """The run's optimizer steps: `config.steps`, or enough for `config.epochs` passes."""
    if config.steps is not None:
        return config.steps
    batches = math.ceil(n_examples / config.batch_size)
    return max(1, math.ceil(config.epochs * batches / (config.grad_accum * world)))


def evaluate(model: CausalLM, examples: Sequence[Example], batch_size: int, pad_id: int) -> float:
    """Mean completion-token cross-entropy of `model` over `examples` (no gradient, dropout off)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            ids, labels = collate(examples[start : start + batch_size], pad_id)
            loss, n = completion_loss(model, ids.to(_device(model)), labels.to(_device(model)))
            total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def train(
    model: CausalLM,
    modules: Mapping[str, QLoRALinear],
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    pad_id: int,
    eval_examples: Sequence[Example] = (),
    out_dir: str | Path | None = None,
    save: Callable[[Path], None] | None = None,
    resume: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainResult:
    """Train the LoRA factors of `modules` on `examples`; everything else stays frozen.

    Args:
        model: the model the modules live in.
        modules: HF module name -> `QLoRALinear` (`train.lora.add_lora`).
        examples: the training examples.
        config: the run's settings.
        pad_id: the token id padding uses.
        eval_examples: held-out examples for the eval loss.
        out_dir: where the training state, the log and the loss curve go (None: nowhere).
        save: writes the adapter into a directory; called with `out_dir` at each save.
        resume: continue from the training state in `out_dir`.
        on_step: called after every optimizer step.

    Returns:
        The run's losses and speed.

    Raises:
        InvalidParameterError: no examples, `resume` without a state or with another run's
            settings, or a state whose tensors do not fit.
    """
    if not examples:
        raise InvalidParameterError("there are no training examples")
    rank, world = _distributed()
    out = Path(out_dir) if out_dir is not None else None
    params = lora_parameters(modules)
    device = _device(model)
    total = total_steps(config, len(examples), world)
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, round(0.05 * total))
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    result = TrainResult()
    start_step = 0
    run = {"total_steps": total, "config": asdict(config), "examples": len(examples), "world": world}
    torch.manual_seed(config.seed + rank)
    if resume:
        if out is None:
            raise InvalidParameterError("resuming needs the output directory that holds the training state")
        start_step = _restore(out, params, optimizer, run, result)
    n_batches = len(length_batches(examples, config.batch_size, seed=config.seed, epoch=0))
    model.train()
    logger.info("training %d LoRA tensors (%d values) for %d steps from step %d", len(params),
                sum(p.numel() for p in params.values()), total, start_step)
    for step in range(start_step, total):
        began = time.perf_counter()
        lr = learning_rate(step, total, config.lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [_micro_batch(examples, config, n_batches, (step * config.grad_accum + i) * world + rank, pad_id)
                   for i in range(config.grad_accum)]
        n_tokens = sum(int((labels[:, 1:] != IGNORE).sum()) for _, labels, _ in batches)
        step_loss = 0.0
        for ids, labels, real in batches:
            loss, _ = completion_loss(model, ids.to(device), labels.to(device), checkpointing=config.checkpointing)
            (loss / max(n_tokens, 1)).backward()
            step_loss += float(loss.detach()) / max(n_tokens, 1)
            result.tokens += real
        if world > 1:
            _average_gradients(params.values(), world)
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.seconds += time.perf_counter() - began
        done = step + 1
        result.losses.append((done, step_loss))
        eval_loss = None
        if eval_examples and ((config.eval_every and done % config.eval_every == 0) or done == total):
            eval_loss = evaluate(model, eval_examples, config.batch_size, pad_id)
            result.eval_losses.append((done, eval_loss))
        if out is not None and rank == 0:
            _log(out, {"step": done, "loss": step_loss, "lr": lr} | ({} if eval_loss is None else {"eval_loss": eval_loss}))
            if (config.save_every and done % config.save_every == 0) or done == total:
                if save is not None:
                    save(out)
                _save(out, params, optimizer, run, done)
                plot_losses(out / LOSS_PLOT, result.losses, result.eval_losses)
        if on_step is not None:
            on_step(StepInfo(done, total, step_loss, lr, result.tokens_per_s, eval_loss))
    model.eval()
    return result


def _micro_batch(examples: Sequence[Example], config: TrainConfig, n_batches: int, index: int,
                 pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Micro-batch number `index` of the endless stream of epochs, and its tokens without padding."""
    epoch, position = divmod(index, n_batches)
    batch = [examples[i] for i in length_batches(examples, config.batch_size, seed=config.seed, epoch=epoch)[position]]
    return *collate(batch, pad_id), sum(len(e.input_ids) for e in batch)


def _save(out: Path, params: Mapping[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
          run: dict, step: int) -> None:
    tensors = {f"param.{n}": p for n, p in params.items()}
    for n, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"adamw.{key}.{n}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_state(out, tensors, run | {"step": step})


# What a saved run records besides its `TrainConfig`, in words.
_RUN_FACTS = {"total_steps": "steps in all", "examples": "training examples", "world": "processes"}


def _run_differences(saved: dict, run: dict) -> list[str]:
    """How the saved run differs from this one: settings by flag (and `TrainConfig` field), then the rest."""
    differences = []
    saved_config = saved.get("config") or {}
    for name, value in run["config"].items():
        if saved_config.get(name) != value:
            flag = "--no-checkpointing" if name == "checkpointing" else "--" + name.replace("_", "-")
            differences.append(f"{flag} ({name}) was {saved_config.get(name)!r}, now {value!r}")
    for key, what in _RUN_FACTS.items():
        if saved.get(key) != run[key]:
            differences.append(f"{what} were {saved.get(key)!r}, now {run[key]!r}")
    return differences


def _restore(out: Path, params: Mapping[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
             run: dict, result: TrainResult) -> int:
    tensors, info = load_state(out)
    differences = _run_differences(info, run)
    if differences:
        raise InvalidParameterError(
            f"--resume: the state in {str(out)!r} was saved by another run ({'; '.join(differences)}); resume with "
            "the same settings and data, or start afresh in another directory"
        )
    with torch.no_grad():
        for n, p in params.items():
            saved = tensors.get(f"param.{n}")
            if saved is None or saved.shape != p.shape:
                raise InvalidParameterError(f"--resume: the saved state has no tensor for {n} of shape {tuple(p.shape)}")
            p.copy_(saved)
            state = {key.split(".", 2)[1]: v.to(p.device) for key, v in tensors.items()
                     if key.startswith("adamw.") and key.split(".", 2)[2] == n}
            if state:
                state["step"] = state["step"].cpu()  # AdamW keeps its step count on the host
                optimizer.state[p] = state
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    step = int(info["step"])
    for row in _read_log(out):
        if row["step"] <= step:
            result.losses.append((row["step"], row["loss"]))
            if "eval_loss" in row:
                result.eval_losses.append((row["step"], row["eval_loss"]))
    _rewrite_log(out, step)
    logger.info("resuming from step %d of %d", step, run["total_steps"])
    return step


def _log(out: Path, row: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _read_log(out: Path) -> list[dict]:
    path = out / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _rewrite_log(out: Path, step: int) -> None:
    """Drop log rows past `step` (written after the state a resume starts from)."""
    from .files import atomic_write_text

    rows = [r for r in _read_log(out) if r["step"] <= step]
    atomic_write_text(out / LOG_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def _distributed() -> tuple[int, int]:
    """(rank, world size): torch.distributed's when torchrun started this process, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _average_gradients(params: Iterable[torch.nn.Parameter], world: int) -> None:
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def _device(model: torch.nn.Module) -> torch.device:
    return model.model.embed_tokens.weight.device
