"""QLoRA training speed on CPU: quadapt's loop on the NF4 base beside the same loop through peft +
transformers on the float weights, measured interleaved in one run.

Both sides train the same LoRA (rank, alpha, targets, dropout 0) with AdamW, gradient
checkpointing and clipping, on the same batches: `--batch-size` rows of `--length` tokens, the
first half of each row prompt (label -100), the second half completion. One step is forward,
backward, clip, optimizer step; tokens/s counts every input token of the step (prompt and
completion). Each round times `--steps` steps of quadapt, then `--steps` of peft (after one
untimed warm-up step each); the figure is the median over `--rounds` rounds.

- quadapt: `quadapt.train` on the float checkpoint quantized in memory to NF4 (as `quadapt
  train --model FLOAT` does), its CPU default: a dense float copy of the 4-bit weights beside the
  packed ones, and the output head run on completion positions only;
- peft: `get_peft_model(LlamaForCausalLM)` on the float checkpoint, fp32, with
  `gradient_checkpointing_enable()` and the loss from `model(input_ids, labels=labels)`.

    python benchmarks/train.py --model FLOAT_DIR [--batch-size 4] [--length 128] [--steps 3] [--rounds 3] [--threads 2]

Needs the `dev` extra (transformers, peft). Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_batch(vocab: int, batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (batch, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100
    return ids, labels


def quadapt_side(model_dir: str, rank: int, alpha: float):
    from quadapt.runtime.checkpoints.loader import load_model
    from quadapt.train.command import quantize_in_memory
    from quadapt.train.forward import completion_loss
    from quadapt.train.lora import add_lora, lora_parameters

    model = load_model(model_dir)
    quantize_in_memory(model, "nf4")
    modules = add_lora(model, TARGETS, rank=rank, alpha=alpha)
    for m in modules.values():
        m.keep_dense_copy(torch.float32)
    params = list(lora_parameters(modules).values())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step(ids, labels):
        loss, n = completion_loss(model, ids, labels, checkpointing=True)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model.config.vocab_size


def peft_side(model_dir: str, rank: int, alpha: float):
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step(ids, labels):
        model(input_ids=ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step, batch, steps: int) -> float:
    """Tokens/s of `steps` steps on `batch`."""
    ids, labels = batch
    start = time.perf_counter()
    for _ in range(steps):
        step(ids, labels)
    return steps * ids.numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="float HF checkpoint directory (SmolLM2-135M-Instruct)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours, vocab = quadapt_side(args.model, args.rank, args.alpha)
    theirs = peft_side(args.model, args.rank, args.alpha)
    batch = make_batch(vocab, args.batch_size, args.length)
    for step in (ours, theirs):  # warm-up: allocations, first-call paths
        step(*batch)
    rates: dict[str, list[float]] = {"quadapt": [], "peft": []}
    for r in range(args.rounds):
        rates["quadapt"].append(timed(ours, batch, args.steps))
        rates["peft"].append(timed(theirs, batch, args.steps))
        print(f"round {r + 1}: quadapt {rates['quadapt'][-1]:.1f} tok/s, peft {rates['peft'][-1]:.1f} tok/s", flush=True)
    q, p = statistics.median(rates["quadapt"]), statistics.median(rates["peft"])
    print(f"\nSmolLM2 LoRA r={args.rank} on {', '.join(TARGETS)}; batch {args.batch_size} x {args.length} tokens; "
          f"{args.threads} threads; median of {args.rounds} rounds x {args.steps} steps")
    print("| system | base weights | training tokens/s |")
    print("|---|---|---|")
    print(f"| quadapt train | NF4 (dense fp32 copy for compute) | {q:.1f} |")
    print(f"| peft + transformers | fp32 | {p:.1f} |")
    print(f"quadapt / peft: {q / p:.2f}x")


if __name__ == "__main__":
    main()
