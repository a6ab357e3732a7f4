"""Regenerate this GPU's tuned table of `kernels.matmul` configurations (`kernels/tuned/<gpu>.json`).

    python -m quadapt.kernels.tune [--shapes 4096x4096 14336x4096 ...] [--rows 1 4 16 64 256]
                                   [--formats int4 int4-asym int8 nf4] [--out DIR]

For every weight shape (N x K), format and row count it times each candidate of `candidates`
as CUDA-graph replays (no host launch cost, as the engine replays its decode step), checks each
against the float64 product, and keeps the fastest; the table for this GPU is merged with the
entries already there and written atomically. Run it on the GPU it is for, never while serving:
the kernels only read the tables, and fall back to `tuning.default_config` where they hold no entry.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
from pathlib import Path

import torch

from . import layout
from .tuning import TUNED_DIR, Config, default_config, gpu_slug, load_tables, multiprocessors, table_json, tuning_key

DEFAULT_SHAPES = ("4096x4096", "14336x4096", "4096x14336", "8192x8192")
MAX_REL_ERR = 1e-2  # bf16 operands, fp32 accumulation


def candidates(M: int, N: int, K: int, sms: int) -> list[Config]:
    """The short list tried for M rows: the default first, then GEMV, split-K dot or dequant tilings."""
    out = [default_config(M, N, K, sms)]
    if M <= 4:
        block_m = 1 << (M - 1).bit_length()
        for bn, bk, warps in itertools.product((64, 128, 256), (16, 32, 64), (2, 4)):
            tiles = -(-N // bn)
            for split in {max(1, -(-2 * sms // tiles)), max(1, -(-4 * sms // tiles))}:
                out.append(Config("gemv", block_m, bn, bk, split, warps))
    if 4 < M <= 256:
        for bm, bn, bk in itertools.product((16, 32, 64), (32, 64, 128), (32, 64)):
            if bm >= 2 * M and bm > 16:
                continue
            tiles = -(-M // bm) * -(-N // bn)
            out.append(Config("dot", bm, bn, bk, max(1, min(-(-2 * sms // tiles), 16)), 4, 3))
    if M >= 16:
        out.append(Config("dequant"))
    return list(dict.fromkeys(out))


def random_weight(fmt: str, N: int, K: int, device: str) -> layout.KernelWeight:
    """A random weight of `fmt` (int4 g128, int4-asym g128, int8 per channel, nf4 block 64) in the kernels' layout."""
    if fmt == "nf4":
        packed = torch.randint(0, 256, (N * K // 2,), dtype=torch.uint8, device=device)
        absmax = torch.rand(N * K // 64, device=device) + 0.1
        return layout.repack_nf4(packed, absmax, shape=(N, K), blocksize=64, dtype=torch.bfloat16)
    bits, group = (8, K) if fmt == "int8" else (4, 128)
    packed = torch.randint(-(2**31), 2**31 - 1, (N, K * bits // 32), dtype=torch.int32, device=device)
    scale = (torch.rand(N, K // group, device=device) * 0.05 + 0.005).to(torch.bfloat16)
    zero = torch.randint(-8, 8, (N, K // group), dtype=torch.int8, device=device) if fmt == "int4-asym" else None
    return layout.repack_packed_int(packed, scale, zero, num_bits=bits, in_features=K)


def tune(shapes: list[tuple[int, int]], rows: list[int], formats: list[str], out_dir: Path) -> Path:
    """Time the candidates on this GPU and write its table; returns the file written."""
    import triton.testing

    from .matmul import qlinear
    from .reference import dequant_weight

    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    sms = multiprocessors(device)
    path = out_dir / f"{gpu_slug(gpu)}.json"
    table = load_tables(out_dir).get(gpu_slug(gpu), {})
    for (N, K), fmt, M in itertools.product(shapes, formats, rows):
        weight = random_weight(fmt, N, K, "cuda")
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        ref = x.double() @ dequant_weight(weight).double().T
        best: tuple[float, Config] | None = None
        for config in candidates(M, N, K, sms):
            try:
                err = float((qlinear(x, weight, None, config=config).double() - ref).norm() / ref.norm())
                ms = triton.testing.do_bench_cudagraph(lambda c=config: qlinear(x, weight, None, config=c), rep=30)
            except Exception as e:  # noqa: BLE001 (a tiling over the shared-memory limit fails to compile)
                print(f"  skipped {config}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
                continue
            if not err < MAX_REL_ERR:
                raise SystemExit(f"{config} on {N}x{K} {fmt} M={M}: relative error {err:.2e}")
            if best is None or ms < best[0]:
                best = (ms, config)
        assert best is not None, "the default configuration always runs"
        key = tuning_key(M, N, K, group_size=weight.group_size, num_bits=weight.num_bits,
                         has_zero=weight.zero is not None, fmt=weight.fmt, dtype=x.dtype)
        table[key] = best[1]
        print(f"{N}x{K} {fmt:<9} M={M:<4} {best[0] * 1e3:8.1f} us  {best[1]}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(table_json(gpu, table))
    os.replace(tmp, path)
    return path


def _shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not NxK (for example 4096x14336)") from None
    return n, k


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quadapt.kernels.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=_shape, default=[_shape(s) for s in DEFAULT_SHAPES],
                        help="weight shapes N x K (out x in)")
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--formats", nargs="+", choices=("int4", "int4-asym", "int8", "nf4"),
                        default=["int4", "int4-asym", "int8", "nf4"])
    parser.add_argument("--out", type=Path, default=TUNED_DIR, help="where the tables live (default: the package's)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("python -m quadapt.kernels.tune needs the CUDA device it tunes for; none is visible here")
    print(f"wrote {tune(args.shapes, args.rows, args.formats, args.out)}")


if __name__ == "__main__":
    main()
