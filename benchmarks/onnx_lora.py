"""The ONNX executor's per-row LoRA term, five ways, timed on this CPU in one run.

The serving export applies each row's adapter to every projection of every layer. Ways to write
that term in an ONNX graph, each built here for SmolLM2-135M's projections (30 layers x q, k, v,
o, gate, up, down) and timed alone, the LoRA term without the base model around it:

    gather      Gather each row's factors from the slot stacks, then a batched MatMul over the
                rows (Punica's BGMV as a graph: the factors are copied per row, B x r x (in + out)).
    grouped     rows sorted by slot; per slot a Slice of its rows, a MatMul by its factors, and a
                Concat back (each slot's factors read once; 3 nodes per slot per projection).
    masked      one Gemm of every row against every slot's A at once ([B, slots x r]), a per-row
                mask that zeroes the columns of the other slots, one MatMul by every slot's B (the
                factors read once per step whatever the batch, as dense GEMMs).
    masked16    masked, the factors stored in float16 and cast to float32 per projection (half
                the bytes read, a cast per projection).
    transposed  masked with the factors as the GEMMs' left operand ([slots x r, in] @ rows^T), so
                the GEMM reads them in place instead of packing them.

Rows mix the base (no adapter) and 4 slots of rank 16; batch 1 (a base row and an adapter row)
and 8 (two rows per slot) are each timed as the median of --runs runs, the variants
interleaved within each run. All give the same sums (checked before timing; float16 to its precision).

    python -P benchmarks/onnx_lora.py [--threads 2] [--runs 30]

Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

LAYERS, HIDDEN, INTER, KV = 30, 576, 1536, 192
MODULES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER), (INTER, HIDDEN)]
SLOTS, RANK = 4, 16


class Graph:
    def __init__(self) -> None:
        self.nodes, self.inputs, self.count = [], [], 0

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        self.count += 1
        out = f"t{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def input(self, name: str, dtype: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def model(self, sums: list[str]) -> bytes:
        outputs = [helper.make_tensor_value_info(s, TensorProto.FLOAT, None) for s in sums]
        graph = helper.make_graph(self.nodes, "lora", self.inputs, outputs)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def build(variant: str) -> bytes:
    g = Graph()
    xs = {k: g.input(f"x{k}", TensorProto.FLOAT, ["B", 1, k]) for k in (HIDDEN, INTER)}
    if variant == "gather":
        slots = g.input("slots", TensorProto.INT64, ["B"])  # stack entry per row, 0 = base
    elif variant == "grouped":
        bounds = g.input("bounds", TensorProto.INT64, [SLOTS + 2])  # row ranges per entry, rows sorted
        pieces = [(g.node("Slice", [bounds, g_const(g, [s]), g_const(g, [s + 1])]),
                   g.node("Slice", [bounds, g_const(g, [s + 1]), g_const(g, [s + 2])])) for s in range(SLOTS + 1)]
    elif variant in ("masked", "masked16"):
        mask = g.input("mask", TensorProto.FLOAT, ["B", 1, "columns"])
    else:
        mask_t = g.input("mask_t", TensorProto.FLOAT, ["columns", "B"])
    sums: dict[int, str] = {}
    for layer in range(LAYERS):
        for m, (k, n) in enumerate(MODULES):
            name = f"l{layer}.m{m}"
            x = xs[k]
            if variant == "gather":
                a = g.input(f"{name}.A", TensorProto.FLOAT, [SLOTS + 1, "rank", k])
                b = g.input(f"{name}.B", TensorProto.FLOAT, [SLOTS + 1, "rank", n])
                a_rows, b_rows = g.node("Gather", [a, slots], axis=0), g.node("Gather", [b, slots], axis=0)
                shrunk = g.node("Transpose", [g.node("MatMul", [a_rows, g.node("Transpose", [x], perm=[0, 2, 1])])],
                                perm=[0, 2, 1])
                y = g.node("MatMul", [shrunk, b_rows])
            elif variant == "grouped":
                a = g.input(f"{name}.A", TensorProto.FLOAT, [SLOTS + 1, "rank", k])
                b = g.input(f"{name}.B", TensorProto.FLOAT, [SLOTS + 1, "rank", n])
                parts = []
                for s, (start, end) in enumerate(pieces):
                    rows = g.node("Slice", [x, start, end, g_const(g, [0])])
                    if s == 0:  # base rows: no term
                        parts.append(g.node("Mul", [g.node("Slice", [rows, g_const(g, [0]), g_const(g, [1]), g_const(g, [2])]),
                                                    g_const(g, np.zeros(n, np.float32))]))
                        continue
                    a_s = g.node("Gather", [a, g_const(g, s)], axis=0)
                    b_s = g.node("Gather", [b, g_const(g, s)], axis=0)
                    parts.append(g.node("MatMul", [g.node("MatMul", [rows, g.node("Transpose", [a_s], perm=[1, 0])]), b_s]))
                y = g.node("Concat", parts, axis=0)
            elif variant == "masked":
                a = g.input(f"{name}.A", TensorProto.FLOAT, ["columns", k])
                b = g.input(f"{name}.B", TensorProto.FLOAT, ["columns", n])
                flat = g.node("Reshape", [x, g_const(g, [-1, k])])
                shrunk = g.node("Unsqueeze", [g.node("Gemm", [flat, a], transB=1), g_const(g, [1])])
                y = g.node("MatMul", [g.node("Mul", [shrunk, mask]), b])
            elif variant == "masked16":  # the factors stored in float16, cast per projection
                a = g.node("Cast", [g.input(f"{name}.A", TensorProto.FLOAT16, ["columns", k])], to=TensorProto.FLOAT)
                b = g.node("Cast", [g.input(f"{name}.B", TensorProto.FLOAT16, ["columns", n])], to=TensorProto.FLOAT)
                flat = g.node("Reshape", [x, g_const(g, [-1, k])])
                shrunk = g.node("Unsqueeze", [g.node("Gemm", [flat, a], transB=1), g_const(g, [1])])
                y = g.node("MatMul", [g.node("Mul", [shrunk, mask]), b])
            else:  # the factors as the GEMMs' left operand (read in place), the rows on the right
                a = g.input(f"{name}.A", TensorProto.FLOAT, ["columns", k])
                b = g.input(f"{name}.Bt", TensorProto.FLOAT, [n, "columns"])
                rows_t = g.node("Transpose", [g.node("Reshape", [x, g_const(g, [-1, k])])], perm=[1, 0])  # [k, B]
                shrunk_t = g.node("MatMul", [a, rows_t])  # [C, B]
                masked_t = g.node("Mul", [shrunk_t, mask_t])
                y = g.node("Unsqueeze", [g.node("Transpose", [g.node("MatMul", [b, masked_t])], perm=[1, 0]), g_const(g, [1])])
            sums[n] = y if n not in sums else g.node("Add", [sums[n], y])
    return g.model(list(sums.values()))


def g_const(g: Graph, value) -> str:
    array = np.asarray(value, dtype=np.float32 if isinstance(value, np.ndarray) and value.dtype == np.float32 else np.int64)
    return g.node("Constant", [], value=helper.make_tensor(f"c{g.count}", TensorProto.FLOAT if array.dtype == np.float32
                                                          else TensorProto.INT64, array.shape, array.flatten().tolist()))


def feeds(variant: str, entries: np.ndarray, factors: dict, xs: dict) -> dict:
    order = np.argsort(entries, kind="stable") if variant == "grouped" else np.arange(len(entries))
    out = {f"x{k}": x[order] for k, x in xs.items()}
    if variant == "gather":
        out["slots"] = entries
    elif variant == "grouped":
        out["bounds"] = np.concatenate([[0], np.cumsum(np.bincount(entries, minlength=SLOTS + 1))]).astype(np.int64)
    else:
        mask = np.zeros((len(entries), 1, SLOTS * RANK), np.float32)
        for row, e in enumerate(entries):
            if e:
                mask[row, 0, (e - 1) * RANK: e * RANK] = 1.0
        if variant in ("masked", "masked16"):
            out["mask"] = mask
        else:
            out["mask_t"] = np.ascontiguousarray(mask[:, 0].T)
    for name, (a, b) in factors.items():
        if variant in ("masked", "masked16"):
            out[f"{name}.A"], out[f"{name}.B"] = a[1:].reshape(-1, a.shape[-1]), b[1:].reshape(-1, b.shape[-1])
            if variant == "masked16":
                out[f"{name}.A"], out[f"{name}.B"] = out[f"{name}.A"].astype(np.float16), out[f"{name}.B"].astype(np.float16)
        elif variant == "transposed":
            out[f"{name}.A"], out[f"{name}.Bt"] = a[1:].reshape(-1, a.shape[-1]), np.ascontiguousarray(b[1:].reshape(-1, b.shape[-1]).T)
        else:
            out[f"{name}.A"], out[f"{name}.B"] = a, b
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    factors = {}
    for layer in range(LAYERS):
        for m, (k, n) in enumerate(MODULES):
            a = rng.standard_normal((SLOTS + 1, RANK, k), dtype=np.float32) * 0.05
            b = rng.standard_normal((SLOTS + 1, RANK, n), dtype=np.float32) * 0.05
            a[0] = b[0] = 0.0
            factors[f"l{layer}.m{m}"] = (a, b)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    variants = ("gather", "grouped", "masked", "masked16", "transposed")
    sessions = {v: ort.InferenceSession(build(v), options, providers=["CPUExecutionProvider"]) for v in variants}
    print(f"LoRA term of {LAYERS} layers x {len(MODULES)} projections, {SLOTS} slots of rank {RANK} + base, "
          f"{args.threads} threads; ms per step, median of {args.runs}")
    print(f"{'rows':<34}" + "".join(f"{v:>12}" for v in variants))
    for entries in (np.array([0]), np.array([3]), np.arange(8) % (SLOTS + 1)):
        xs = {k: rng.standard_normal((len(entries), 1, k), dtype=np.float32) for k in (HIDDEN, INTER)}
        runs = {v: feeds(v, entries, factors, xs) for v in variants}
        reference = None
        for v in variants:  # the same sums, rows back in their order
            out = sessions[v].run(None, runs[v])
            order = np.argsort(np.argsort(entries, kind="stable")) if v == "grouped" else np.arange(len(entries))
            out = [o[order] for o in out]
            if reference is None:
                reference = out
            assert all(np.allclose(o, r, atol=1e-4 if v != "masked16" else 1e-2) for o, r in zip(out, reference)), v
        times = {v: [] for v in variants}
        for _ in range(args.runs):
            for v in variants:
                t0 = time.perf_counter()
                sessions[v].run(None, runs[v])
                times[v].append(1000 * (time.perf_counter() - t0))
        label = f"{len(entries)} row(s), entries {entries.tolist()}"
        print(f"{label:<34}" + "".join(f"{statistics.median(times[v]):12.2f}" for v in variants))


if __name__ == "__main__":
    main()
