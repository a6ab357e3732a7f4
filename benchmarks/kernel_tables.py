"""Kernel speed on a CUDA device: fused dequant-matmul vs bf16 cuBLAS, and multi-adapter LoRA overhead.

For real-model shapes (N x K of a weight) at M = 1, 4, 16, 64, 256 it prints the Triton
`qmatmul` time for int4 (g128, symmetric and asymmetric), int8 and NF4 weights beside
`torch.matmul` on the dequantized bf16 weight, the achieved weight bandwidth beside the device's
copy bandwidth measured in the same run, and the relative error against the torch reference on
the same inputs. Then LoRA: a batch of 32 decode tokens through a 4096x4096 int4 layer with
rank-16 adapters, 1, 8 or 32 distinct, against no adapters.

`--cuda-graphs` times CUDA-graph replays instead of single calls, so the host's launch work is
not counted: each replay runs the op over 4 copies of the weights in turn (more bytes than the
L2 holds for the large shapes), and the time is divided by 4.

The weights are in the kernels' layout (`kernels/layout.py`), as a model loaded on Triton holds
them, and each call goes through the M dispatch (`kernels.matmul.qlinear`) with this GPU's tuned
configurations, or the defaults (`python -m quadapt.kernels.tune` regenerates them). `--quick`
times 8192x8192 at M = 1, 16, 256 and ends with the GPU targets, each met or not.

    python benchmarks/kernel_tables.py [--quick] [--cuda-graphs]

Needs a CUDA device and the `gpu` extra (triton). Not a test: it prints tables. Times are medians
of triton's `do_bench` (CUDA events, L2 flushed between runs).
"""

from __future__ import annotations

import argparse
import os

import torch

SHAPES = {  # name: (N, K), weight [N, K]
    "4096x4096": (4096, 4096),
    "4096x14336 (up)": (14336, 4096),
    "14336x4096 (down)": (4096, 14336),
    "8192x8192": (8192, 8192),
    "SmolLM2 576x1536 (up)": (1536, 576),
    "SmolLM2 1536x576 (down)": (576, 1536),
}
ROWS = (1, 4, 16, 64, 256)
FORMATS = ("int4", "int4-asym", "int8", "nf4")
MAX_REL_ERR = 1e-2  # bf16 operands, fp32 accumulation
ROTATE = 4  # weight copies a CUDA-graph replay cycles through


def bench(fn, reps: int = 50) -> float:
    """Median milliseconds of `fn` (triton's do_bench: warm-up, L2 flush, CUDA events)."""
    import triton.testing

    return triton.testing.do_bench(fn, rep=reps, return_mode="median")


def bench_graph(fns) -> float:
    """Median milliseconds of one call, from CUDA-graph replays of `fns` run in turn (no host launch cost)."""
    import triton.testing

    def run_all():
        for fn in fns:
            fn()

    return triton.testing.do_bench_cudagraph(run_all, rep=50, return_mode="median") / len(fns)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (read + write) of a 1 GiB buffer, in GB/s."""
    src = torch.randint(0, 256, (2**30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def weights(fmt: str, N: int, K: int):
    """Random weights of one format in the kernels' layout (as a model loaded on Triton holds them),
    and the bytes the kernel reads for them."""
    from quadapt.kernels.tune import random_weight

    w = random_weight(fmt, N, K, "cuda")
    nbytes = sum(t.numel() * t.element_size() for t in w.tensors().values())
    return w, nbytes


def qmatmul_fn(fmt: str, x: torch.Tensor, w, K: int, N: int, config=None):
    """A closure running the dispatched Triton matmul (`kernels.matmul.qlinear`) on (x, w)."""
    from quadapt.kernels.matmul import qlinear

    return lambda: qlinear(x, w, None, config=config)


def dequantized(fmt: str, w, K: int, N: int) -> torch.Tensor:
    """The bf16 weight [N, K] the torch reference decodes."""
    from quadapt.kernels import reference

    return reference.dequant_weight(w)


def relative_error(out: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> float:
    """||out - x @ W.T|| / ||x @ W.T||, the reference product in float64."""
    ref = x.double() @ dense.double().T
    return float((out.double() - ref).norm() / ref.norm())


def matmul_table(quick: bool, graphs: bool) -> dict:
    bw = copy_bandwidth_gbs()
    timing = "CUDA-graph replays" if graphs else "single calls"
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s (measured); timing {timing}")
    print(f"{'shape':<26}{'fmt':<10}{'M':>5}{'kernel us':>11}{'bf16 us':>10}{'speed-up':>10}{'GB/s':>8}"
          f"{'% copy':>8}{'rel err':>10}")
    shapes = {"8192x8192": SHAPES["8192x8192"]} if quick else SHAPES
    rows = (1, 16, 256) if quick else ROWS
    times: dict[tuple[str, str, int], tuple[float, float]] = {}  # (shape, fmt, M) -> (kernel ms, bf16 ms)
    failures = []
    for name, (N, K) in shapes.items():
        for fmt in FORMATS:
            copies = [weights(fmt, N, K) for _ in range(ROTATE if graphs else 1)]
            nbytes = copies[0][1]
            denses = [dequantized(fmt, c[0], K, N) for c in copies]
            for M in rows:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                runs = [qmatmul_fn(fmt, x, c[0], K, N) for c in copies]
                err = relative_error(runs[0](), x, denses[0])
                if not err < MAX_REL_ERR:
                    failures.append((name, fmt, M, err))
                dense_runs = [lambda x=x, d=d: x @ d.T for d in denses]
                if graphs:
                    ms, ms_dense = bench_graph(runs), bench_graph(dense_runs)
                else:
                    ms, ms_dense = bench(runs[0]), bench(dense_runs[0])
                times[name, fmt, M] = ms, ms_dense
                gbs = nbytes / ms / 1e6
                print(f"{name:<26}{fmt:<10}{M:>5}{ms * 1e3:>11.1f}{ms_dense * 1e3:>10.1f}"
                      f"{ms_dense / ms:>9.2f}x{gbs:>8.0f}{100 * gbs / bw:>7.0f}%{err:>10.1e}", flush=True)
    if failures:
        raise SystemExit(f"relative error above {MAX_REL_ERR:g}: {failures}")
    return times


def targets(times: dict, lora_overhead: dict[int, float]) -> None:
    """The GPU targets for 8192x8192, each with its figure and whether it is met."""
    t = {(fmt, M): v for (name, fmt, M), v in times.items() if name == "8192x8192"}
    checks = [
        ("int4 M=1 >= 2.3x faster than bf16", t["int4", 1][1] / t["int4", 1][0], ">=", 2.3),
        ("int4 M=16 within 1.25x of int4 M=1", t["int4", 16][0] / t["int4", 1][0], "<=", 1.25),
        ("int4 M=256 within 1.5x of bf16", t["int4", 256][0] / t["int4", 256][1], "<=", 1.5),
        ("int8 M=1 >= 1.6x faster than bf16", t["int8", 1][1] / t["int8", 1][0], ">=", 1.6),
        ("8 rank-16 adapters, 32 tokens: <= 20% over the base", lora_overhead[8], "<=", 0.20),
    ]
    print("\ntargets:")
    for label, value, op, bound in checks:
        met = value >= bound if op == ">=" else value <= bound
        print(f"  {label:<55} {value:6.2f}  {'met' if met else 'NOT met'}")


def lora_table(graphs: bool) -> dict[int, float]:
    from quadapt.kernels import lora as lora_kernel
    from quadapt.kernels.matmul import qlinear

    N = K = 4096
    w, _ = weights("int4", N, K)
    x = torch.randn(32, K, device="cuda", dtype=torch.bfloat16)
    timer = (lambda fn: bench_graph([fn])) if graphs else bench

    def layer():
        return qlinear(x, w, None)

    base = timer(layer)
    print(f"\nLoRA, batch of 32 tokens, 4096x4096 int4 layer, rank 16: base layer {base * 1e3:.1f} us")
    print(f"{'adapters':>9}{'layer+LoRA us':>15}{'overhead':>10}")
    overhead: dict[int, float] = {}
    for distinct in (1, 8, 32):
        a = torch.randn(distinct, 16, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(distinct, N, 16, device="cuda", dtype=torch.bfloat16)
        slots = torch.arange(32, device="cuda") % distinct

        def step(a=a, b=b, slots=slots):
            return lora_kernel.add_lora_(layer(), x, a, b, slots)  # the expand adds into the layer's output

        ms = timer(step)
        overhead[distinct] = ms / base - 1
        print(f"{distinct:>9}{ms * 1e3:>15.1f}{100 * (ms / base - 1):>9.0f}%")
    return overhead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--cuda-graphs", action="store_true", help="time CUDA-graph replays (no host launch cost)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernel_tables.py needs a CUDA device; the kernels' CPU checks are in tests/test_kernels.py")
    os.environ["QUADAPT_KERNELS"] = "triton"
    times = matmul_table(args.quick, args.cuda_graphs)
    overhead = lora_table(args.cuda_graphs)
    if args.quick:
        targets(times, overhead)


if __name__ == "__main__":
    main()
