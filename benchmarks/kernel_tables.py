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

`--sweep` times a grid of tilings (`kernels.qmatmul.Schedule`) per shape and row count instead,
and prints the default schedule's time beside the fastest one found.

    python benchmarks/kernel_tables.py [--quick] [--cuda-graphs] [--sweep]

Needs a CUDA device and the `gpu` extra (triton). Not a test: it prints tables. Times are medians
of triton's `do_bench` (CUDA events, L2 flushed between runs).
"""

from __future__ import annotations

import argparse
import itertools
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
    """Random packed weights of one format, and the bytes the kernel reads for them."""
    dev = "cuda"
    if fmt == "nf4":
        packed = torch.randint(0, 256, (N * K // 2,), dtype=torch.uint8, device=dev)
        absmax = torch.rand(N * K // 64, device=dev) + 0.1
        return (packed, absmax), packed.numel() + absmax.numel() * 4
    bits, group = (8, None) if fmt == "int8" else (4, 128)
    G = 1 if group is None else K // group
    packed = torch.randint(-(2**31), 2**31 - 1, (N, K * bits // 32), dtype=torch.int32, device=dev)
    scale = (torch.rand(N, G, device=dev) * 0.05 + 0.005).to(torch.bfloat16)
    zero = torch.randint(-8, 8, (N, G), dtype=torch.int8, device=dev) if fmt == "int4-asym" else None
    nbytes = packed.numel() * 4 + scale.numel() * 2 + (zero.numel() if zero is not None else 0)
    return (packed, scale, zero, bits), nbytes


def qmatmul_fn(fmt: str, x: torch.Tensor, w, K: int, N: int, schedule=None):
    """A closure running the Triton kernel on (x, w)."""
    from quadapt.kernels import qmatmul

    if fmt == "nf4":
        packed, absmax = w
        return lambda: qmatmul.qmatmul_nf4(
            x, packed, absmax, None, shape=(N, K), blocksize=64, dtype=torch.bfloat16, schedule=schedule
        )
    packed, scale, zero, bits = w
    return lambda: qmatmul.qmatmul_packed_int(
        x, packed, scale, zero, None, num_bits=bits, in_features=K, schedule=schedule
    )


def dequantized(fmt: str, w, K: int, N: int) -> torch.Tensor:
    """The bf16 weight [N, K] the torch reference decodes."""
    from quadapt.kernels import reference

    if fmt == "nf4":
        packed, absmax = w
        return reference.dequant_nf4(packed, absmax, shape=(N, K), blocksize=64, dtype=torch.bfloat16)
    packed, scale, zero, bits = w
    return reference.dequant_packed_int(packed, scale, zero, num_bits=bits, in_features=K)


def relative_error(out: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> float:
    """||out - x @ W.T|| / ||x @ W.T||, the reference product in float64."""
    ref = x.double() @ dense.double().T
    return float((out.double() - ref).norm() / ref.norm())


def matmul_table(quick: bool, graphs: bool) -> None:
    bw = copy_bandwidth_gbs()
    timing = "CUDA-graph replays" if graphs else "single calls"
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s (measured); timing {timing}")
    print(f"{'shape':<26}{'fmt':<10}{'M':>5}{'kernel us':>11}{'bf16 us':>10}{'speed-up':>10}{'GB/s':>8}"
          f"{'% copy':>8}{'rel err':>10}")
    shapes = {"8192x8192": SHAPES["8192x8192"]} if quick else SHAPES
    failures = []
    for name, (N, K) in shapes.items():
        for fmt in FORMATS:
            copies = [weights(fmt, N, K) for _ in range(ROTATE if graphs else 1)]
            nbytes = copies[0][1]
            denses = [dequantized(fmt, c[0], K, N) for c in copies]
            for M in ROWS:
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
                gbs = nbytes / ms / 1e6
                print(f"{name:<26}{fmt:<10}{M:>5}{ms * 1e3:>11.1f}{ms_dense * 1e3:>10.1f}"
                      f"{ms_dense / ms:>9.2f}x{gbs:>8.0f}{100 * gbs / bw:>7.0f}%{err:>10.1e}", flush=True)
    if failures:
        raise SystemExit(f"relative error above {MAX_REL_ERR:g}: {failures}")


def sweep_schedules(M: int):
    """The tilings tried for M rows: split-K GEMV shapes for decode, GEMM tiles above."""
    from quadapt.kernels.qmatmul import Schedule

    if M == 1:
        for bn, bk, split in itertools.product((16, 32, 64), (128, 256, 512), (1, 2, 4, 8)):
            yield Schedule(1, bn, bk, split)
    elif M <= 16:
        for bn, bk, split in itertools.product((32, 64, 128), (64, 128), (1, 4, 16)):
            yield Schedule(16, bn, bk, split)
    else:
        for bm, bn, bk, warps in itertools.product((64, 128), (64, 128), (32, 64), (4, 8)):
            yield Schedule(bm, bn, bk, 1, warps)


def sweep(quick: bool) -> None:
    """Time every schedule of `sweep_schedules` per shape, format and M; print the default and the best."""
    from quadapt.kernels.qmatmul import schedule_for

    shapes = ["4096x4096", "4096x14336 (up)", "14336x4096 (down)"]
    if quick:
        shapes = shapes[:1]
    print(f"\n{'shape':<26}{'fmt':<6}{'M':>5}{'default us':>12}{'best us':>10}{'gain':>7}  best schedule")
    for name, fmt, M in itertools.product(shapes, ("int4", "nf4"), (1, 16, 256)):
        if fmt == "nf4" and M > 16:
            continue  # the GEMM tiles share everything but the tile decoder; int4 decides them
        N, K = SHAPES[name]
        w, _ = weights(fmt, N, K)
        dense = dequantized(fmt, w, K, N)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        default = bench(qmatmul_fn(fmt, x, w, K, N), reps=25)
        best, best_schedule = float("inf"), None
        for schedule in sweep_schedules(M):
            run = qmatmul_fn(fmt, x, w, K, N, schedule)
            try:
                err = relative_error(run(), x, dense)
            except Exception as e:  # noqa: BLE001 (a tiling over the shared-memory limit fails to compile)
                print(f"  skipped {schedule}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            if not err < MAX_REL_ERR:
                raise SystemExit(f"{schedule} on {name} {fmt} M={M}: relative error {err:.2e}")
            ms = bench(run, reps=25)
            if ms < best:
                best, best_schedule = ms, schedule
        print(f"{name:<26}{fmt:<6}{M:>5}{default * 1e3:>12.1f}{best * 1e3:>10.1f}{default / best:>6.2f}x  "
              f"{best_schedule} (default {schedule_for(M, N, K, x.device)})", flush=True)


def lora_table(graphs: bool) -> None:
    from quadapt.kernels import lora as lora_kernel
    from quadapt.kernels import qmatmul

    N = K = 4096
    (packed, scale, zero, bits), _ = weights("int4", N, K)
    x = torch.randn(32, K, device="cuda", dtype=torch.bfloat16)
    timer = (lambda fn: bench_graph([fn])) if graphs else bench

    def layer():
        return qmatmul.qmatmul_packed_int(x, packed, scale, zero, None, num_bits=bits, in_features=K)

    base = timer(layer)
    print(f"\nLoRA, batch of 32 tokens, 4096x4096 int4 layer, rank 16: base layer {base * 1e3:.1f} us")
    print(f"{'adapters':>9}{'layer+LoRA us':>15}{'overhead':>10}")
    for distinct in (1, 8, 32):
        a = torch.randn(distinct, 16, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(distinct, N, 16, device="cuda", dtype=torch.bfloat16)
        slots = torch.arange(32, device="cuda") % distinct

        def step(a=a, b=b, slots=slots):
            return lora_kernel.add_lora(layer(), x, a, b, slots)

        ms = timer(step)
        print(f"{distinct:>9}{ms * 1e3:>15.1f}{100 * (ms / base - 1):>9.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--cuda-graphs", action="store_true", help="time CUDA-graph replays (no host launch cost)")
    parser.add_argument("--sweep", action="store_true", help="time a grid of tilings instead of the tables")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernel_tables.py needs a CUDA device; the kernels' CPU checks are in tests/test_kernels.py")
    os.environ["QUADAPT_KERNELS"] = "triton"
    if args.sweep:
        sweep(args.quick)
        return
    matmul_table(args.quick, args.cuda_graphs)
    lora_table(args.cuda_graphs)


if __name__ == "__main__":
    main()
