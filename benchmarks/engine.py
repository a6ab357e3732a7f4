"""Aggregate decode speed of the batching engine beside peft's mixed-adapter batch, measured in one run.

On a checkpoint (SmolLM2-135M-Instruct int4 by default), for 1, 4, 8 and 16 concurrent requests
and 0, 1 and 4 distinct adapters (round robin over the requests; random rank-16 PEFT adapters on
every projection), greedy with eos ignored:

- quadapt: every request is added to the engine at once; decode tokens/s counts the tokens of
  the steps after every request has its first token, over those steps' time;
- peft: the same requests as one transformers `generate` batch through `PeftModel` with
  `adapter_names=` (its mixed-adapter batch) on the float checkpoint (fp32, as the engine's
  dequantized weights on CPU), decode tokens/s = B * (N - 1) / (time for N new tokens - time
  for 1), so the prefill cancels out.

Each figure is the median of `--runs` runs. `--cpu-contention` instead compares the engine on
the float and the quantized checkpoint at one request, alone and beside a competing CPU-bound
process, the two engines stepping in turn, and prints the slowdowns side by side with their ratio.

    python benchmarks/engine.py --model DIR [--float-model DIR] [--new-tokens 32] [--runs 3] [--threads 2]

With no --model it fetches the default model and converts it to int4 (RTN, group 64) in a
temporary directory. Needs the `dev` extra (transformers, peft). Not a test: it prints tables.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPT_WORDS = "the history of the lighthouse keeper and the long winter by the northern sea".split()


def make_prompts(tokenizer, n: int, length: int = 32) -> list[list[int]]:
    """`n` different prompts of exactly `length` tokens (so peft's batch needs no padding)."""
    prompts = []
    for i in range(n):
        words = PROMPT_WORDS[i % len(PROMPT_WORDS):] + PROMPT_WORDS
        ids = tokenizer.encode(" ".join(words * 4), add_special_tokens=False)
        prompts.append(ids[:length])
    return prompts


def make_adapters(model_dir: Path, out: Path, count: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i in range(count):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        path = out / f"adapter{i}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def quadapt_rate(model_dir: Path, adapters: list[Path], prompts, n_adapters: int, new_tokens: int, model=None) -> float:
    """Decode tokens/s of the engine on `prompts`, adapters round robin (none when n_adapters is 0)."""
    from quadapt.runtime.engine.engine import Engine, EngineConfig
    from quadapt.runtime.checkpoints.loader import load_model
    from quadapt.runtime.engine.sampling import SamplingParams

    config = EngineConfig(max_num_seqs=max(16, len(prompts)), max_num_batched_tokens=1024, max_loras=max(n_adapters, 1),
                          max_lora_rank=16)
    # Loaded as `build_engine` loads on CPU: packed weights dequantized once.
    engine = Engine.for_model(load_model(model_dir, dequantize=True), eos_token_ids=set(), config=config,
                              kv_cache_bytes=256 * 2**20)
    for i in range(n_adapters):
        engine.adapters.load(f"a{i}", adapters[i])
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, adapter=f"a{i % n_adapters}" if n_adapters else None)
    started: set[str] = set()
    decode_tokens, decode_time = 0, 0.0
    while engine.has_unfinished():
        all_started = len(started) == len(prompts)
        t0 = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - t0
        if all_started:
            decode_tokens += sum(len(o.new_token_ids) + (o.finish_reason == "stop") for o in outputs)
            decode_time += elapsed
        started.update(o.request_id for o in outputs)
    return decode_tokens / decode_time


def peft_rate(peft_model, prompts, n_adapters: int, new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    kwargs = {}
    if n_adapters:
        kwargs["adapter_names"] = [f"a{i % n_adapters}" for i in range(len(prompts))]
    else:
        kwargs["adapter_names"] = ["__base__"] * len(prompts)

    def timed(n: int) -> float:
        start = time.perf_counter()
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0, **kwargs)
        assert out.shape[1] - ids.shape[1] == n
        return time.perf_counter() - start

    timed(2)  # warm-up
    return len(prompts) * (new_tokens - 1) / (timed(new_tokens) - timed(1))


def load_peft(model_dir: Path, adapters: list[Path]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    return model.eval()


def default_models(work: Path) -> tuple[Path, Path]:
    from quadapt.converters.convert import convert_checkpoint
    from quadapt.converters.fetch import fetch_default

    float_dir = work / "smollm2"
    fetch_default(float_dir)
    return float_dir, convert_checkpoint(float_dir, work / "smollm2-int4", "int4", group_size=64)


def _burn(stop) -> None:
    """A competing CPU-bound process: plain Python arithmetic until told to stop."""
    x = 0
    while not stop.is_set():
        for i in range(100_000):
            x = (x + i * i) % 1_000_003


def reference_rate(model_dir: Path, prompt: list[int], new_tokens: int) -> float:
    """Decode tokens/s of the reference generator (which dequantizes a packed weight on every call)."""
    from quadapt.runtime.api.generate import generate_ids
    from quadapt.runtime.checkpoints.loader import load_model
    from quadapt.runtime.engine.sampling import SamplingParams

    model = load_model(model_dir)

    def timed(n: int) -> float:
        start = time.perf_counter()
        produced = sum(1 for _ in generate_ids(model, prompt, SamplingParams(max_new_tokens=n, temperature=0.0,
                                                                             ignore_eos=True), set()))
        assert produced == n
        return time.perf_counter() - start

    return (new_tokens - 1) / (timed(new_tokens) - timed(1))


def _engine(model_dir: Path):
    from quadapt.runtime.engine.engine import Engine, EngineConfig
    from quadapt.runtime.checkpoints.loader import load_model

    return Engine.for_model(load_model(model_dir, dequantize=True), eos_token_ids=set(), config=EngineConfig(max_loras=1),
                            kv_cache_bytes=64 * 2**20)


def alternate_decode(engines: dict[str, object], prompt: list[int], new_tokens: int) -> dict[str, tuple[int, float]]:
    """One request on each engine, their steps taken in turn (the order flipping every step), so
    that a slow or fast spell of the machine falls on every engine alike. Returns each engine's
    (decode tokens, decode seconds), counting the steps after its request's first token."""
    from quadapt.runtime.engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for engine in engines.values():
        engine.add_request(prompt, params)
    totals = {label: [0, 0.0] for label in engines}
    started = {label: False for label in engines}
    labels = list(engines)
    step = 0
    while any(e.has_unfinished() for e in engines.values()):
        for label in labels if step % 2 == 0 else reversed(labels):
            engine = engines[label]
            if not engine.has_unfinished():
                continue
            t0 = time.perf_counter()
            outputs = engine.step()
            elapsed = time.perf_counter() - t0
            if started[label]:
                totals[label][0] += sum(len(o.new_token_ids) for o in outputs)
                totals[label][1] += elapsed
            started[label] = started[label] or any(o.new_token_ids for o in outputs)
        step += 1
    return {label: (n, t) for label, (n, t) in totals.items()}


def contention(float_dir: Path, quant_dir: Path, new_tokens: int, runs: int, tokenizer) -> None:
    """Float against quantized at one request, alone and beside a process that burns one core.

    Both engines are loaded in this process and decode in turn, step by step
    (`alternate_decode`), `runs` requests each alone and `runs` beside the burner: each phase's
    speed ratio int4 / float is then measured under the same conditions for both, and the ratio
    of the two paths' slowdowns is the ratio of the two phases' speed ratios.
    """
    prompt = make_prompts(tokenizer, 1)[0]
    engines = {"engine, float": _engine(float_dir), "engine, int4": _engine(quant_dir)}
    alternate_decode(engines, prompt, 4)  # warm-up

    def phase() -> dict[str, float]:
        sums = {label: [0, 0.0] for label in engines}
        for _ in range(runs):
            for label, (n, t) in alternate_decode(engines, prompt, new_tokens).items():
                sums[label][0] += n
                sums[label][1] += t
        return {label: n / t for label, (n, t) in sums.items()}

    def reference() -> float:  # unpacks every weight on every call: slow enough to time once
        return reference_rate(quant_dir, prompt, min(new_tokens, 8))

    alone = phase()
    alone_ref = reference()
    stop = multiprocessing.Event()
    burner = multiprocessing.Process(target=_burn, args=(stop,), daemon=True)
    burner.start()
    try:
        time.sleep(0.2)  # let the burner take its core
        busy = phase()
        busy_ref = reference()
    finally:
        stop.set()
        burner.join()
    print(f"1 request, {new_tokens} new tokens, {runs} requests per path and phase, the two engines stepping in turn "
          f"(the reference generator: {min(new_tokens, 8)} tokens, once); alone, then beside a competing process "
          "that burns one core")
    print(f"{'path':<28} {'alone tok/s':>12} {'contended tok/s':>16} {'slowdown':>9}")
    rows = [*[(label, alone[label], busy[label]) for label in engines], ("reference generator, int4", alone_ref, busy_ref)]
    for label, a, b in rows:
        print(f"{label:<28} {a:>12.2f} {b:>16.2f} {a / b:>8.2f}x")
    f, q = "engine, float", "engine, int4"
    print(f"engine int4 / float decode speed: alone {alone[q] / alone[f]:.3f}x, contended {busy[q] / busy[f]:.3f}x; "
          f"int4 slowdown / float slowdown: {(alone[q] / busy[q]) / (alone[f] / busy[f]):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint the engine and peft run (default: SmolLM2 int4)")
    parser.add_argument("--float-model", type=Path, help="the float checkpoint (for --cpu-contention)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 4])
    parser.add_argument("--cpu-contention", action="store_true", help="float vs int4 under a competing process")
    parser.add_argument("--no-peft", action="store_true", help="skip peft's side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from quadapt.runtime.checkpoints import open_checkpoint
    from quadapt.runtime.text.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, float_dir = args.model, args.float_model
        if model_dir is None:
            float_dir, model_dir = default_models(work)
        tokenizer = Tokenizer.from_files(open_checkpoint(model_dir).tokenizer_files())
        if args.cpu_contention:
            if float_dir is None:
                parser.error("--cpu-contention needs --float-model beside --model")
            contention(float_dir, model_dir, args.new_tokens, args.runs, tokenizer)
            return
        adapters = make_adapters(float_dir or model_dir, work, max(args.adapters)) if max(args.adapters) else []
        # transformers runs a compressed-tensors checkpoint's linears as packed modules peft cannot
        # wrap; on CPU it would dequantize them anyway, so peft runs the float weights.
        peft_model = None if args.no_peft else load_peft(float_dir or model_dir, adapters)
        print(f"{model_dir.name}, greedy, 32-token prompts, {args.new_tokens} new tokens, {args.threads} threads, "
              f"median of {args.runs} runs; decode tokens/s, all requests together")
        print(f"{'requests':>8} {'adapters':>8} {'quadapt':>9} {'peft':>9} {'quadapt/peft':>13}")
        results: dict[tuple[int, int], float] = {}
        for n_adapters in args.adapters:
            for concurrency in args.concurrency:
                prompts = make_prompts(tokenizer, concurrency)
                ours = statistics.median(
                    quadapt_rate(model_dir, adapters, prompts, n_adapters, args.new_tokens) for _ in range(args.runs)
                )
                results[(concurrency, n_adapters)] = ours
                theirs = float("nan")
                if peft_model is not None:
                    with torch.inference_mode():
                        theirs = statistics.median(
                            peft_rate(peft_model, prompts, n_adapters, args.new_tokens) for _ in range(args.runs)
                        )
                print(f"{concurrency:>8} {n_adapters:>8} {ours:>9.1f} {theirs:>9.1f} {ours / theirs:>12.2f}x")
        if (1, 0) in results and (8, 0) in results:
            print(f"8 requests vs 1 (no adapters): {results[(8, 0)] / results[(1, 0)]:.2f}x (target >= 3x)")
        for c in args.concurrency:
            if (c, 0) in results and (c, 4) in results:
                print(f"{c} requests, 4 adapters vs none: time x{results[(c, 0)] / results[(c, 4)]:.2f} (target <= 1.25)")


if __name__ == "__main__":
    main()
