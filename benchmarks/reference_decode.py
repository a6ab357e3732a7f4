"""Decode speed of quadapt's reference generator beside transformers' `generate`, measured in one run.

Both run SmolLM2-135M-Instruct from the same GGUF (dequantized to fp32), greedy, batch 1, on the
same prompt, with eos ignored so each produces exactly the tokens asked for. Decode tokens/s is
measured as (N - 1) / (time for N new tokens - time for 1 new token), so the prompt's prefill
cancels out; each figure is the median of several runs.

    python benchmarks/reference_decode.py [--new-tokens 128] [--runs 5] [--threads 2]

Needs the `dev` extra (transformers). Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PROMPT = "<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"


def time_quadapt(model, prompt_ids: list[int], n: int) -> float:
    from quadapt.runtime.api.generate import generate_ids
    from quadapt.runtime.engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    produced = sum(1 for _ in generate_ids(model, prompt_ids, params, eos_token_ids=set()))
    elapsed = time.perf_counter() - start
    assert produced == n, f"quadapt produced {produced} tokens, asked for {n}"
    return elapsed


def time_transformers(model, prompt_ids: list[int], n: int) -> float:
    ids = torch.tensor([prompt_ids])
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - ids.shape[1] == n
    return elapsed


def decode_rate(timer, model, prompt_ids: list[int], n: int, runs: int) -> tuple[float, float]:
    """Median decode tokens/s and median prefill+first-token seconds over `runs` runs."""
    timer(model, prompt_ids, 2)  # warm-up
    rates, firsts = [], []
    for _ in range(runs):
        first = timer(model, prompt_ids, 1)
        full = timer(model, prompt_ids, n)
        rates.append((n - 1) / (full - first))
        firsts.append(first)
    return statistics.median(rates), statistics.median(firsts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from quadapt.converters.fetch import default_gguf
    from quadapt.runtime.checkpoints.gguf import GGUFCheckpoint
    from quadapt.runtime.checkpoints.loader import load_model
    from quadapt.runtime.text.tokenizer import Tokenizer

    gguf = default_gguf()
    reader = GGUFCheckpoint(gguf)
    tokenizer = Tokenizer.from_files(reader.tokenizer_files())
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    ours = load_model(reader)
    theirs = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()

    rows = []
    with torch.inference_mode():
        for name, timer, model in (
            ("transformers generate (fp32)", time_transformers, theirs),
            ("quadapt reference generate (fp32)", time_quadapt, ours),
        ):
            rate, first = decode_rate(timer, model, prompt_ids, args.new_tokens, args.runs)
            rows.append((name, rate, first))

    base = rows[0][1]
    print(f"SmolLM2-135M-Instruct, greedy, batch 1, prompt {len(prompt_ids)} tokens, "
          f"{args.new_tokens} new tokens, {args.threads} threads, median of {args.runs} runs")
    print(f"{'path':<36} {'decode tok/s':>12} {'vs transformers':>16} {'first token s':>14}")
    for name, rate, first in rows:
        print(f"{name:<36} {rate:>12.1f} {rate / base:>15.2f}x {first:>14.3f}")


if __name__ == "__main__":
    main()
