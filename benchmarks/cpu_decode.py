"""CPU decode and prefill speed of quadapt's edge runtime beside its peers, measured in one run.

Systems (SmolLM2-135M-Instruct, batch 1, greedy, eos ignored, the same thread count for all):

    quadapt edge int4   `quadapt export-onnx` of quadapt's int4 checkpoint (repacked bit for bit)
    quadapt edge int8   `quadapt export-onnx --bits 8` of the float checkpoint
    onnxruntime-genai   int4, built by its own model builder from the same float checkpoint
    llama.cpp           llama-cpp-python on the SmolLM2 GGUF (Q4_1) quadapt fetches
    transformers fp32   `generate` on the float checkpoint

Decode tokens/s = (N - 1) / (time for N new tokens - time for 1), so prefill cancels out; prefill
tokens/s = prompt tokens / time to the first new token of a 512-token prompt. Every figure is the
median of --runs runs, the systems interleaved within each run so that load on the machine hits
them alike. A peer that is not installed is reported as such, not measured. With --perplexity it
also prints the perplexity of the int4 export and of the torch runtime on the same checkpoint.

    python benchmarks/cpu_decode.py --int4 /tmp/bench/smollm2-int4 --float /tmp/bench/smollm2 \\
        [--work /tmp/cpu_decode] [--runs 3] [--threads 2] [--new-tokens 128] [--lm-head int8|int4] \\
        [--skip SYSTEM] [--perplexity]

Exports and the genai model are built under --work on first use. Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
CHAT = "<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"


class EdgeRunner:
    def __init__(self, export: Path, threads: int) -> None:
        from quadapt.runtime.edge.model import EdgeModel

        self.model = EdgeModel(export, threads=threads)

    def run(self, ids: list[int], n: int) -> float:
        from quadapt.runtime.edge.generate import generate_ids
        from quadapt.runtime.edge.sampling import SamplingParams

        start = time.perf_counter()
        produced = sum(1 for _ in generate_ids(self.model, ids, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True), set()))
        elapsed = time.perf_counter() - start
        assert produced == n, produced
        return elapsed


class GenaiRunner:
    def __init__(self, model_dir: Path, threads: int) -> None:
        import onnxruntime_genai as og

        config = og.Config(str(model_dir))
        config.clear_providers()
        self.og, self.model = og, og.Model(config)
        self.threads = threads

    def run(self, ids: list[int], n: int) -> float:
        og = self.og
        start = time.perf_counter()
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        generator = og.Generator(self.model, params)
        generator.append_tokens(ids)
        produced = 0
        while produced < n:
            generator.generate_next_token()
            produced += 1
        elapsed = time.perf_counter() - start
        return elapsed


class LlamaCppRunner:
    def __init__(self, gguf: Path, threads: int) -> None:
        from llama_cpp import Llama

        self.model = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)

    def run(self, ids: list[int], n: int) -> float:
        start = time.perf_counter()
        self.model.reset()
        for produced, _ in enumerate(self.model.generate(ids, top_k=1, temp=0.0, reset=True), start=1):
            if produced == n:
                break
        return time.perf_counter() - start


class TransformersRunner:
    def __init__(self, path: Path, threads: int) -> None:
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def run(self, ids: list[int], n: int) -> float:
        torch = self.torch
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - start
        assert out.shape[1] == len(ids) + n
        return elapsed


def build(args: argparse.Namespace) -> dict[str, Path | str]:
    """The models each system runs, built under --work when missing; a string says why a system is out."""
    from quadapt.converters.onnx_export import export_onnx

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models: dict[str, Path | str] = {}
    for name, source, bits in (("quadapt edge int4", args.int4, 4), ("quadapt edge int8", args.float, 8)):
        head = args.lm_head if bits == 4 else "int8"
        out = work / (f"edge-int{bits}" if head == "int8" else f"edge-int{bits}-{head}-head")
        if not (out / "quadapt_edge.json").exists():
            export_onnx(source, out, bits=bits, lm_head=head, overwrite=True)
        models[name] = out
    genai = work / "genai-int4"
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        models["onnxruntime-genai int4"] = "not installed (pip install 'quadapt[bench]')"
    else:
        if not (genai / "genai_config.json").exists():
            subprocess.run(
                [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(args.float), "-o", str(genai), "-p", "int4",
                 "-e", "cpu", "-c", str(work / "genai-cache")],
                check=True,
            )
        _set_genai_threads(genai, args.threads)
        models["onnxruntime-genai int4"] = genai
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        models["llama.cpp Q4_1"] = "not installed (pip install 'quadapt[bench]'; see docs/edge.md for the build flags)"
    else:
        from quadapt.converters.fetch import default_gguf

        models["llama.cpp Q4_1"] = default_gguf()
    models["transformers fp32"] = Path(args.float)
    return models


def _set_genai_threads(model_dir: Path, threads: int) -> None:
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"], options["inter_op_num_threads"] = threads, 1
    path.write_text(json.dumps(config, indent=2))


RUNNERS = {
    "quadapt edge int4": EdgeRunner, "quadapt edge int8": EdgeRunner, "onnxruntime-genai int4": GenaiRunner,
    "llama.cpp Q4_1": LlamaCppRunner, "transformers fp32": TransformersRunner,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--int4", type=Path, required=True, help="quadapt's int4 checkpoint")
    parser.add_argument("--float", type=Path, required=True, help="the float HF checkpoint")
    parser.add_argument("--work", default="/tmp/cpu_decode", help="where exports and the genai model are built")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--lm-head", choices=("int8", "int4"), default="int8", help="lm_head of the int4 export")
    parser.add_argument("--skip", action="append", default=[], help="a system to leave out (repeatable)")
    parser.add_argument("--perplexity", action="store_true", help="also compare perplexity: int4 export vs torch runtime")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from quadapt.runtime.text.tokenizer import Tokenizer

    models = build(args)
    tokenizer = Tokenizer.from_dir(models["quadapt edge int4"])
    chat = tokenizer.encode(CHAT, add_special_tokens=False)
    long_prompt = tokenizer.encode((DATA / "coriolanus_eval.txt").read_text())[: args.prefill_tokens]
    assert len(long_prompt) == args.prefill_tokens, len(long_prompt)

    runners, skipped = {}, {}
    for name, model in models.items():
        if name in args.skip:
            skipped[name] = "skipped (--skip)"
        elif isinstance(model, str):
            skipped[name] = model
        else:
            runners[name] = RUNNERS[name](model, args.threads)
            runners[name].run(chat, 4)  # warm-up
    decode: dict[str, list[float]] = {name: [] for name in runners}
    prefill: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(args.runs):
        # The order turns each run: a system's place in it moved its decode speed by several
        # percent here, so a fixed order would favour one system every time.
        for name in names[r % len(names):] + names[:r % len(names)]:
            runner = runners[name]
            one, many = runner.run(chat, 1), runner.run(chat, args.new_tokens)
            decode[name].append((args.new_tokens - 1) / (many - one))
            prefill[name].append(len(long_prompt) / runner.run(long_prompt, 1))

    print(f"SmolLM2-135M-Instruct, batch 1, greedy, {args.threads} threads, medians of {args.runs} runs")
    print(f"{'system':24} {'decode tok/s':>13} {'prefill tok/s':>14}")
    med = {name: (statistics.median(decode[name]), statistics.median(prefill[name])) for name in runners}
    for name, (d, p) in med.items():
        print(f"{name:24} {d:13.1f} {p:14.1f}")
    for name, why in skipped.items():
        print(f"{name:24} {why}")
    ours = med.get("quadapt edge int4")
    if ours:
        for name, (d, p) in med.items():
            if name != "quadapt edge int4":
                # Beside the ratio of medians, the median of the runs' own ratios: a run's two
                # figures come from the same minutes of the machine.
                paired = statistics.median(a / b for a, b in zip(decode["quadapt edge int4"], decode[name]))
                print(f"quadapt edge int4 / {name}: decode {ours[0] / d:.2f}x (run by run: median {paired:.2f}x), "
                      f"prefill {ours[1] / p:.2f}x")
    if args.perplexity:
        print_perplexity(args, models["quadapt edge int4"], tokenizer)


def print_perplexity(args: argparse.Namespace, export: Path, tokenizer) -> None:
    """Perplexity on coriolanus_eval.txt of the int4 export and of the torch runtime on its checkpoint."""
    import torch
    from quadapt.runtime.edge.perplexity import perplexity as edge_perplexity
    from quadapt.runtime.checkpoints.loader import load_model
    from quadapt.runtime.api.perplexity import perplexity

    torch.set_num_threads(args.threads)
    ids = tokenizer.encode((DATA / "coriolanus_eval.txt").read_text())
    ours = perplexity(load_model(args.int4), ids).perplexity
    edge = edge_perplexity(runners_model(export, args.threads), ids)
    print(f"perplexity on coriolanus_eval.txt ({len(ids)} tokens, window 1024): torch runtime {ours:.4f}, "
          f"edge int4 export {edge:.4f} ({100 * (edge / ours - 1):+.2f}%)")


def runners_model(export: Path, threads: int):
    from quadapt.runtime.edge.model import EdgeModel

    return EdgeModel(export, threads=threads)


if __name__ == "__main__":
    main()
