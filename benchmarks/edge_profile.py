"""Where a decode step's time goes: onnxruntime's profiler over decoder graphs, operator by operator.

Each directory is a `quadapt export-onnx` output or an onnxruntime-genai model (both take
`input_ids`, `attention_mask` and `past_key_values.{i}.key|value` and return `logits` and
`present.{i}.key|value`). For each, a 32-token prompt is fed, then `--steps` greedy decode
steps with the cache bound in place (past and present share one buffer, as both runtimes run
them), and the profiler's kernel time is summed per operator type, divided by the steps. The
output projection's MatMulNBits is reported on its own line. With `--runs N` every directory is
profiled N times, the directories taking turns (their order turned each run, so load on the
machine hits them alike), and each figure is the median of the N.

    python benchmarks/edge_profile.py DIR [DIR ...] [--steps 128] [--threads 2] [--runs 1]

It also prints the bytes of MatMulNBits weights (packed integers, scales, zero points, as the
graph stores them; onnxruntime repacks them at load) that one step reads, the layers' and the
output head's: at batch 1 a decode step streams all of them from memory, so they bound its speed.

Kernel times only: they leave out the thread pool's hand-offs and the Python around each run,
so compare them between graphs, and compare whole-run speed with `benchmarks/cpu_decode.py`.
Not a test: it prints a table per directory.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

PROMPT = 32


def _head_nodes(model_file: Path) -> set[str]:
    """Names of the nodes that read the output projection's weights."""
    graph = onnx.load(str(model_file), load_external_data=False).graph
    return {node.name for node in graph.node if any("lm_head" in i for i in node.input)}


def weight_bytes(model_file: Path) -> dict[str, int]:
    """Bytes of the MatMulNBits weights a decode step reads: {"layers": n, "output head": n}."""
    graph = onnx.load(str(model_file), load_external_data=False).graph
    sizes = {}
    for tensor in graph.initializer:
        external = {entry.key: entry.value for entry in tensor.external_data}
        if "length" in external:
            sizes[tensor.name] = int(external["length"])
        elif tensor.raw_data:
            sizes[tensor.name] = len(tensor.raw_data)
        else:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            sizes[tensor.name] = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    totals = {"layers": 0, "output head": 0}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            kind = "output head" if any("lm_head" in i for i in node.input) else "layers"
            totals[kind] += sum(sizes.get(i, 0) for i in node.input[1:])
    return totals


def profile(model_dir: Path, steps: int, threads: int) -> dict[str, float]:
    """Kernel milliseconds per decode step by operator type."""
    model_file = model_dir / "model.onnx"
    head = _head_nodes(model_file)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    # Both kinds of directory carry a genai_config.json; its decoder section sizes the cache.
    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    kv_heads, head_dim = decoder["num_key_value_heads"], decoder["head_size"]
    capacity = PROMPT + steps + 1
    binding = session.io_binding()
    caches = []
    for name in inputs:
        if name.startswith("past_key_values."):
            buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv_heads, capacity, head_dim), np.float32))
            binding.bind_ortvalue_input(name, buffer)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), buffer)
            caches.append(buffer)
    vocab = session.get_outputs()[0].shape[-1]
    logits = np.zeros((1, 1, vocab), np.float32)
    mask = np.ones((1, capacity), np.int64)
    if "num_logits_to_keep" in inputs:
        binding.bind_ortvalue_input("num_logits_to_keep", ort.OrtValue.ortvalue_from_numpy(np.array([1], np.int64)))

    def run(ids: np.ndarray, total: int) -> None:
        binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(ids))
        binding.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(mask[:, :total]))
        session.run_with_iobinding(binding)

    # The prompt: logits allocated by onnxruntime (a genai model returns every position's).
    binding.bind_output("logits", "cpu")
    run(np.arange(100, 100 + PROMPT, dtype=np.int64)[None], PROMPT)
    token = int(binding.get_outputs()[-1].numpy()[0, -1].argmax())  # outputs in binding order: logits last
    binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
    for step in range(steps):
        run(np.array([[token]], np.int64), PROMPT + step + 1)
        token = int(logits[0, -1].argmax())
    events = json.loads(Path(session.end_profiling()).read_text())
    kernel = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    # The prompt's run is the first of each node's events: drop each node's first.
    seen: set[str] = set()
    totals: collections.Counter[str] = collections.Counter()
    for event in kernel:
        node = event["name"].removesuffix("_kernel_time")
        if node not in seen:
            seen.add(node)
            continue
        op = event["args"].get("op_name", "?")
        totals[f"{op} (output head)" if node in head else op] += event["dur"] / 1000.0
    return {op: ms / steps for op, ms in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="exports or onnxruntime-genai model directories")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1, help="profiles of each directory; figures are their medians")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    runs: dict[Path, list[dict[str, float]]] = {d: [] for d in args.dirs}
    for run in range(args.runs):
        turn = run % len(args.dirs)
        for model_dir in args.dirs[turn:] + args.dirs[:turn]:
            runs[model_dir].append(profile(model_dir, args.steps, args.threads))
    for model_dir, profiles in runs.items():
        ops = {op for p in profiles for op in p}
        per_step = {op: statistics.median(p.get(op, 0.0) for p in profiles) for op in ops}
        total = statistics.median(sum(p.values()) for p in profiles)
        print(f"{model_dir}: {args.steps} decode steps after a {PROMPT}-token prompt, {args.threads} threads; "
              f"kernel ms per step (median of {len(profiles)}), {total:.3f} in all")
        for op, ms in sorted(per_step.items(), key=lambda kv: -kv[1]):
            if ms >= 0.005:
                print(f"  {op:40} {ms:7.3f}")
        read = weight_bytes(model_dir / "model.onnx")
        print("  MatMulNBits weights read per step, MB: " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in read.items())
              + f", in all {sum(read.values()) / 1e6:.1f}")


if __name__ == "__main__":
    main()
