"""`quadapt generate` on a quantized checkpoint against the float one, as a user runs it.

Each run is one `quadapt generate` subprocess: the same prompt, greedy, `--new-tokens` new
tokens with eos ignored. Its decode speed is the tokens after the first over the time between
the first and the last text it printed (so loading and the prompt's prefill cancel out); its
wall time is the whole command's. The float and the quantized checkpoint alternate (float first
in odd rounds, quantized first in even ones) so both see the same machine, and each figure is
the median of `--runs` runs. Then the same beside a CPU-bound process this script starts (one
core burnt in a busy loop), and the ratio quantized / float side by side:

    python benchmarks/generate.py --float-model DIR --model DIR [--new-tokens 32] [--runs 5] [--threads N]

Build the two checkpoints as the README says (`quadapt fetch-default --out smollm2`, then
`quadapt convert --model smollm2 --out smollm2-int4 --scheme int4 --group-size 32`). Not a
test: it prints a table.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The history of the lighthouse keeper and the long winter by the northern sea"


def quadapt_command() -> list[str]:
    """How to run `quadapt`: the console script beside this interpreter, else `python -m quadapt.cli`."""
    script = Path(sys.executable).with_name("quadapt")
    if script.exists():
        return [str(script)]
    found = shutil.which("quadapt")
    return [found] if found else [sys.executable, "-m", "quadapt.cli"]


def run_once(model: Path, new_tokens: int, threads: int | None) -> tuple[float, float]:
    """One `quadapt generate`: (decode tokens/s, wall seconds)."""
    argv = [*quadapt_command(), "generate", "--model", str(model), "--prompt", PROMPT,
            "--max-new-tokens", str(new_tokens), "--ignore-eos"]
    if threads is not None:
        argv += ["--threads", str(threads)]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
    assert proc.stdout is not None
    first = last = None
    while os.read(proc.stdout.fileno(), 4096):
        now = time.perf_counter()
        first = now if first is None else first
        last = now
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0 or first is None or last is None or last == first:
        raise SystemExit(f"quadapt generate on {model} failed or printed too little (exit {proc.returncode}):\n"
                         f"{err.decode(errors='replace')[-2000:]}")
    # The first text comes with the first token; each later one adds at least one token.
    return (new_tokens - 1) / (last - first), wall


def _burn(stop) -> None:
    while not stop.is_set():
        pass


def measure(float_dir: Path, quant_dir: Path, new_tokens: int, runs: int, threads: int | None) -> dict[str, list]:
    """`runs` rounds, the two checkpoints in alternating order: their (tok/s, wall) lists."""
    got: dict[str, list] = {"float": [], "quant": []}
    for i in range(runs):
        order = [("float", float_dir), ("quant", quant_dir)]
        for name, path in order if i % 2 == 0 else order[::-1]:
            got[name].append(run_once(path, new_tokens, threads))
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float-model", type=Path, required=True, help="the float checkpoint")
    parser.add_argument("--model", type=Path, required=True, help="the quantized checkpoint")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="pass --threads N (default: quadapt's)")
    args = parser.parse_args()

    settings = {}
    settings["alone"] = measure(args.float_model, args.model, args.new_tokens, args.runs, args.threads)
    stop = multiprocessing.Event()
    burner = multiprocessing.Process(target=_burn, args=(stop,), daemon=True)
    burner.start()
    try:
        time.sleep(0.2)  # let the burner take its core
        settings["beside a busy process"] = measure(args.float_model, args.model, args.new_tokens, args.runs,
                                                    args.threads)
    finally:
        stop.set()
        burner.join()

    print(f"quadapt generate, {args.new_tokens} new tokens, greedy, median of {args.runs} runs "
          f"(threads: {args.threads or 'default'}; {os.cpu_count()} cores)")
    print(f"{'setting':<24}{'float tok/s':>12}{'quant tok/s':>12}{'quant/float':>12}{'float wall s':>14}"
          f"{'quant wall s':>14}")
    for setting, got in settings.items():
        rate = {k: statistics.median(r for r, _ in v) for k, v in got.items()}
        wall = {k: statistics.median(w for _, w in v) for k, v in got.items()}
        print(f"{setting:<24}{rate['float']:>12.2f}{rate['quant']:>12.2f}{rate['quant'] / rate['float']:>11.2f}x"
              f"{wall['float']:>14.1f}{wall['quant']:>14.1f}")
    print("each run's decode tok/s, float | quant (the spread says how busy the machine was):")
    for setting, got in settings.items():
        runs = {k: " ".join(f"{r:.2f}" for r, _ in v) for k, v in got.items()}
        print(f"  {setting}: {runs['float']} | {runs['quant']}")


if __name__ == "__main__":
    main()
