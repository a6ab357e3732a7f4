"""The engine's ONNX executor beside the torch executor and the edge runtime, in one run: speed and memory.

On a packed int4 checkpoint (SmolLM2-135M-Instruct int4 by default) with four random PEFT adapters
of different ranks and targets, as users' adapters are (rank 4 on q/v, rank 8 on the MLP, rank 16
and rank 16 on all seven projections), greedy with eos ignored, 32-token prompts:

- single stream: `run-onnx`'s runtime (`EdgeModel`, an `export-onnx` export with the same
  settings as the engine's: int8 compute, int8 head) against the engine on the ONNX executor,
  decode tokens/s after the first token; and the engine's one stream on a rank-16 adapter;
- 8 concurrent streams over the 4 adapters, and the same 8 on the base model alone: the engine's
  aggregate decode tokens/s (the steps after every request has its first token) on each executor;
- peak RSS (VmHWM, Linux) of a process that builds the engine with the 4 adapters and serves the 8 streams,
  per executor (each in a fresh subprocess; the ONNX export is built first, so it is cached).

    python benchmarks/onnx_executor.py --model DIR --float-model DIR [--new-tokens 32] [--threads 2] [--repeats 3]

Each speed figure is the median of --repeats rounds, the measures of one executor interleaved in
each round.

`--float-model` is the float checkpoint the adapters are made on (peft needs transformers' model).
Not a test: it prints a table. Run it from /tmp (the repository's `kernels/` folder shadows
another package otherwise), with quadapt importable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This folder's kernels.py would shadow the `kernels` package transformers imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

PROMPT = "the history of the lighthouse keeper and the long winter by the northern sea ".split()
ADAPTERS = [(4, ["q_proj", "v_proj"]), (8, ["gate_proj", "up_proj", "down_proj"]),
            (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
            (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])]


def make_adapters(float_model: Path, out: Path) -> dict[str, str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for i, (rank, targets) in enumerate(ADAPTERS):
        base = AutoModelForCausalLM.from_pretrained(float_model, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        model.save_pretrained(out / f"a{i}")
        paths[f"a{i}"] = str(out / f"a{i}")
    return paths


def prompts(tokenizer, n: int, length: int = 32) -> list[list[int]]:
    out = []
    for i in range(n):
        ids = tokenizer.encode(" ".join((PROMPT[i % len(PROMPT):] + PROMPT) * 4))
        out.append(ids[:length])
    return out


def engine_rate(engine, batch: list[list[int]], names: list[str | None], new_tokens: int) -> float:
    """Aggregate decode tokens/s over the steps after every request has its first token."""
    from quadapt.runtime.engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for prompt, name in zip(batch, names):
        engine.add_request(prompt, params, adapter=name)
    started: set[str] = set()
    tokens, elapsed = 0, 0.0
    while engine.has_unfinished():
        ready = len(started) == len(batch)
        t0 = time.perf_counter()
        outputs = engine.step()
        if ready:
            elapsed += time.perf_counter() - t0
            tokens += sum(len(o.new_token_ids) for o in outputs)
        started.update(o.request_id for o in outputs)
    return tokens / elapsed


def edge_rate(export: Path, prompt: list[int], new_tokens: int, threads: int) -> float:
    import numpy as np

    from quadapt.runtime.edge.model import EdgeModel

    seq = EdgeModel(export, threads=threads).start(prompt, len(prompt) + new_tokens)
    token = int(np.argmax(seq.logits))
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = int(np.argmax(seq.step(token)))
    return (new_tokens - 1) / (time.perf_counter() - t0)


def interleaved(measures: dict, repeats: int) -> list[tuple[str, float]]:
    """Each measure's median over `repeats` rounds, every round running each measure once in turn
    (so load on the machine hits them alike)."""
    runs: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            runs[name].append(measure())
    return [(name, statistics.median(values)) for name, values in runs.items()]


def build(model: str, adapters: dict[str, str], executor: str, threads: int):
    import quadapt
    from quadapt.runtime.engine.args import EngineArgs, build_engine

    quadapt._register_serving_exporter()
    args = EngineArgs(model=model, adapters=adapters, executor=executor, threads=threads, max_num_seqs=16,
                      max_num_batched_tokens=512, kv_cache_bytes=64 * 2**20)
    return build_engine(args)


def rss_child(model: str, adapters: dict[str, str], executor: str, threads: int, new_tokens: int) -> None:
    engine, tokenizer, _ = build(model, adapters, executor, threads)
    names = [f"a{i % 4}" for i in range(8)]
    engine_rate(engine, prompts(tokenizer, 8), names, new_tokens)
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--float-model", required=True)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per speed figure; each is the median (default 3)")
    parser.add_argument("--rss-child", choices=["torch", "onnx"], help=argparse.SUPPRESS)
    parser.add_argument("--adapters-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.model, json.loads(args.adapters_json), args.rss_child, args.threads, args.new_tokens)
        return

    from quadapt.converters.onnx_export import export_onnx

    work = Path(tempfile.mkdtemp(prefix="onnx-executor-bench-"))
    adapters = make_adapters(Path(args.float_model), work)
    onnx, tokenizer, _ = build(args.model, adapters, "onnx", args.threads)  # builds (or finds) the cached export
    edge = export_onnx(args.model, work / "edge")
    single, batch = prompts(tokenizer, 1), prompts(tokenizer, 8)
    mixed = [f"a{i % 4}" for i in range(8)]
    onnx_rows = {
        "single stream, run-onnx (edge runtime)": lambda: edge_rate(edge, single[0], args.new_tokens, args.threads),
        "single stream, engine on onnx": lambda: engine_rate(onnx, single, [None], args.new_tokens),
        "single stream, adapter a3, onnx": lambda: engine_rate(onnx, single, ["a3"], args.new_tokens),
        "8 streams, 4 adapters, onnx": lambda: engine_rate(onnx, batch, mixed, args.new_tokens),
        "8 streams, base only, onnx": lambda: engine_rate(onnx, batch, [None] * 8, args.new_tokens),
    }
    rows = interleaved(onnx_rows, args.repeats)
    del onnx
    torch_engine, _, _ = build(args.model, adapters, "torch", args.threads)
    rows += interleaved({
        "8 streams, 4 adapters, torch": lambda: engine_rate(torch_engine, batch, mixed, args.new_tokens),
        "8 streams, base only, torch": lambda: engine_rate(torch_engine, batch, [None] * 8, args.new_tokens),
    }, args.repeats)
    del torch_engine
    rss = {}
    for executor in ("onnx", "torch"):
        done = subprocess.run(
            [sys.executable, __file__, "--model", args.model, "--float-model", args.float_model, "--threads",
             str(args.threads), "--new-tokens", str(args.new_tokens), "--rss-child", executor, "--adapters-json",
             json.dumps(adapters)], capture_output=True, text=True, check=True,
        )
        rss[executor] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    rates = dict(rows)
    print(f"decode tok/s, {args.new_tokens} new tokens, greedy, {args.threads} threads, median of {args.repeats}")
    for name, rate in rows:
        print(f"  {name:<42} {rate:8.2f}")
    print("ratios")
    print(f"  engine single / run-onnx                   {rates['single stream, engine on onnx'] / rates['single stream, run-onnx (edge runtime)']:.2f}x")
    print(f"  onnx 8 mixed / onnx single                 {rates['8 streams, 4 adapters, onnx'] / rates['single stream, engine on onnx']:.2f}x")
    print(f"  onnx 8 mixed / onnx single with an adapter {rates['8 streams, 4 adapters, onnx'] / rates['single stream, adapter a3, onnx']:.2f}x")
    print(f"  onnx 8 mixed / torch 8 mixed               {rates['8 streams, 4 adapters, onnx'] / rates['8 streams, 4 adapters, torch']:.2f}x")
    print(f"  onnx time, mixed / base only               {rates['8 streams, base only, onnx'] / rates['8 streams, 4 adapters, onnx']:.2f}x")
    print(f"  torch time, mixed / base only              {rates['8 streams, base only, torch'] / rates['8 streams, 4 adapters, torch']:.2f}x")
    print(f"peak RSS MB, 4 adapters, 8 streams: onnx {rss['onnx']:.0f}, torch {rss['torch']:.0f}, "
          f"ratio {rss['onnx'] / rss['torch']:.2f}x")


if __name__ == "__main__":
    main()
